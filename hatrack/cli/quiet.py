"""Library chatter a hatrack user can do nothing about, silenced in one place before any
command runs: deprecation notices meant for library authors (transformers' FutureWarning
on `is_gradient_checkpointing`, printed on every train, eval and serve) and bitsandbytes'
log line about an optional hub kernel (`kernels-community`) its CPU backend could not
fetch. hatrack's own warnings, and libraries' errors, still show."""

from __future__ import annotations

import logging
import os
import warnings

# the libraries a run imports; their FutureWarnings and DeprecationWarnings speak to
# whoever calls their API (hatrack's code), not to whoever runs hatrack
_LIBRARIES = r"(transformers|peft|trl|accelerate|datasets|bitsandbytes|torch|huggingface_hub)(\.|$)"
# loggers that warn about optional accelerations; their errors still show
_LOGGERS = ("bitsandbytes",)


def install() -> None:
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_LIBRARIES)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # transformers sets its logger's level from this when imported (later, lazily);
    # a level the user chose is kept
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
