"""Hub commands: push a registry version to the Hugging Face Hub, pull one into the registry.
Thin calls into hatrack.integrations.hub; a pull registers through `register`'s own path."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from hatrack import settings
from hatrack.cli.registry_cmds import JSON_OPT, _registry, _tags, register_folder


def push(
    ref: str = typer.Argument(..., metavar="NAME[@V]", help="NAME, NAME@VERSION or NAME@ALIAS."),
    repo_id: str = typer.Argument(..., metavar="REPO_ID", help="Hub repository to push to, OWNER/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its visibility)."),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="Hub id of the base model's weights (needed when the base has none, "
                                   f"like the default {settings.DEFAULT_BASE_NAME}, converted from a GGUF file)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to, created if missing (default: main)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Commit message (default: 'Upload NAME@V (hatrack)')."),
    as_json: bool = JSON_OPT,
) -> None:
    """Upload an adapter version to the Hugging Face Hub: the PEFT folder naming its base's Hub
    id, a model card with its eval results beside the base's, and hatrack.json (its lineage).
    HF_TOKEN authenticates; HF_ENDPOINT points at another Hub."""
    from hatrack.integrations import hub

    record, pushed = hub.push_version(_registry(), ref, repo_id, base_model=base_model, private=private,
                                      revision=revision, commit_message=commit_message)
    if as_json:
        print(json.dumps({"label": record.label, "sha256": record.sha256, **pushed.to_dict()}, indent=2))
    else:
        print(f"pushed {record.label} to {pushed.repo_id} ({pushed.revision}): {pushed.commit_url}")


def pull(
    ref: str = typer.Argument(..., metavar="REPO_ID[@REVISION]", help="OWNER/NAME or OWNER/NAME@REVISION (a branch, tag or commit)."),
    name: str = typer.Option(..., "--name", help="Adapter name to register it under, e.g. acme-support."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model to register it on (default: the base "
                                       "its hatrack.json or adapter config names, when registered here, else "
                                       f"{settings.DEFAULT_BASE_NAME})."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="key=value, repeatable."),
    as_json: bool = JSON_OPT,
) -> None:
    """Download an adapter from the Hugging Face Hub (adapter_config.json, adapter_model.safetensors,
    README.md, hatrack.json only) and register it with every `register` check; the version
    records the repository and the commit it came from. Same as `register hf://REPO_ID\\[@REVISION]`."""
    pull_into_registry(ref, name=name, base=base, tag=tag, as_json=as_json)


def pull_into_registry(text: str, *, name: str, base: Optional[str], tag: Optional[List[str]], as_json: bool) -> None:
    from hatrack.integrations import hub
    from hatrack.registry import validate_name

    validate_name(name)  # before anything is downloaded
    tags = _tags(tag)
    ref = hub.HubRef.parse(text)
    with hub.fetch(ref) as fetched:
        chosen = base or hub.choose_base(_registry(), fetched) or settings.DEFAULT_BASE_NAME
        with hub.errors_named(fetched.folder, fetched.label):
            register_folder(fetched.folder, name=name, base=chosen, tags=tags, as_json=as_json,
                            origin_note=f"  from {fetched.label}", origin=fetched.origin(),
                            **hub.imported_lineage(fetched.lineage))


def install(app: typer.Typer) -> None:
    app.command("push")(push)
    app.command("pull")(pull)
