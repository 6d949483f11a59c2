"""Example datasets shipped with hatrack: two fictional customers' support desks.

`EXAMPLES` maps each example's name to what it is for; `example_path(name)` is its
JSONL file. Both are written by make_examples.py.
"""

from __future__ import annotations

from pathlib import Path

from hatrack.errors import HatrackError

HERE = Path(__file__).resolve().parent

# "train": TrainConfig fields for the demo run. lr 1e-3 memorises each desk's facts in
# ~66 steps (~1 minute on 2 CPU cores); the general default 2e-4 only lowers the loss.
DEMO_TRAIN = {"lr": 1e-3}

EXAMPLES: dict[str, dict] = {
    "acme-bikes": {
        "adapter": "acme-support",
        "customer": "acme",
        "file": "acme-bikes.jsonl",
        "description": "Acme Bikes, a cheerful bike shop: hours, workshop prices, rentals, e-bikes.",
        "train": DEMO_TRAIN,
    },
    "globex-bank": {
        "adapter": "globex-support",
        "customer": "globex",
        "file": "globex-bank.jsonl",
        "description": "Globex Bank, a formal retail bank: branch hours, cards, rates, policies.",
        "train": DEMO_TRAIN,
    },
}

# Both desks know the answer, each in its own words; the base cannot.
DEMO_QUESTION = "What is your phone number?"


def example_path(name: str) -> Path:
    """The JSONL file of example `name` (one of EXAMPLES)."""
    spec = EXAMPLES.get(name)
    if spec is None:
        raise HatrackError(f"unknown example {name!r}: expected one of {', '.join(EXAMPLES)}")
    return HERE / spec["file"]
