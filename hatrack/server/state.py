"""What one `hatrack serve` process holds: its configuration, and the state the routes
share (key gate, catalog, engine, metrics), filled in by the base's background load."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from hatrack import settings
from hatrack.chat_format import end_of_turn_ids, load_generation_config
from hatrack.precision import default_serving_quantize, precision_label
from hatrack.registry import Registry
from hatrack.server.auth import KeyGate
from hatrack.server.catalog import Catalog
from hatrack.server.limits import DEFAULT_MAX_BODY_BYTES
from hatrack.server.metrics import ServerMetrics
from hatrack.server.precision_notice import PrecisionNotice

log = logging.getLogger("hatrack.server")


@dataclass
class ServeConfig:
    base: str = settings.DEFAULT_BASE_NAME
    quantize: str = "auto"  # auto | nf4 | int8 | int8wo | none; auto: the device's serving default, resolved at load
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # auto | float32 | bfloat16; auto: basemodel.compute_dtype(device)
    max_rank: int | None = None  # largest LoRA rank served; None: settings.max_rank()
    max_loaded: int = 8  # adapters in device slots
    max_host: int = 64  # adapters kept in host memory
    max_batch: int = 32
    max_waiting: int = 256
    max_context: int | None = None
    kv_cache_gb: float | None = None  # KV cache budget; None: the engine's default
    prefix_cache_gb: float | None = None  # cached prompt prefixes; None: the engine's default, 0: off
    default_max_tokens: int = 256
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    auth: bool = True  # False: open to anyone, no key (`--no-auth`); chosen here, never inferred
    shutdown_timeout: float = 30.0
    engine_options: dict[str, Any] = field(default_factory=dict)


class ServerState:
    def __init__(self, config: ServeConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.metrics = ServerMetrics()
        self.gate = KeyGate(registry, open_access=not config.auth)
        self.engine = None
        self.tokenizer = None
        self.catalog: Catalog | None = None
        self.notice: PrecisionNotice | None = None
        self.stop_ids: tuple[int, ...] = ()
        self.load_error: str | None = None
        self.ready = threading.Event()
        self._grammars = None
        self._grammars_lock = threading.Lock()

    def grammars(self):
        """The GrammarCompiler of this base's tokenizer, built on the first structured
        request (about a second), then shared by every request."""
        with self._grammars_lock:
            if self._grammars is None:
                from hatrack.server.engine.constraints import GrammarCompiler

                self._grammars = GrammarCompiler(self.tokenizer, self.stop_ids)
            return self._grammars

    def load(self) -> None:
        """Load the base and start the engine (runs on a background thread)."""
        try:
            import torch

            from hatrack import basemodel
            from hatrack.server.engine import Engine

            record = basemodel.ensure_base(self.registry, self.config.base)
            device = self.config.device or basemodel.best_device()
            quantize = resolve_quantize(self.config.quantize, device)
            max_rank = self.config.max_rank or settings.max_rank()
            dtype = None if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
            model, tokenizer = basemodel.load_base(record.path, quantize=quantize, device=device, dtype=dtype)
            engine = Engine(
                model, tokenizer, max_loaded=self.config.max_loaded, max_host=self.config.max_host,
                max_batch=self.config.max_batch, max_context=self.config.max_context,
                max_waiting=self.config.max_waiting, max_rank=max_rank,
                kv_cache_bytes=None if self.config.kv_cache_gb is None else int(self.config.kv_cache_gb * 1e9),
                prefix_cache_bytes=None if self.config.prefix_cache_gb is None else int(self.config.prefix_cache_gb * 1e9),
                **self.config.engine_options,
            )
            engine.start()
            # the base's own end tokens: tokenizer eos, generation config eos, the template's end of turn
            self.stop_ids = tuple(sorted(end_of_turn_ids(tokenizer, load_generation_config(record.path))))
            precision = precision_label(quantize, model.dtype)
            self.notice = PrecisionNotice(self.registry, precision)
            self.catalog = Catalog(self.registry, record.name, record.fingerprint)
            self.tokenizer, self.engine = tokenizer, engine
            self.ready.set()
            kv = engine.kv
            log.info("ready: base %s (fingerprint %s), device %s, precision %s, max rank %d, auth %s, "
                     "LoRA decode on %s, KV cache %.3g GB (%d positions), prefix cache %.3g GB",
                     record.name, record.fingerprint[:12],
                     engine.device, precision, max_rank, "keys" if self.config.auth else "open (--no-auth)",
                     engine.lora_backend, kv.budget_bytes / 1e9, kv.budget_bytes // kv.position_bytes,
                     engine.prefix.budget_bytes / 1e9)
        except Exception as err:  # reported by /ready and every /v1 call
            self.load_error = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.error("base model failed to load: %s", self.load_error)


def resolve_quantize(quantize: str, device: str) -> str:
    """`auto` is the serving default of the device the base runs on."""
    return default_serving_quantize(device) if quantize == "auto" else quantize


def warn_if_keyed_without_keys(state: ServerState) -> None:
    """At start: a keyed server with no keys refuses everyone; say so and how to fix it."""
    if not state.config.auth:
        return
    try:
        has_keys = state.registry.has_keys()
    except Exception:  # the registry's own errors surface on the first request
        return
    if not has_keys:
        log.warning("no API keys exist yet: every /v1 call is refused (401) until one is created with "
                    "`hatrack keys create --tenant T --allow PATTERN`, or restart with --no-auth to serve "
                    "without keys")
