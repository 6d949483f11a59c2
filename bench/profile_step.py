"""Where a decode step and a prefill of hatrack's engine spend their time.

    python bench/profile_step.py [--batch 8 32] [--quantize none|nf4|int8|int8wo] [--repeats 3] [--out FILE]

The real default base, 8 random rank-16 all-linear adapters (bench/engine.py's), 32 new
tokens per request, greedy. Two workloads per batch size: every row on the base, and rows
round-robin over the 8 adapters. The engine's own functions are wrapped with timers
(torch on CPU runs synchronously, so a wall-clock timer around a call is that call's cost):

- base linear: the q/k/v/o/gate/up/down projections (the base model's modules, called as-is)
- LM head: the final norm's output through lm_head
- LoRA: the slot LoRA term of every projection
- attention: scaled_dot_product_attention, and decode's own attention (model._attend)
- norms: the RMS norms of every layer
- other model ops: embedding, rotary, KV-cache writes, residual adds, SiLU, views:
  model.decode minus the above
- sampling: pick_tokens (greedy or sampled, constraints, logprobs)
- engine: the rest of a step (admission checks, accepting tokens, finishing rows, Python)

A separate row gives the machine's ceiling for the same batch: the 30 layers' base linear
layers alone, timed back to back outside the engine. Prefill: the batch's prompts through
the engine's prefill (several prompts to a forward), timed per prompt token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import N_ADAPTERS, NEW_TOKENS, in_thread, make_adapters, prompts  # noqa: E402
from serve import cpu_name, report  # noqa: E402

from hatrack import basemodel  # noqa: E402
from hatrack.precision import QUANTIZE_CHOICES  # noqa: E402
from hatrack.server.engine import AdapterSpec, Engine, SamplingParams, load_peft_adapter  # noqa: E402
from hatrack.server.engine import engine as engine_module  # noqa: E402
from hatrack.server.engine import model as model_module  # noqa: E402

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
PARTS = ("base linear", "LM head", "LoRA", "attention", "norms", "other model ops", "sampling", "engine")


class Timers:
    """Seconds per part, collected only while `on`; parts timed inside a prefill are
    kept apart (as "prefill:<part>") from those of decode steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False
        self.phase = ""
        self._inside: set[str] = set()  # parts being timed now (a part inside itself counts once)

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            if not self.on or part in self._inside:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            self._inside.add(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside.discard(part)
                took = time.perf_counter() - start
                self.seconds[self.phase + part] += took
                if part == "whole" and "span_start" in self.seconds:  # a prefill between decode steps
                    self.seconds["prefill in span"] += took
        return timed

    def span(self, fn):
        """fn's calls from the first start to the last end are one span (its wall time,
        with whatever the engine loop does between the calls)."""
        def spanned(*args, **kwargs):
            if self.on and "span_start" not in self.seconds:
                self.seconds["span_start"] = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds["span_end"] = time.perf_counter()
        return spanned

    def phase_of(self, phase: str, fn):
        """fn runs in `phase`: the parts timed inside it count there."""
        def phased(*args, **kwargs):
            outer, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = outer
        return phased


class _TimedFunctional:
    """torch.nn.functional as model.py sees it, with attention timed."""

    def __init__(self, timers: Timers) -> None:
        self._sdpa = timers.wrap("attention", torch.nn.functional.scaled_dot_product_attention)

    def __getattr__(self, name):
        if name == "scaled_dot_product_attention":
            return self._sdpa
        return getattr(torch.nn.functional, name)


def instrument(engine: Engine, timers: Timers) -> None:
    runner = engine.runner
    for layer in runner.layers:
        for parent, name in PROJECTIONS:
            module = getattr(getattr(layer, parent), name)
            module.forward = timers.wrap("base linear", module.forward)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = timers.wrap("norms", norm.forward)
    runner.lm_head.forward = timers.wrap("LM head", runner.lm_head.forward)
    runner.norm.forward = timers.wrap("LM head", runner.norm.forward)
    for obj in (engine.rows, engine.bank):
        for name in ("apply", "apply_slot"):
            if hasattr(obj, name):
                setattr(obj, name, timers.wrap("LoRA", getattr(obj, name)))
    model_module.F = _TimedFunctional(timers)
    if hasattr(runner, "_attend"):  # decode attention (CPU: plain products and softmax)
        runner._attend = timers.wrap("attention", runner._attend)
    runner.decode = timers.wrap("model.decode", runner.decode)
    engine_module.pick_tokens = timers.wrap("sampling", engine_module.pick_tokens)
    engine._decode_step = timers.span(timers.wrap("step", engine._decode_step))
    runner.prefill = timers.wrap("model", runner.prefill)  # inside engine._prefill's phase
    engine._prefill = timers.phase_of("prefill:", timers.wrap("whole", engine._prefill))


def run(engine: Engine, timers: Timers, jobs, params: SamplingParams) -> tuple[dict[str, float], int]:
    """One batch to the end: seconds by part, and the number of decode steps."""
    timers.seconds.clear()
    steps_before = engine.stats().steps
    timers.on = True
    handles = [engine.submit(p, a, params) for p, a in jobs]
    for h in handles:
        h.result(timeout=900)
    time.sleep(0.2)  # a row's answer is ready inside the last step: let that step end under the timers
    timers.on = False
    return dict(timers.seconds), engine.stats().steps - steps_before


def linear_ceiling(engine: Engine, batch: int, repeats: int = 20) -> float:
    """ms for the base linear layers of all layers on a batch of `batch` tokens, back to back."""
    runner = engine.runner
    hidden = runner.embed.weight.shape[1]
    x = torch.randn(batch, hidden, dtype=runner.dtype)
    mods = [getattr(getattr(layer, p), n) for layer in runner.layers for p, n in PROJECTIONS]
    inter = [m for m in mods if m.in_features != hidden]
    xi = torch.randn(batch, inter[0].in_features, dtype=runner.dtype) if inter else x

    def once() -> None:
        for m in mods:
            m(x if m.in_features == hidden else xi)

    with torch.inference_mode():
        once()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile(engine: Engine, timers: Timers, jobs, repeats: int) -> tuple[dict[str, float], float]:
    """Median ms per decode step of each part, and prefill ms per prompt token."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)  # no stop ids: all 32 tokens
    prompt_tokens = sum(len(p) for p, _ in jobs)
    per_part: dict[str, list[float]] = defaultdict(list)
    prefill_ms_per_token = []
    for _ in range(repeats):
        s, steps = run(engine, timers, jobs, params)
        prefill_ms_per_token.append(1000 * s.get("prefill:whole", 0.0) / prompt_tokens)
        inside = sum(s.get(k, 0.0) for k in ("base linear", "LM head", "LoRA", "attention", "norms"))
        parts = {k: s.get(k, 0.0) for k in ("base linear", "LM head", "LoRA", "attention", "norms", "sampling")}
        parts["other model ops"] = s.get("model.decode", 0.0) - inside
        # wall time of the decode steps, and of the engine loop between them
        parts["step"] = s["span_end"] - s["span_start"] - s.get("prefill in span", 0.0)
        parts["engine"] = parts["step"] - s.get("model.decode", 0.0) - s.get("sampling", 0.0)
        for k, v in parts.items():
            per_part[k].append(1000 * v / max(steps, 1))
    return {k: statistics.median(v) for k, v in per_part.items()}, statistics.median(prefill_ms_per_token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the converted default base")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    base_dir = args.base_dir or basemodel.ensure_default_base()
    timers = Timers()
    with tempfile.TemporaryDirectory() as tmp:
        folders = in_thread(make_adapters, base_dir, Path(tmp))
        model, tokenizer = in_thread(basemodel.load_base, base_dir, args.quantize, "cpu")
        engine = Engine(model, tokenizer, max_loaded=N_ADAPTERS, max_batch=max(args.batch))
        instrument(engine, timers)
        # before the engine thread starts: a second OpenMP pool would throttle both (threads.py)
        ceilings = {batch: in_thread(linear_ceiling, engine, batch) for batch in args.batch}
        engine.start()
        try:
            specs = [AdapterSpec(f"a{i}", (lambda f=f: load_peft_adapter(f))) for i, f in enumerate(folders)]
            warm = [(p, s) for p, s in zip(prompts(tokenizer, N_ADAPTERS), specs)]
            for h in [engine.submit(p, s, SamplingParams(max_tokens=2, temperature=0.0)) for p, s in warm]:
                h.result(timeout=600)
            rows = []
            for batch in args.batch:
                ps = prompts(tokenizer, batch)
                ceiling = ceilings[batch]
                for label, jobs in (("base", [(p, None) for p in ps]),
                                    ("8 mixed", [(p, specs[i % N_ADAPTERS]) for i, p in enumerate(ps)])):
                    parts, prefill = profile(engine, timers, jobs, args.repeats)
                    rows.append((batch, label, parts, prefill, ceiling))
                    print(batch, label, {k: round(v, 2) for k, v in parts.items()}, flush=True)
        finally:
            engine.stop()
    cpu = cpu_name()
    lines = [f"decode step by part, ms (median of {args.repeats}); base {base_dir.name} ({args.quantize}), "
             f"{torch.get_num_threads()} threads, {cpu}, {datetime.now(timezone.utc):%Y-%m-%d}", "",
             "| batch | rows | step | " + " | ".join(PARTS) + " | linear ceiling | step / ceiling | prefill ms/token |",
             "|---" * (len(PARTS) + 6) + "|"]
    for batch, label, parts, prefill, ceiling in rows:
        cells = " | ".join(f"{parts.get(p, 0.0):.1f}" for p in PARTS)
        lines.append(f"| {batch} | {label} | {parts['step']:.1f} | {cells} | {ceiling:.1f} | "
                     f"{parts['step'] / ceiling:.1f}x | {prefill:.2f} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
