"""Whether torch.compile (inductor, CPU) speeds up hatrack's decode step.

    python bench/compile_step.py [--batch 8 32] [--quantize none|int8wo] [--steps 20] [--repeats 5]
        [--variants layers decode] [--check-batch 1] [--base-dir DIR] [--out FILE.json] [--md FILE]

The real default base in fp32 (or `--quantize int8wo`), every row on the base (no LoRA),
driven through the engine's own LlamaRunner with a KV cache prefilled with the benchmark
prompts (bench/engine.py's). One decode step is LlamaRunner.decode for all rows; it is
repeated at the same positions (a pure function of the prefilled cache, so every call
computes the same thing). Timed: the median over `--repeats` of the mean of `--steps`
steps, after warm-up, for

- eager: LlamaRunner.decode as the engine calls it;
- layers: decode unchanged, with each decoder layer's dense parts compiled as functions
  (`dynamic=False`, one graph per batch size): norm + q/k/v projections (runner._qkv), and
  o_proj + residual + MLP (runner._out_and_mlp), one compiled function per layer, plus the
  rotary embedding (runner._rope, shared). Attention and the KV-cache writes stay eager.
  Base-only rows only: these functions run without the LoRA term;
- decode: the whole step (all layers, attention and KV-cache writes) as one graph, with
  tokens and positions as tensors (decode takes Python lists, which a graph would
  specialize on token by token). `dynamic=False`: one graph per batch size and attention
  window (WINDOW_STEP positions), so serving would recompile as answers grow.

Per compiled variant and batch: the first call's wall time minus a steady step (the
compile, which a cold start pays), the steady step time and its ratio to eager, whether the
logits are bit-identical to eager and their largest difference, and batch invariance: row
0's logits at this batch against row 0 run alone (`--check-batch`) through the same path.
A variant that does not compile (no C++ compiler, a graph break: `fullgraph=True`) gets its
error as its row. Inductor's cache goes to a fresh folder per run (cold compile) unless
`--inductor-cache DIR` names one; its precompiled header stays in inductor's default folder
(/tmp/torchinductor_$USER), built by the first compile on a machine (the header line says
whether it was there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import prompts  # noqa: E402  (bench/engine.py)
from serve import cpu_name, report  # noqa: E402  (bench/serve.py)

from hatrack import basemodel  # noqa: E402
from hatrack.server.engine import Engine  # noqa: E402
from hatrack.server.engine.kv_cache import WINDOW_STEP  # noqa: E402
from hatrack.server.engine.model import LlamaRunner, PrefillSegment  # noqa: E402

VARIANTS = ("layers", "decode")
WARMUP = 2
CONTEXT = 1024  # the prompts are ~40 tokens: a small KV cache is plenty

Step = Callable[[int], torch.Tensor]  # batch size -> logits [batch, vocab]


@dataclass
class Row:
    variant: str
    batch: int
    step_ms: float | None = None
    compile_s: float | None = None
    vs_eager: float | None = None
    identical: bool | None = None
    max_abs_diff: float | None = None
    row0_invariant: bool | None = None
    graphs: int | None = None  # dynamo graphs compiled for this batch (incl. the check batch)
    graph_breaks: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Workload:
    """A runner whose KV rows 0..max_batch-1 hold the prompts, and each row's next token."""

    engine: Engine
    tokens: list[int]
    positions: list[int]

    @property
    def runner(self) -> LlamaRunner:
        return self.engine.runner


def _no_lora(*args) -> None:
    return None


def prepare(base_dir: Path, quantize: str, max_batch: int) -> Workload:
    dtype = torch.float32  # fp32 whatever the CPU (load_base would pick bf16 on AMX machines)
    model, tokenizer = basemodel.load_base(base_dir, quantize, "cpu", dtype=dtype)
    torch.set_grad_enabled(False)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_loaded=1, cpu_kernel=False, max_context=CONTEXT)
    runner = engine.runner
    ps = prompts(tokenizer, max_batch)
    with torch.inference_mode():
        for row, p in enumerate(ps):
            if not runner.kv.grow(row, len(p) + 1):
                raise SystemExit(f"error: the KV cache has no room for row {row}")
        logits = runner.prefill([PrefillSegment(row=r, ids=p) for r, p in enumerate(ps)], engine.bank)
    return Workload(engine, logits.argmax(-1).tolist(), [len(p) for p in ps])


# ------------------------------------------------------------------ the steps


def eager_step(w: Workload) -> Step:
    def step(n: int) -> torch.Tensor:
        return w.runner.decode(w.tokens[:n], w.positions[:n], w.engine.rows, [0] * n)
    return step


