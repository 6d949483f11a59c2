"""What the store receives: the adapter folder as registered, except that its config
names the base by Hugging Face id or registry name, never by a local path (an
exported adapter must not point at someone's disk). Staged in a temporary folder
before `ArtifactStore.put`, so the stored sha256 covers exactly what is stored."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hatrack import adapter_format
from hatrack.adapter_format import CONFIG, WEIGHTS
from hatrack.errors import describe_os_error
from hatrack.registry.errors import ArtifactError


@contextmanager
def staged(folder: Path, base_name: str, base_source: str | None) -> Iterator[Path]:
    """A folder holding the rewritten config and (a link to) the original weights;
    removed on exit."""
    folder = Path(folder)
    try:
        config = adapter_format.config_naming_base(folder, adapter_format.base_reference(base_name, base_source))
    except adapter_format.AdapterFormatError as exc:
        raise ArtifactError(str(exc)) from None
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix="hatrack-stage-"))
        (tmp / CONFIG).write_bytes(config)
        weights = (folder / WEIGHTS).resolve()
        try:
            os.symlink(weights, tmp / WEIGHTS)  # the weights can be large: the store copies them once
        except OSError:
            shutil.copyfile(weights, tmp / WEIGHTS)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot stage {folder / CONFIG} for the store: {describe_os_error(exc)}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
