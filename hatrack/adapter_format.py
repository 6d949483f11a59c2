"""The PEFT LoRA adapter format, torch-free: what an adapter folder is, and whether
hatrack can serve it.

One parser for everyone: `register` refuses here what the engine could not serve,
the engine reads its tensors by the same key grammar and scaling rule, and `train`
checks `--rank` against the same limit. Like vLLM's PEFTHelper, one frozen dataclass
holds a parsed, validated adapter_config.json.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hatrack import settings
from hatrack.errors import HatrackError
from hatrack.safetensors_header import SafetensorsHeaderError, read_safetensors_header, tensor_entries

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ARTIFACT_FILES = (CONFIG, WEIGHTS)  # already in sorted name order
# weights saved with torch.save / pickle: loading one can run arbitrary code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# PEFT's LoraConfig default, used when a config leaves lora_alpha out
DEFAULT_ALPHA = 8

# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"; files written by
# other tools may carry an adapter name before ".weight" (".lora_A.default.weight")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# tensors PEFT writes for features the engine does not apply, and why each is refused
_REFUSED_TENSORS = (
    (re.compile(r"\.lora_magnitude_vector(\.|$)"), "DoRA magnitude vectors (lora_magnitude_vector) are not supported"),
    (re.compile(r"\.lora_embedding_[AB](\.|$)"), "embedding LoRA (lora_embedding_A/B) is not supported"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "LoRA biases (lora_bias) are not supported"),
    (re.compile(r"\.modules_to_save\."), "fully trained modules (modules_to_save) are not supported"),
    (re.compile(r"\.trainable_tokens_"), "trainable tokens (trainable_token_indices) are not supported"),
)


class AdapterFormatError(HatrackError):
    """An adapter folder, config or weights file that is not a well-formed PEFT LoRA
    adapter: the message names the file, the field or tensor, and what was expected."""


class NotServableError(AdapterFormatError):
    """A well-formed PEFT adapter using a feature, or a rank, hatrack cannot serve."""


def _not_servable(where: object, reason: str) -> NotServableError:
    prefix = "" if where is None else f"{where}: "
    return NotServableError(f"{prefix}not servable by hatrack: {reason}")


# ---------------------------------------------------------------- files


def pickle_files(folder: Path) -> list[str]:
    """Names of the pickle files in a folder, sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix in PICKLE_SUFFIXES)


def refuse_pickles(folder: Path) -> None:
    """A folder without safetensors weights but with pickle files is refused outright
    (beside safetensors weights they are ignored: only the two artifact files are read)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        refuse_pickle_listing(folder, pickle_files(folder))


def refuse_pickle_listing(where: object, names: list[str]) -> None:
    """refuse_pickles on a listing of file names (a remote repository's files, before
    anything is downloaded)."""
    if WEIGHTS in names:
        return
    pickles = sorted(n for n in names if Path(n).suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFormatError(
            f"{where}: holds {pickles[0]} but no {WEIGHTS}; pickle files are not loaded for safety "
            f"(save the adapter with safetensors)"
        )


def artifact_files(folder: Path) -> tuple[Path, Path]:
    """(config, weights) of an adapter folder, or an error naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder}: not a folder")
    refuse_pickles(folder)
    for name in ARTIFACT_FILES:
        if not (folder / name).is_file():
            raise AdapterFormatError(f"{folder}: missing {name} (expected a PEFT adapter folder)")
    return folder / CONFIG, folder / WEIGHTS


