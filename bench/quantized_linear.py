"""Weight-only quantized linear layers on this CPU: which base weights make a decode step
fastest, and how far each is from fp32.

    python bench/quantized_linear.py [--batch 8 32] [--repeats 20] [--out FILE]

The default base's 30 layers' q/k/v/o/gate/up/down projections, timed back to back for a
batch of 8 and 32 tokens (what one decode step's base linear layers cost), per weight mode:

- fp32 / bf16: torch's F.linear (bf16: bf16 weights and activations)
- int8 weight-only: torch.ops.aten._weight_int8pack_mm (per-channel scales), activations
  fp32 and bf16
- int4 weight-only: torch.ops.aten._weight_int4pack_mm_for_cpu (group size 64, bf16)

bitsandbytes int8 / nf4 (`--quantize int8|nf4`) are measured end to end by bench/precision.py.

Besides the time, the largest relative error of the layers' outputs against fp32 (one
input batch), to see what a mode costs in accuracy before measuring answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import in_thread  # noqa: E402
from profile_step import PROJECTIONS  # noqa: E402
from serve import cpu_name, report  # noqa: E402

from hatrack import basemodel  # noqa: E402

GROUP = 64


def weights(base_dir: Path) -> list[torch.Tensor]:
    model, _ = basemodel.load_base(base_dir, "none", "cpu", torch.float32)
    return [getattr(getattr(layer, p), n).weight.detach().float().contiguous()
            for layer in model.model.layers for p, n in PROJECTIONS]


def int8_mode(ws: list[torch.Tensor], act: torch.dtype):
    packed = []
    for w in ws:
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        packed.append((q, scale.to(act)))

    def run(x: torch.Tensor, i: int) -> torch.Tensor:
        q, scale = packed[i]
        return torch.ops.aten._weight_int8pack_mm(x.to(act), q, scale)
    return run


def int4_mode(ws: list[torch.Tensor]):
    packed = []
    for w in ws:
        n, k = w.shape
        g = w.view(n, k // GROUP, GROUP)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        # the kernel computes (q - 8) * scale + zero, so zero is the group's value at q = 8
        zero = lo + 8 * scale
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [k/G, n, 2]
        packed.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz))

    def run(x: torch.Tensor, i: int) -> torch.Tensor:
        w, sz = packed[i]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, GROUP, sz)
    return run


def time_mode(run, inputs: list[torch.Tensor], repeats: int) -> float:
    """ms for every projection once on its input, median of repeats."""
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            run(x, i)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i, x in enumerate(inputs):
                run(x, i)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def error(run, inputs: list[torch.Tensor], ws: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        worst = 0.0
        for i, (x, w) in enumerate(zip(inputs, ws)):
            want = F.linear(x, w)
            got = run(x, i).float()
            worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def bench(args: argparse.Namespace) -> list[str]:
    base_dir = args.base_dir or basemodel.ensure_default_base()
    ws = weights(base_dir)
    w16 = [w.to(torch.bfloat16) for w in ws]
    modes = {
        "fp32 (F.linear)": lambda x, i: F.linear(x, ws[i]),
        "bf16 (F.linear)": lambda x, i: F.linear(x.to(torch.bfloat16), w16[i]),
        "int8 weight-only, fp32 act": int8_mode(ws, torch.float32),
        "int8 weight-only, bf16 act": int8_mode(ws, torch.bfloat16),
        f"int4 weight-only g{GROUP}, bf16 act": int4_mode(ws),
    }
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        inputs = [torch.randn(batch, w.shape[1], generator=gen) for w in ws]
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):  # modes take turns, so a noisy neighbour hits them alike
            for name, run in modes.items():
                times[name].append(time_mode(run, inputs, args.repeats))
        fp32 = statistics.median(times["fp32 (F.linear)"])
        for name, run in modes.items():
            ms = statistics.median(times[name])
            rows.append(f"| {batch} | {name} | {ms:.1f} | {fp32 / ms:.2f} | {error(run, inputs, ws):.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the converted default base")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = in_thread(bench, args)
    lines = [
        f"Quantized linear layers — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads — "
        f"`python bench/quantized_linear.py {' '.join(sys.argv[1:])}`",
        "",
        "The base's 210 projections once each (one decode step's base linear layers); medians of "
        f"{args.rounds} interleaved rounds of {args.repeats}.",
        "",
        "| batch | weights | ms | speed vs fp32 | max relative error vs fp32 |",
        "|---|---|---|---|---|",
        *rows,
    ]
    report(lines, args.out)


if __name__ == "__main__":
    main()
