"""The engine's bf16 product (csrc/linear_cpu.cpp) beside oneDNN's packed product and
F.linear, on the default base's projection shapes.

    python bench/dot_linear.py [--rows 1 8 16 32 64 160] [--rounds 5] [--out FILE]

One decode step's base linear layers: 30 layers x q/k/v/o/gate/up/down with distinct
random bf16 weights (210 weights, 212 MB, so they come from memory as in a real step, not
from cache), called back to back for a batch of `rows` tokens. The three products run in
interleaved rounds (a noisy neighbour hits them alike); medians of the rounds. Each row
count also checks that the engine's product gives every row the bits F.linear gives it
among 64 rows, on every weight (F.linear's own one-row product may differ from those).
Needs a CPU with AVX-512 BF16 and the compiled CPU kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import cpu_name, report  # noqa: E402

from hatrack.server.engine import packed_linear  # noqa: E402

HIDDEN, INTER, KV = 576, 1536, 192  # the default base (SmolLM2-135M)
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
                (HIDDEN, INTER)]  # [out, in] of q, k, v, o, gate, up, down
LAYERS = 30
MINE = "engine's product"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 16, 32, 64, 160])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    kernel = packed_linear.dot_kernel()
    if kernel is None or not packed_linear.bf16_supported():
        raise SystemExit("error: the engine's bf16 product needs AVX-512 BF16 and the compiled CPU kernels here")
    gen = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * LAYERS
    weights = [(torch.randn(o, i, generator=gen) * 0.05).to(torch.bfloat16) for o, i in shapes]
    pairs = [kernel.dot_pack(w) for w in weights]
    blocks = [packed_linear._dot_block(kernel, w, p) for w, p in zip(weights, pairs)]
    if None in blocks:
        raise SystemExit("error: no sum block gives the engine's product F.linear's bits here")
    onednn = [packed_linear._reorder(w) for w in weights]
    sides = {
        "F.linear": lambda xs: [F.linear(xs[w.shape[1]], w) for w in weights],
        "oneDNN packed": lambda xs: [packed_linear._multiply(xs[w.shape[1]], p, None) for w, p in zip(weights, onednn)],
        MINE: lambda xs: [kernel.dot_linear(xs[w.shape[1]], p, b)
                                        for w, p, b in zip(weights, pairs, blocks)],
    }
    lines = [f"bf16 projections — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {cpu_name()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__} — `python bench/dot_linear.py "
             f"{' '.join(sys.argv[1:])}`", "",
             f"{len(weights)} projections of the default base's shapes, distinct weights, back to back; ms, "
             f"medians of {args.rounds} interleaved rounds.", "",
             "| rows | F.linear | oneDNN packed | engine's product | oneDNN / engine's | same bits as F.linear |",
             "|---|---|---|---|---|---|"]
    with torch.no_grad():
        for rows in args.rows:
            xs = {n: torch.randn(rows, n, generator=gen).to(torch.bfloat16) for n in (HIDDEN, INTER)}
            # the reference: F.linear's bits for these rows among 64 (its one-row product may differ)
            among = {n: torch.cat([x, torch.randn(64, n, generator=gen).to(torch.bfloat16)]) for n, x in xs.items()}
            same = all(torch.equal(a, b[:rows]) for a, b in zip(sides[MINE](xs), sides["F.linear"](among)))
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, run in sides.items():
                    start = time.perf_counter()
                    run(xs)
                    times[name].append(1000 * (time.perf_counter() - start))
            ms = {name: statistics.median(t) for name, t in times.items()}
            mine, dnn = ms[MINE], ms["oneDNN packed"]
            lines.append(f"| {rows} | {ms['F.linear']:.1f} | {dnn:.1f} | {mine:.1f} | {dnn / mine:.2f} | "
                         f"{'yes' if same else 'no'} |")
            print(lines[-1], file=sys.stderr, flush=True)
    report(lines, args.out)


if __name__ == "__main__":
    main()
