"""The dashboard: server-rendered pages over the registry (and, inside `hatrack serve`, the engine's stats)."""
