"""Registry commands: base, register, list, show, tag, untag, alias, prune, check, keys.
Each is a thin call into hatrack.registry; errors are HatrackErrors, printed as one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from hatrack import settings
from hatrack.humanize import human_age, human_size

base_app = typer.Typer(help="Base models: list them, or add one from a folder or Hugging Face id.",
                       no_args_is_help=True)
keys_app = typer.Typer(help="API keys for `hatrack serve`: create, list, revoke.", no_args_is_help=True)

JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _registry():
    from hatrack.registry import Registry

    return Registry()


def _dump(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _tags(pairs: Optional[List[str]]) -> dict[str, str]:
    from hatrack.registry.names import parse_tag

    return dict(parse_tag(p) for p in pairs or [])



def _fmt_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _score_lines(row: dict) -> str:
    """One score per line, its base's value beside it."""
    lines = []
    for metric, value in row["scores"].items():
        base = row["base_scores"].get(metric)
        lines.append(f"{metric} {_fmt_score(value)}" + (f" ({_fmt_score(base)})" if base is not None else ""))
    return "\n".join(lines) or "-"


# How the list table makes room, first to last: cut long tags and aliases, leave out
# size, age (and base, tags), and only then cut scores and names.
_LIST_STEPS = [("shrink", "tags"), ("shrink", "aliases"), ("shrink", "base"), ("drop", "size"), ("drop", "age"),
               ("drop", "base"), ("shrink", "scores (base's)"), ("drop", "tags"), ("shrink", "name")]


def print_versions(rows: list[dict], console=None) -> None:
    """The `hatrack list` table (also printed by `hatrack demo`), fitted to the console's
    width (80 columns when stdout is not a terminal)."""
    from rich.console import Console

    from hatrack.cli.fit import Column, fit

    console = console or Console()
    if not rows:
        console.out("no adapter versions", highlight=False)
        return
    bases = {r["base"] for r in rows}
    one_base = len(bases) == 1  # then the title names it, and the table is narrower
    columns = [Column("name", min_width=12), Column("v", right=True)]
    columns += [] if one_base else [Column("base", min_width=8)]
    columns += [Column("tags", min_width=16), Column("scores (base's)", min_width=14),
                Column("size", right=True), Column("age", right=True), Column("aliases", min_width=7)]
    cells = [
        [r["name"], str(r["version"]), *([] if one_base else [r["base"]]),
         "\n".join(f"{k}={v}" for k, v in r["tags"].items()) or "-", _score_lines(r),
         human_size(r["size"]), human_age(r["created_ts"]), ", ".join(r["aliases"]) or "-"]
        for r in rows
    ]
    table = fit(columns, cells, console.width, _LIST_STEPS)
    lines = [f"adapters on {next(iter(bases))}" if one_base else "adapters", *table.lines]
    if table.dropped:
        lines.append(f"({', '.join(table.dropped)} left out to fit {console.width} columns; --json shows every field)")
    for line in lines:
        console.out(line, highlight=False)


def _adapter_ref(reg, ref: str):
    """NAME (prod, else newest) or NAME@V / NAME@ALIAS -> VersionRecord."""
    return reg.version_of(ref)


# ---------------------------------------------------------------- base


@base_app.command("list")
def base_list(as_json: bool = JSON_OPT) -> None:
    """List base models (the default smollm2-135m is registered on first use)."""
    from hatrack import basemodel

    reg = _registry()
    try:
        basemodel.ensure_base(reg, settings.DEFAULT_BASE_NAME)
    except basemodel.BaseModelError:
        pass  # the default base is not installed here; list what exists
    bases = reg.list_bases()
    if as_json:
        _dump([b.to_dict() for b in bases])
        return
    from rich.console import Console
    from rich.table import Table

    # the engine's slots hold ranks up to this limit; `register` refuses larger ones
    table = Table(title="base models", caption=f"adapters servable up to max rank {settings.max_rank()} (HATRACK_MAX_RANK)")
    for column in ("name", "fingerprint", "source", "created"):
        table.add_column(column, overflow="fold")
    for b in bases:
        table.add_row(b.name, b.fingerprint[:16], b.source, b.created.strftime("%Y-%m-%d %H:%M"))
    Console().print(table)


@base_app.command("add")
def base_add(
    name: str = typer.Argument(..., help="Name to register the base under (e.g. llama-3.2-1b)."),
    source: str = typer.Argument(..., help="A local model folder or a Hugging Face id."),
    as_json: bool = JSON_OPT,
) -> None:
    """Register a base model from a local folder or a Hugging Face id."""
    from hatrack import basemodel
    from hatrack.registry import validate_name

    validate_name(name)
    record = basemodel.add_base(_registry(), name, source)
    if as_json:
        _dump(record.to_dict())
    else:
        print(f"base {record.name}: fingerprint {record.fingerprint}; adapters up to max rank {settings.max_rank()}")


# ---------------------------------------------------------------- register, list, show


