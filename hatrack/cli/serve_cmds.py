"""`hatrack serve`: the OpenAI-compatible server on one base model."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import typer
import uvicorn

from hatrack import settings
from hatrack.errors import HatrackError


class DrainingServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would
    end with -15 even when every in-flight request finished. A completed drain is a
    clean exit: status 0, as supervisors (systemd, Kubernetes) expect."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def serve(
    base: str = typer.Option(settings.DEFAULT_BASE_NAME, help="Registered base model to load."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    quantize: str = typer.Option(
        "auto", help="Base weights: auto, nf4 (4-bit), int8 (bitsandbytes), int8wo (CPU weight-only "
                     "int8: int8 projection weights, bf16 activations) or none. auto: the device's "
                     "serving default (none on CPU, nf4 on CUDA).",
    ),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when present)."),
    dtype: str = typer.Option(
        "auto", help="What the dense parts compute in: auto, float32 or bfloat16. auto: bf16 where the "
                     "hardware does it fast (CUDA; CPUs with AVX-512 BF16 or AMX), else fp32 (fp16 on "
                     "older CUDA cards). int8wo always loads in float32 and runs its projections in bf16.",
    ),
    max_loaded: int = typer.Option(8, help="Adapters kept in device slots (LRU beyond)."),
    max_rank: Optional[int] = typer.Option(
        None, min=1, show_default=False,
        help=f"Largest LoRA rank served; adapters above it are refused (default: HATRACK_MAX_RANK, "
             f"else {settings.DEFAULT_MAX_RANK}).",
    ),
    max_host: int = typer.Option(64, help="Adapters kept in host memory before going back to disk."),
    max_batch: int = typer.Option(32, help="Sequences decoded together in one step."),
    max_waiting: int = typer.Option(256, help="Queued requests before answering 429."),
    kv_cache_gb: Optional[float] = typer.Option(
        None, show_default=False,
        help="KV cache budget in GB (1 GB = 1e9 bytes): requests wait for room, one that could never "
             "fit gets 400. Default: HATRACK_KV_CACHE_GB, else half the memory available at start "
             "(free GPU memory on CUDA), at most what --max-batch rows at the full context need.",
    ),
    prefix_cache_gb: Optional[float] = typer.Option(
        None, show_default=False,
        help="Memory in GB for prompt prefixes kept per adapter (a tenant's long system prompt is "
             "prefilled once); 0 turns the prefix cache off. Default: a quarter of the KV cache "
             "budget, at most 1 GB.",
    ),
    max_tokens: int = typer.Option(256, help="Default max_tokens when a request sets none."),
    max_body_bytes: int = typer.Option(
        4 * 1024 * 1024, min=1, help="Largest request body accepted; larger ones get 413."
    ),
    shutdown_timeout: float = typer.Option(
        30.0, help="On SIGTERM: seconds to let in-flight requests finish before exiting."
    ),
    no_auth: bool = typer.Option(
        False, "--no-auth",
        help="Serve everyone without a key. Without it every /v1 call and /metrics need "
             "'Authorization: Bearer KEY' (from `hatrack keys create`), even while no key exists; "
             "keys created or revoked while serving take effect within 1 second.",
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the base and every registered adapter behind an OpenAI-compatible API.

    Requests pick an adapter with their `model` field (`acme-support`, `acme-support@3`,
    `acme-support@prod`) or the bare base by its name. Adapters registered while the
    server runs are servable on their next request.
    """
    from hatrack.precision import DTYPE_CHOICES, QUANTIZE_CHOICES
    from hatrack.server.app import ServeConfig, create_app

    # one `error:` line each, as `hatrack eval --quantize` gives
    if quantize not in ("auto", *QUANTIZE_CHOICES):
        raise HatrackError(f"--quantize must be one of auto, {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")
    if dtype not in DTYPE_CHOICES:
        raise HatrackError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    if kv_cache_gb is not None and not kv_cache_gb > 0:
        raise HatrackError(f"--kv-cache-gb must be a positive number of GB; got {kv_cache_gb}")
    if prefix_cache_gb is not None and not prefix_cache_gb >= 0:
        raise HatrackError(f"--prefix-cache-gb must be 0 or a positive number of GB; got {prefix_cache_gb}")
    config = ServeConfig(
        base=base, quantize=quantize, device=device, dtype=dtype, max_rank=max_rank or settings.max_rank(),
        max_loaded=max_loaded, max_host=max_host, max_batch=max_batch, max_waiting=max_waiting,
        kv_cache_gb=kv_cache_gb or settings.kv_cache_gb(), prefix_cache_gb=prefix_cache_gb,
        default_max_tokens=max_tokens, max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout, auth=not no_auth,
    )
    _log_to_stderr(log_level)
    app = create_app(config)
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=int(shutdown_timeout)))
    server.run()


def _log_to_stderr(level: str) -> None:
    """hatrack's own log lines (ready, warnings) beside uvicorn's, at the same level."""
    logger = logging.getLogger("hatrack")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else logging.INFO)
    logger.propagate = False


def install(app: typer.Typer) -> None:
    app.command("serve")(serve)
