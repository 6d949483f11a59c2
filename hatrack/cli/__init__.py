"""The Typer app: every command is a thin call into registry, trainer or server."""