def register(
    path: str = typer.Argument(..., help="A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), "
                                         "or hf://REPO_ID\\[@REVISION] to pull one from the Hugging Face Hub."),
    name: str = typer.Option(..., "--name", help="Adapter name, e.g. acme-support."),
    base: Optional[str] = typer.Option(None, "--base", help=f"Base model it was trained on (default: "
                                       f"{settings.DEFAULT_BASE_NAME}; for hf:// the base its hatrack.json or "
                                       f"adapter config names, when registered here)."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="key=value, repeatable."),
    as_json: bool = JSON_OPT,
) -> None:
    """Import a PEFT adapter folder (or a Hub repository's, like `hatrack pull`) as the next
    version of NAME, after checking it fits the base."""
    if path.startswith("hf://"):
        from hatrack.cli.hub_cmds import pull_into_registry

        pull_into_registry(path, name=name, base=base, tag=tag, as_json=as_json)
        return
    register_folder(Path(path), name=name, base=base or settings.DEFAULT_BASE_NAME, tags=_tags(tag), as_json=as_json)


def register_folder(folder: Path, *, name: str, base: str, tags: dict[str, str], as_json: bool,
                    origin_note: str = "", **lineage: Any) -> None:
    """register's one path, for a local folder and for one pulled from the Hub (lineage:
    origin, dataset, train_config, ... as Registry.register takes them)."""
    from hatrack import basemodel
    from hatrack.registry import validate_name

    validate_name(name)
    reg = _registry()
    basemodel.ensure_base(reg, base)
    record = reg.register(folder, name=name, base=base, tags=tags, **lineage)
    if record.same_artifact:
        typer.echo(f"note: same artifact as {', '.join(record.same_artifact)} (sha256 {record.sha256[:12]})", err=True)
    if as_json:
        _dump(reg.version_info(record.name, record.version))
    else:
        print(f"registered {record.label}  sha256 {record.sha256[:12]}  {human_size(record.size)}{origin_note}")


def list_cmd(
    name: Optional[str] = typer.Option(None, "--name", help="Only this adapter name."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Only versions with key=value (repeatable: all must match)."),
    base: Optional[str] = typer.Option(None, "--base", help="Only adapters of this base."),
    sort: Optional[str] = typer.Option(None, "--sort", help="A metric the listed versions record (e.g. eval_loss: best first), or name, version, created, size, base."),
    as_json: bool = JSON_OPT,
) -> None:
    """List adapter versions with their base, tags, scores, size, age and aliases."""
    rows = _registry().list_versions(name=name, tags=_tags(tag), base=base, sort=sort)
    if as_json:
        _dump(rows)
    else:
        print_versions(rows)


def show(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@ALIAS."),
    as_json: bool = JSON_OPT,
) -> None:
    """Everything the registry records about one adapter version."""
    reg = _registry()
    record = _adapter_ref(reg, ref)
    info = reg.version_info(record.name, record.version)
    if as_json:
        _dump(info)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=info["label"], show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if key in ("label", "created_ts"):
            continue
        if key == "lora" and value:
            value = (f"rank {value.get('rank')}, alpha {value.get('alpha'):g}"
                     + (" (rslora)" if value.get("use_rslora") else "")
                     + f", {value.get('modules')} modules: {' '.join(value.get('target_modules') or [])}")
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str) if value else "-"
        table.add_row(key, "-" if value is None else str(value))
    Console().print(table)


# ---------------------------------------------------------------- tags and aliases


def tag(
    ref: str = typer.Argument(..., help="NAME[@VERSION] (NAME alone: the version it resolves to)."),
    pairs: List[str] = typer.Argument(..., help="key=value ..."),
) -> None:
    """Set tags on a version (an existing key gets the new value)."""
    tags = _tags(pairs)
    reg = _registry()
    record = _adapter_ref(reg, ref)
    reg.set_tags(record.name, record.version, tags)
    print(f"{record.label}: " + " ".join(f"{k}={v}" for k, v in tags.items()))


def untag(
    ref: str = typer.Argument(..., help="NAME[@VERSION] (NAME alone: the version it resolves to)."),
    keys: List[str] = typer.Argument(..., help="Tag keys to remove."),
) -> None:
    """Remove tags from a version."""
    reg = _registry()
    record = _adapter_ref(reg, ref)
    removed = reg.remove_tags(record.name, record.version, keys)
    missing = sorted(set(keys) - set(removed))
    print(f"{record.label}: removed {', '.join(removed) or 'nothing'}"
          + (f" (not set: {', '.join(missing)})" if missing else ""))


