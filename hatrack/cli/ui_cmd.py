"""`hatrack ui`: the dashboard on the registry alone (no model loaded)."""

from __future__ import annotations

import typer


def ui(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8080, help="Port to listen on."),
    no_auth: bool = typer.Option(
        False, "--no-auth",
        help="Open to anyone who can reach it, with every action allowed. Without it a browser signs in "
             "with an API key: a tenant's key sees only its adapters, read-only; a key allowed '*' may "
             "promote, tag and prune.",
    ),
    api_url: str = typer.Option("http://127.0.0.1:8000", help="Where `hatrack serve` answers, for the "
                                "curl and openai snippets on each version's page."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Browse the registry in a browser: the rack, versions, comparisons, promotion and pruning.

    The same pages are at /ui on `hatrack serve`, with live serving state and "try it".
    """
    import uvicorn

    from hatrack.registry import Registry
    from hatrack.ui.app import create_ui_app

    registry = Registry()
    app = create_ui_app(registry, open_access=no_auth, api_url=api_url.rstrip("/"))
    print(f"hatrack ui on http://{host}:{port}/ui/ " + ("(open: --no-auth)" if no_auth else "(sign in with an API key)"),
          flush=True)
    if not no_auth and not registry.has_keys():
        print("warning: no API keys exist yet, so nobody can sign in: create an admin key with "
              "`hatrack keys create --tenant ops --allow '*'`, or restart with --no-auth", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def install(app: typer.Typer) -> None:
    app.command("ui")(ui)