def read_config_json(folder: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, unvalidated."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: missing (expected a PEFT adapter folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return config


# ---------------------------------------------------------------- the config


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches the
    end of the module name, at a dot boundary, wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


# config fields whose feature the engine does not apply: (field, is it in use?, reason)
_REFUSED_FIELDS = (
    ("use_dora", bool, "DoRA (use_dora) is not supported"),
    ("modules_to_save", bool, "fully trained modules (modules_to_save) are not supported"),
    ("bias", lambda v: v not in (None, "none"), "trained biases (bias other than 'none') are not supported"),
    ("lora_bias", bool, "LoRA biases (lora_bias) are not supported"),
    ("fan_in_fan_out", bool, "transposed (fan_in_fan_out) weights are not supported"),
    ("layer_replication", bool, "layer_replication is not supported"),
    ("trainable_token_indices", bool, "trainable tokens (trainable_token_indices) are not supported"),
    ("target_parameters", bool, "LoRA on parameters (target_parameters) is not supported"),
    ("alora_invocation_tokens", bool, "activated LoRA (alora_invocation_tokens) is not supported"),
    ("use_bdlora", bool, "block-diagonal LoRA (use_bdlora) is not supported"),
    ("arrow_config", bool, "Arrow routing (arrow_config) is not supported"),
    ("megatron_config", bool, "Megatron layers (megatron_config) are not supported"),
)


@dataclass(frozen=True)
class LoraConfigInfo:
    """A parsed adapter_config.json that hatrack can serve (apart from the rank limit,
    which `check_rank` applies: the limit belongs to whoever serves)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None  # a list, or one regex string
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    @classmethod
    def parse(cls, config: Mapping[str, Any], source: object = CONFIG) -> "LoraConfigInfo":
        where = str(source)
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            hint = " (PEFT writes it in capitals)" if isinstance(peft_type, str) and peft_type.upper() == "LORA" else ""
            got = "missing" if peft_type is None else f"{peft_type!r}"
            raise AdapterFormatError(f"{where}: peft_type is {got}; expected exactly 'LORA'{hint}")
        for name, in_use, reason in _REFUSED_FIELDS:
            if config.get(name) is not None and in_use(config[name]):
                raise _not_servable(where, f"{reason} ({name}: {_short(config[name])})")
        r = config.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdapterFormatError(f"{where}: field 'r' must be a positive integer; got {json.dumps(r)}")
        alpha = config.get("lora_alpha", DEFAULT_ALPHA)
        if not _positive_number(alpha):
            raise AdapterFormatError(f"{where}: field 'lora_alpha' must be a positive number; got {json.dumps(alpha)}")
        rslora = config.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise AdapterFormatError(f"{where}: field 'use_rslora' must be true or false; got {json.dumps(rslora)}")
        targets = config.get("target_modules")
        if isinstance(targets, list):
            if not all(isinstance(t, str) for t in targets):
                raise AdapterFormatError(f"{where}: field 'target_modules' must list module names")
            targets = tuple(sorted(targets))
        elif targets is not None and not isinstance(targets, str):
            raise AdapterFormatError(f"{where}: field 'target_modules' must be a list or a string")
        rank_pattern = _pattern(config, "rank_pattern", where, integer=True)
        alpha_pattern = _pattern(config, "alpha_pattern", where, integer=False)
        base = config.get("base_model_name_or_path")
        return cls(r=r, lora_alpha=float(alpha), use_rslora=rslora, target_modules=targets,
                   rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   base_model_name_or_path=base if isinstance(base, str) else None)

    @property
    def max_rank(self) -> int:
        """The largest rank any module may have: r, or a larger rank_pattern value."""
        return max([self.r, *self.rank_pattern.values()])

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else float(self.alpha_pattern[key])

    @property
    def scaling(self) -> float:
        """The adapter-wide multiplier of B @ A (modules without a pattern use it)."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def scaling_for(self, module: str) -> float:
        """PEFT's rule per module: alpha/r, or alpha/sqrt(r) with rslora, each taken
        from alpha_pattern / rank_pattern where a pattern matches the module."""
        return lora_scaling(self.alpha_for(module), self.rank_for(module), self.use_rslora)


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _short(value: Any, limit: int = 60) -> str:
    """A config value as JSON, cut to keep an error message on one readable line."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pattern(config: Mapping[str, Any], name: str, where: str, integer: bool) -> dict[str, Any]:
    value = config.get(name) or {}
    what = "a positive integer" if integer else "a positive number"
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{where}: field {name!r} must be an object of module pattern -> {what}")
    for key, item in value.items():
        ok = (isinstance(item, int) and not isinstance(item, bool) and item > 0) if integer else _positive_number(item)
        if not ok:
            raise AdapterFormatError(f"{where}: {name}[{key!r}] must be {what}; got {json.dumps(item)}")
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error:
            raise AdapterFormatError(f"{where}: {name} key {key!r} is not a valid pattern") from None
    return dict(value)


def load_config(folder: Path) -> LoraConfigInfo:
    return LoraConfigInfo.parse(read_config_json(folder), Path(folder) / CONFIG)


def check_rank(rank: int, limit: int | None = None, field_name: str = "r", where: object = None) -> None:
    """Refuse a rank above the servable limit (HATRACK_MAX_RANK, default 64), naming the
    field it came from and how to raise the limit."""
    limit = settings.max_rank() if limit is None else limit
    if rank > limit:
        raise _not_servable(
            where, f"rank {rank} ({field_name}) is above the servable rank limit {limit} "
                   f"(set HATRACK_MAX_RANK={rank} where adapters are registered and served to raise it)")


def rank_field(config: LoraConfigInfo) -> str:
    """The config field the largest rank comes from: 'r' or "rank_pattern['...']"."""
    if config.max_rank == config.r:
        return "r"
    key = next(k for k, v in config.rank_pattern.items() if v == config.max_rank)
    return f"rank_pattern[{key!r}]"


# ---------------------------------------------------------------- the weights


def split_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> ('model.layers.0.q_proj', 'A');
    None for anything that is not a LoRA A/B weight."""
    match = _KEY.match(key)
    return (match["module"], match["ab"]) if match else None


def tensor_refusal(key: str) -> str:
    """Why a tensor that is not a LoRA A/B weight is refused, naming the PEFT feature that wrote it."""
    for pattern, reason in _REFUSED_TENSORS:
        if pattern.search(key):
            return reason
    return "only LoRA A/B weights (lora_A / lora_B) are supported"


@dataclass(frozen=True)
class LoraModule:
    rank: int
    in_features: int
    out_features: int
    key_a: str  # tensor names in the safetensors file
    key_b: str


@dataclass(frozen=True)
class AdapterLayout:
    """A servable adapter: its parsed config and every module it adapts."""

    config: LoraConfigInfo
    modules: Mapping[str, LoraModule]  # module name (no base_model.model. prefix) -> shapes

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        """The module-name suffixes the weights adapt (q_proj, down_proj, ...), sorted."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def summary(self) -> dict[str, Any]:
        """What the registry records about the adapter's shape."""
        return {"rank": self.rank, "alpha": self.config.lora_alpha, "target_modules": self.target_modules,
                "use_rslora": self.config.use_rslora, "modules": len(self.modules)}


def layout_from_header(config: LoraConfigInfo, header: Mapping[str, Any], where: object = WEIGHTS) -> AdapterLayout:
    """Check every tensor of a safetensors header against the key grammar and the
    config: each module has a 2-D float lora_A (r, in) and lora_B (out, r), with r the
    rank the config gives that module."""
    parts: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, meta in sorted(tensor_entries(dict(header)).items()):
        parsed = split_key(key)
        if parsed is None:
            raise _not_servable(f"{where}: tensor {key}", tensor_refusal(key))
        module, ab = parsed
        shape = [int(d) for d in meta.get("shape", [])]
        if len(shape) != 2 or meta.get("dtype") not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"{where}: tensor {key} must be a 2-D float tensor; it is {meta.get('dtype')} {shape}")
        if ab in parts.setdefault(module, {}):
            raise AdapterFormatError(f"{where}: module {module} has two lora_{ab} weights")
        parts[module][ab] = (key, shape)
    if not parts:
        raise AdapterFormatError(f"{where}: holds no LoRA tensors (lora_A / lora_B)")
    modules: dict[str, LoraModule] = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{where}: module {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
        (key_a, (r_a, in_f)), (key_b, (out_f, r_b)) = ab["A"], ab["B"]
        if r_a != r_b:
            raise AdapterFormatError(f"{where}: module {module}: lora_A has rank {r_a} but lora_B has rank {r_b}")
        expected = config.rank_for(module)
        if r_a != expected:
            field_name = "rank_pattern" if _pattern_key(config.rank_pattern, module) else "r"
            raise AdapterFormatError(
                f"{where}: module {module} has rank {r_a} but {CONFIG} gives it {expected} ({field_name})")
        modules[module] = LoraModule(r_a, in_f, out_f, key_a, key_b)
    return AdapterLayout(config=config, modules=modules)


def read_layout(folder: Path, max_rank: int | None) -> AdapterLayout:
    """Everything about an adapter folder hatrack can tell without torch, checked:
    no pickles, both files, a servable config, LoRA A/B tensors only, ranks as the
    config says. max_rank: the servable limit to hold it to (None: not checked here,
    the engine's slots check their own)."""
    config_path, weights_path = artifact_files(folder)
    config = LoraConfigInfo.parse(read_config_json(folder), config_path)
    if max_rank is not None:
        check_rank(config.max_rank, max_rank, rank_field(config), config_path)
    try:
        header = read_safetensors_header(weights_path)
    except SafetensorsHeaderError as exc:
        raise AdapterFormatError(str(exc)) from None
    except OSError as exc:
        raise AdapterFormatError(f"{weights_path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    return layout_from_header(config, header, weights_path)


def check_servable(folder: Path, max_rank: int | None = None) -> AdapterLayout:
    """read_layout held to the servable rank limit: max_rank, else HATRACK_MAX_RANK."""
    return read_layout(folder, settings.max_rank() if max_rank is None else max_rank)


# ---------------------------------------------------------------- what is stored

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_id(base_source: str | None) -> str | None:
    """The Hugging Face id a base was added from; None for a local folder or a converted file."""
    if base_source and _HUB_ID.match(base_source) and not Path(base_source).expanduser().exists():
        return base_source
    return None


def base_reference(base_name: str, base_source: str | None) -> str:
    """How a stored adapter config names its base: the Hugging Face id when the base
    came from the Hub, else the registry's base name; never a local path."""
    return hub_id(base_source) or base_name


def config_naming_base(folder: Path, base_ref: str) -> bytes:
    """adapter_config.json's bytes with base_model_name_or_path set to base_ref; the
    original bytes when it already says so, else PEFT's own serialisation."""
    path = Path(folder) / CONFIG
    raw = read_config_json(folder)
    if raw.get("base_model_name_or_path") == base_ref:
        return path.read_bytes()
    raw["base_model_name_or_path"] = base_ref
    return json.dumps(raw, indent=2, sort_keys=True).encode()