def _fresh(fn, name: str):
    """fn with a code object of its own: dynamo keeps its graphs per code object, so 30
    closures of one function would share one cache (and hit its recompile limit)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _layer_parts(qkv, out_and_mlp, layer, i: int):
    def dense_in(x):
        return qkv(layer, i, x, _no_lora)

    def dense_out(x, o):
        return out_and_mlp(layer, i, x, o, _no_lora)

    return _fresh(dense_in, f"dense_in_{i}"), _fresh(dense_out, f"dense_out_{i}")


class CompiledLayers:
    """Patches the runner's _qkv, _out_and_mlp and _rope with compiled per-layer functions
    while active; decode itself runs unchanged (base-only rows: the LoRA term is skipped)."""

    def __init__(self, runner: LlamaRunner):
        self.runner = runner
        opts = dict(dynamic=False, fullgraph=True)
        self.dense_in, self.dense_out = [], []
        for i, layer in enumerate(runner.layers):
            a, b = _layer_parts(runner._qkv, runner._out_and_mlp, layer, i)
            self.dense_in.append(torch.compile(a, **opts))
            self.dense_out.append(torch.compile(b, **opts))
        self.rope = torch.compile(runner._rope, **opts)

    def __enter__(self) -> "CompiledLayers":
        r = self.runner
        r._qkv = lambda layer, i, x, lora: self.dense_in[i](x)
        r._out_and_mlp = lambda layer, i, x, o, lora: self.dense_out[i](x, o)
        r._rope = self.rope
        return self

    def __exit__(self, *exc) -> None:
        for name in ("_qkv", "_out_and_mlp", "_rope"):
            self.runner.__dict__.pop(name, None)


def whole_decode(runner: LlamaRunner):
    """LlamaRunner.decode's body for base-only rows, tokens and positions as tensors and the
    attention window as an int (main() checks it gives decode's own bits, uncompiled)."""
    def decode_tensors(tok: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        n = tok.shape[0]
        row_ids = runner._rows[:n]
        mask = (runner._cols[None, :length] <= pos[:, None]).view(n, 1, 1, length)
        x = runner.embed(tok)
        cos, sin = runner.rotary(x[:, None], pos[:, None])
        for i, layer in enumerate(runner.layers):
            q, k, v = runner._qkv(layer, i, x, _no_lora)
            q = runner._rope(q, cos, sin)
            k = runner._rope(k, cos, sin)
            k_cache, v_cache = runner.kv.k[i], runner.kv.v[i]
            k_cache[row_ids, :, pos] = k
            v_cache[row_ids, :, pos] = v
            o = runner._attend(q.view(n, runner.n_kv, runner.n_rep, runner.head_dim), k_cache[:n, :, :length],
                               v_cache[:n, :, :length], mask)
            o = o.reshape(n, runner.n_heads * runner.head_dim)
            x = runner._out_and_mlp(layer, i, x, o, _no_lora)
        return runner.lm_head(runner.norm(x))
    return decode_tensors


def tensor_step(w: Workload, fn) -> Step:
    def step(n: int) -> torch.Tensor:
        positions = w.positions[:n]
        length = -(-(max(positions) + 1) // WINDOW_STEP) * WINDOW_STEP  # as decode rounds it
        return fn(torch.tensor(w.tokens[:n]), torch.tensor(positions), length)
    return step


# ------------------------------------------------------------------ measuring


def timed(step: Step, n: int, steps: int, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(first call s, median ms per step, logits of the first call)."""
    with torch.inference_mode():
        start = time.perf_counter()
        logits = step(n).clone()
        first = time.perf_counter() - start
        for _ in range(WARMUP):
            step(n)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step(n)
            runs.append((time.perf_counter() - start) / steps)
    return first, 1000 * statistics.median(runs), logits


def once(step: Step, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return step(n).clone()


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def _reason(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def measure(variant: str, step: Step, eager: dict[int, tuple[float, torch.Tensor]], eager_row0: torch.Tensor,
            batches: list[int], check_batch: int, steps: int, repeats: int) -> list[Row]:
    out = []
    for n in batches:
        row = Row(variant, n)
        graphs0, breaks0 = _dynamo_counts()
        try:
            first, row.step_ms, logits = timed(step, n, steps, repeats)
            row.compile_s = max(first - row.step_ms / 1000, 0.0)
            eager_ms, eager_logits = eager[n]
            row.vs_eager = eager_ms / row.step_ms
            row.identical = torch.equal(logits, eager_logits)
            row.max_abs_diff = float((logits - eager_logits).abs().max())
            alone = once(step, check_batch)[0]
            row.row0_invariant = torch.equal(logits[0], alone)
            if not torch.equal(alone, eager_row0):
                row.notes.append(f"row 0 at batch {check_batch} differs from eager by "
                                 f"{float((alone - eager_row0).abs().max()):.3g}")
        except Exception as exc:  # inductor or dynamo failed: the reason is the result
            row.error = _reason(exc)
        graphs1, breaks1 = _dynamo_counts()
        row.graphs, row.graph_breaks = graphs1 - graphs0, breaks1 - breaks0
        print(json.dumps(asdict(row)), flush=True)
        out.append(row)
    return out


def toolchain() -> str:
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    try:
        from torch._inductor import config as inductor_config

        configured = inductor_config.cpp.cxx
    except Exception as exc:  # an inductor that does not import is the answer too
        configured = f"inductor unavailable ({_reason(exc)})"
    # inductor keeps its precompiled header in its default folder whatever TORCHINDUCTOR_CACHE_DIR
    # says: the first compile on a machine also builds that (a cold start on a new machine pays it)
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        pch = "present" if any((Path(default_cache_dir()) / "precompiled_headers").glob("*.gch")) else "not built yet"
    except Exception:
        pch = "unknown"
    return (f"C++ compiler {cxx or 'MISSING (inductor cannot build CPU kernels)'}; inductor cpp.cxx {configured}; "
            f"precompiled header {pch}")


def table(rows: list[Row], header: str) -> list[str]:
    lines = [header, "",
             "| variant | batch | step ms | vs eager | compile s | bit-identical | max abs diff | "
             "row 0 batch-invariant | graphs | graph breaks | notes |",
             "|---" * 11 + "|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        if r.error:
            lines.append(f"| {r.variant} | {r.batch} | failed | | | | | | {f(r.graphs, 'd')} | "
                         f"{f(r.graph_breaks, 'd')} | {r.error.replace('|', '/')} |")
            continue
        yes = {True: "yes", False: "NO", None: ""}
        lines.append(f"| {r.variant} | {r.batch} | {r.step_ms:.2f} | {f(r.vs_eager, '.2f')}x | {f(r.compile_s, '.1f')} | "
                     f"{yes[r.identical]} | {f(r.max_abs_diff, '.3g')} | {yes[r.row0_invariant]} | "
                     f"{f(r.graphs, 'd')} | {f(r.graph_breaks, 'd')} | {'; '.join(r.notes)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--quantize", default="none", choices=["none", "int8wo"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--check-batch", type=int, default=1,
                        help="row 0 is also run at this batch size to check batch invariance")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="default: the converted default base (under HATRACK_BASES_DIR)")
    parser.add_argument("--inductor-cache", type=Path, default=None,
                        help="inductor's cache folder (default: a fresh one, so compile times are cold)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--md", type=Path, default=None, help="also write the markdown table to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="inductor-") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.inductor_cache or tmp)
        import torch._dynamo

        limit = 8 * (len(args.batch) + 1)  # _rope: one graph per q/k shape and batch size
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
        base_dir = args.base_dir or basemodel.ensure_default_base()
        tools = toolchain()
        print(tools, flush=True)
        w = prepare(base_dir, args.quantize, max(args.batch + [args.check_batch]))

        eager = eager_step(w)
        results: dict[int, tuple[float, torch.Tensor]] = {}
        rows = []
        for n in args.batch:
            _, ms, logits = timed(eager, n, args.steps, args.repeats)
            results[n] = (ms, logits)
            rows.append(Row("eager", n, step_ms=ms, vs_eager=1.0, identical=True, max_abs_diff=0.0,
                            row0_invariant=torch.equal(logits[0], once(eager, args.check_batch)[0])))
            print(json.dumps(asdict(rows[-1])), flush=True)
        eager_row0 = once(eager, args.check_batch)[0]

        for variant in args.variants:
            torch._dynamo.reset()
            if variant == "layers":
                try:
                    compiled = CompiledLayers(w.runner)
                except Exception as exc:
                    rows += [Row(variant, n, error=_reason(exc)) for n in args.batch]
                    continue
                with compiled:
                    rows += measure(variant, eager, results, eager_row0, args.batch, args.check_batch,
                                    args.steps, args.repeats)
            else:
                fn = whole_decode(w.runner)
                plain = once(tensor_step(w, fn), args.batch[0])
                if not torch.equal(plain, results[args.batch[0]][1]):  # measuring it would mislead
                    rows += [Row(variant, n, error="whole_decode no longer gives LlamaRunner.decode's bits "
                                 "uncompiled: update it to match model.py") for n in args.batch]
                    continue
                step = tensor_step(w, torch.compile(fn, dynamic=False, fullgraph=True))
                rows += measure(variant, step, results, eager_row0, args.batch, args.check_batch,
                                args.steps, args.repeats)

    header = (f"decode step, base-only rows, torch.compile (inductor) vs eager, ms per step (median of "
              f"{args.repeats} x {args.steps} steps); base {base_dir.name} (fp32, --quantize {args.quantize}), "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}, "
              f"{datetime.now(timezone.utc):%Y-%m-%d}; {tools}; compile s: first call minus a step, inductor "
              f"cache {'given' if args.inductor_cache else 'cold'}; row 0 checked against batch {args.check_batch}")
    report(table(rows, header), args.md)
    if args.out:
        args.out.write_text(json.dumps({"header": header, "command": sys.argv, "rows": [asdict(r) for r in rows]},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
