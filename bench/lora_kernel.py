"""The CPU LoRA kernel alone: one decode step's 120 calls (30 layers x 4 groups) on the
default base's shapes, rank 16, bf16 weights and activations, warm caches.

    python bench/lora_kernel.py [--rows 8 32] [--repeats 7]

Cases: rows spread over 8 adapters, all rows on one adapter, no row with an adapter (the
call's fixed cost). What it leaves out, by design: the engine around the calls, and the
cold caches of a real step (where the base's ~270 MB of weights pass between two calls).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hatrack.server.engine import cpu_kernel  # noqa: E402

LAYERS, RANK, SLOTS = 30, 16, 9
HIDDEN, INTER, KV = 576, 1536, 192
GROUPS = {"qkv": (HIDDEN, [HIDDEN, KV, KV]), "o": (HIDDEN, [HIDDEN]), "gate_up": (HIDDEN, [INTER, INTER]),
          "down": (INTER, [HIDDEN])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    kernel = cpu_kernel.load()
    if kernel is None:
        raise SystemExit("error: the CPU kernel cannot be built here (see the log above)")
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    bank = {g: ((torch.randn(LAYERS, SLOTS, n_in, RANK * len(outs), generator=gen) * 0.02).to(dtype),
                [(torch.randn(LAYERS, SLOTS, RANK, o, generator=gen) * 0.02).to(dtype) for o in outs])
            for g, (n_in, outs) in GROUPS.items()}
    views = {(layer, g): (a[layer], [b[layer] for b in bs]) for layer in range(LAYERS) for g, (a, bs) in bank.items()}
    print(f"CPU LoRA kernel, one decode step (120 calls), rank {RANK}, bf16, {torch.get_num_threads()} threads")
    print("| rows | adapters | ms per step (median) |\n|---|---|---|")
    for n in args.rows:
        for label, slot_of in (("8", lambda r: 1 + r % 8), ("1", lambda r: 1), ("none", lambda r: 0)):
            slots = torch.tensor([slot_of(r) for r in range(n)], dtype=torch.int64)
            xs = {g: torch.randn(n, n_in, generator=gen).to(dtype) for g, (n_in, _) in GROUPS.items()}
            ys = {g: [torch.zeros(n, o, dtype=dtype) for o in outs] for g, (_, outs) in GROUPS.items()}

            def step() -> None:
                for layer in range(LAYERS):
                    for g in GROUPS:
                        a, bs = views[layer, g]
                        kernel.lora_decode(xs[g], slots, a, bs, ys[g], RANK)

            step()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            print(f"| {n} | {label} | {1000 * statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
