"""Can this adapter be served on this base? Read without torch: the adapter format
(hatrack.adapter_format) refuses what the engine cannot serve, then every LoRA module
must be a module of the base, with lora_A (r, in) and lora_B (out, r) matching that
module's (out, in)."""

from __future__ import annotations

from pathlib import Path

from hatrack import adapter_format
from hatrack.adapter_format import AdapterFormatError, AdapterLayout
from hatrack.registry.errors import ArtifactError, LineageError
from hatrack.safetensors_header import SafetensorsHeaderError, linear_shapes


def servable_layout(folder: Path) -> AdapterLayout:
    """The adapter's layout, held to the servable rank limit; an ArtifactError otherwise."""
    try:
        return adapter_format.check_servable(Path(folder))
    except AdapterFormatError as exc:
        raise ArtifactError(str(exc)) from None


def check_fits(folder: Path, base_path: Path, base_name: str) -> AdapterLayout:
    """The adapter's layout once it is servable and every module fits the base; an
    ArtifactError or a LineageError naming the first thing that does not."""
    layout = servable_layout(folder)
    try:
        shapes = linear_shapes(Path(base_path))
    except (SafetensorsHeaderError, OSError) as exc:
        raise LineageError(f"base {base_name!r}: cannot read its weights ({exc})") from None
    if not shapes:
        raise LineageError(f"base {base_name!r}: no weights found in {base_path}")
    for module, m in sorted(layout.modules.items()):
        if module not in shapes:
            raise LineageError(
                f"adapter tensor {m.key_a} targets module {module!r}, which base {base_name!r} does not have"
            )
        out_f, in_f = shapes[module]
        for key, side, actual, expected in (
            (m.key_a, "lora_A", [m.rank, m.in_features], [m.rank, in_f]),
            (m.key_b, "lora_B", [m.out_features, m.rank], [out_f, m.rank]),
        ):
            if actual != expected:
                raise LineageError(
                    f"adapter tensor {key} does not fit base {base_name!r}: module {module} is "
                    f"(out={out_f}, in={in_f}), so {side} must be {expected}, but the adapter has {actual}"
                )
    return layout
