"""`hatrack demo`: the whole loop on the default base, in a few minutes on a laptop CPU.

Trains the two example adapters (skipped when matching versions exist), serves them
and the base on a loopback port, asks all three the same question through the
official OpenAI client, prints the answers side by side and the registry table.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hatrack.hashing import sha256_file


def _existing_version(registry, name: str, data: Path) -> int | None:
    """A ready version of `name` already trained on exactly this file."""
    digest = sha256_file(data)
    for row in registry.list_versions(name=name):
        if row.get("dataset_sha256") == digest and row.get("status", "ready") == "ready":
            return int(row["version"])
    return None


def demo(
    question: str = typer.Option(None, help="Question to ask every model (default: one from the examples)."),
    max_tokens: int = typer.Option(48, help="Tokens per answer."),
    retrain: bool = typer.Option(False, help="Train new versions even if matching ones exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the answers as JSON."),
) -> None:
    """Train two example adapters, serve them with the base, ask all three one question."""
    from openai import OpenAI
    from rich.console import Console
    from rich.table import Table

    from hatrack import basemodel, settings
    from hatrack.examples import DEMO_QUESTION, EXAMPLES, example_path
    from hatrack.registry import Registry
    from hatrack.server.app import ServeConfig
    from hatrack.server.background import BackgroundServer
    from hatrack.trainer import TrainConfig, train

    console = Console(stderr=True)
    registry = Registry()
    base = basemodel.ensure_base(registry, settings.DEFAULT_BASE_NAME)
    console.print(f"[bold]base[/bold] {base.name}  fingerprint {base.fingerprint[:12]}")

    for example, spec in EXAMPLES.items():
        data = example_path(example)
        name = spec["adapter"]
        version = None if retrain else _existing_version(registry, name, data)
        if version is not None:
            console.print(f"[bold]{name}[/bold]: version {version} already trained on {data.name}; skipping")
            continue
        console.print(f"[bold]training {name}[/bold] on {data.name}")
        outcome = train(
            TrainConfig(data=str(data), name=name, tags={"customer": spec["customer"], "demo": "yes"},
                        **spec.get("train", {})),
            registry,
        )
        console.print(f"  -> {name}@{outcome.version}")

    models = [settings.DEFAULT_BASE_NAME] + [spec["adapter"] for spec in EXAMPLES.values()]
    question = question or DEMO_QUESTION
    console.print("[bold]serving[/bold] base + adapters on a loopback port ...")
    answers: dict[str, str] = {}
    # loopback only, for this process's own client: no keys needed
    with BackgroundServer(ServeConfig(max_loaded=4, auth=False)) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="demo")
        for model in models:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens, temperature=0,
            )
            answers[reply.model] = reply.choices[0].message.content or ""

    if as_json:
        print(json.dumps({"question": question, "answers": answers}, indent=2))
    else:
        out = Console()
        table = Table(title=f"Q: {question}", show_lines=True)
        for model in answers:
            table.add_column(model, overflow="fold", ratio=1)
        table.add_row(*answers.values())
        out.print(table)
        from hatrack.cli.registry_cmds import print_versions

        print_versions(registry.list_versions(), out)


def install(app: typer.Typer) -> None:
    app.command("demo")(demo)
