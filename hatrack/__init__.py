"""hatrack: one base model, a rack of LoRA hats."""

__version__ = "0.1.0"