def alias(
    name: str = typer.Argument(..., metavar="NAME", help="Adapter name."),
    alias_name: str = typer.Argument(..., metavar="ALIAS", help="Alias, e.g. prod or staging (never all digits)."),
    version: Optional[int] = typer.Argument(None, metavar="VERSION", help="Version the alias should point at."),
    force: bool = typer.Option(False, "--force", help="Promote to prod even if its eval_loss is worse, or it has none."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias."),
) -> None:
    """Point ALIAS of NAME at VERSION (prod is gated on eval_loss), or --delete it."""
    from hatrack.registry import RegistryError

    reg = _registry()
    if delete:
        if version is not None:
            raise RegistryError("give either VERSION or --delete, not both")
        reg.delete_alias(name, alias_name)
        print(f"{name}@{alias_name} deleted")
        from hatrack.cli.integration_cmds import notify_alias_moved

        notify_alias_moved(name, alias_name)
        return
    if version is None:
        raise RegistryError(f"missing VERSION: `hatrack alias {name} {alias_name} VERSION` (or --delete)")
    reg.set_alias(name, alias_name, version, force=force)
    print(f"{name}@{alias_name} -> {name}@{version}" + (" (forced)" if force else ""))
    from hatrack.cli.integration_cmds import notify_alias_moved

    notify_alias_moved(name, alias_name)  # vLLM replicas in HATRACK_VLLM_REPLICAS forget the moved names


# ---------------------------------------------------------------- prune and check


def prune(
    name: Optional[str] = typer.Option(None, "--name", help="Only versions of this adapter."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Only versions with key=value."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep the N newest versions of each name."),
    keep_best: Optional[int] = typer.Option(None, "--keep-best", help="Keep the N best versions of each name (needs --by)."),
    by: Optional[str] = typer.Option(None, "--by", help="Metric for --keep-best (lower is better for *loss*/*perplexity*)."),
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Only versions older than this, e.g. 30d or 12h."),
    trained_on: Optional[str] = typer.Option(None, "--trained-on", help="Only versions trained on this file (or dataset sha256)."),
    yes: bool = typer.Option(False, "--yes", help="Delete. Without it, only the plan is printed."),
    as_json: bool = JSON_OPT,
) -> None:
    """Remove old or worse versions. Prints the plan; deletes only with --yes. Aliased versions,
    and the parents of versions that stay, are kept."""
    reg = _registry()
    plan = reg.plan_prune(name=name, tags=_tags(tag), keep_last=keep_last, keep_best=keep_best, by=by,
                          older_than=older_than, trained_on=trained_on)
    result = reg.prune(plan) if yes else None
    if as_json:
        _dump({"plan": plan.to_dict(), "deleted": yes, "result": result.to_dict() if result else None})
        return
    for kept in plan.kept:
        print(f"keep   {kept['label']}  ({kept['why']})")
    for item in plan.remove:
        print(f"remove {item.label}  {human_size(item.size)}  {'; '.join(item.reasons)}")
    if not plan.remove:
        print("nothing to prune")
        return
    if result is None:
        print(f"would free {human_size(plan.freed_bytes)} ({len(plan.free_folders)} store folders); "
              f"run again with --yes to delete")
    else:
        for label in result.skipped:
            print(f"kept   {label}  (an alias now points at it)")
        print(f"deleted {len(result.removed)} versions, freed {human_size(result.freed_bytes)} "
              f"({len(result.removed_folders)} store folders)")


def check(
    fix: bool = typer.Option(False, "--fix", help="Remove store folders no version uses."),
    as_json: bool = JSON_OPT,
) -> None:
    """Verify every artifact against its sha256 and find orphan store folders; exit 1 on problems."""
    report = _registry().check(fix=fix)
    if as_json:
        _dump(report.to_dict())
    else:
        for p in report.problems:
            who = f" ({', '.join(p.versions)})" if p.versions else ""
            print(f"{p.kind:8} {p.target[:16]}{who}: {p.detail}" + ("  [removed]" if p.fixed else ""))
        print(f"checked {report.versions} versions, {report.artifacts} artifacts, "
              f"{report.store_entries} store entries: " + ("ok" if report.ok else "problems found"))
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="Who the key belongs to."),
    allow: List[str] = typer.Option(..., "--allow", help="Adapter name glob this key may use, e.g. 'acme-*' (repeatable)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Create a key; the secret is printed once and only its sha256 is stored."""
    record, secret = _registry().create_key(tenant, allow)
    if as_json:
        _dump(dict(record.to_dict(), secret=secret))
    else:
        print(f"key {record.id} for tenant {record.tenant} (allows {', '.join(record.patterns)})")
        print(f"secret (shown once): {secret}")


@keys_app.command("list")
def keys_list(as_json: bool = JSON_OPT) -> None:
    """List keys (never their secrets)."""
    keys = _registry().list_keys()
    if as_json:
        _dump([k.to_dict() for k in keys])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="API keys")
    for column in ("id", "tenant", "allows", "created", "revoked"):
        table.add_column(column)
    for k in keys:
        table.add_row(k.id, k.tenant, " ".join(k.patterns), k.created.strftime("%Y-%m-%d %H:%M"),
                      k.revoked.strftime("%Y-%m-%d %H:%M") if k.revoked else "-")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="Key id from `hatrack keys list`.")) -> None:
    """Revoke a key: it stops working at once."""
    _registry().revoke_key(key_id)
    print(f"revoked {key_id}")


def install(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base")
    app.command("register")(register)
    app.command("list")(list_cmd)
    app.command("show")(show)
    app.command("tag")(tag)
    app.command("untag")(untag)
    app.command("alias")(alias)
    app.command("prune")(prune)
    app.command("check")(check)
    app.add_typer(keys_app, name="keys")
