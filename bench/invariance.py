"""Batch invariance on the real base: does a greedy answer depend on who shares its batch?

The default base, 8 random near-base rank-16 all-linear adapters (bench/serve.py's), 2
random adapters strong enough to change every answer, and the base itself: 11 models, each
asked `--sums` sums ("What is 17 + 25?"), so 99 requests by default. For every `--quantize`
mode a real `hatrack serve` answers each request alone (one at a time), then all of them at
once from `--concurrency` client threads; the table counts answers that differ.

    python bench/invariance.py [--quantize auto,int8wo,nf4,int8] [--sums 9] [--concurrency 32] \\
        [--copies 1] [--out FILE]

With `--copies N` the batched pass sends each request N times, side by side (the copies
of one prompt share its prefill, see hatrack/server/engine/shared_prompts.py), and every
copy is compared with the answer alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

MAX_TOKENS = 32


def questions(n: int) -> list[str]:
    rng = random.Random(7)
    return [f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}? Answer in one sentence." for _ in range(n)]


def ask(url: str, model: str, question: str) -> str:
    import httpx

    reply = httpx.post(f"{url}/v1/chat/completions", timeout=900, json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS,
        "temperature": 0})
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


def counter(url: str, name: str) -> int:
    """An engine counter from /metrics: hatrack_engine_fused_steps_total (decode steps that
    also prefilled arriving prompts), hatrack_engine_shared_prompts_total (prompts that
    copied another request's prefill)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(f"{name} "):
            return int(float(line.split()[1]))
    return 0


def precision_of(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if "ready: base" in line and "precision " in line:
            return line.split("precision ", 1)[1].split(",", 1)[0]
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="auto,int8wo,nf4,int8",
                        help="hatrack serve --quantize modes, comma-separated (default: %(default)s)")
    parser.add_argument("--sums", type=int, default=9, help="questions per model (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads for the batched pass")
    parser.add_argument("--copies", type=int, default=1, help="times each request is sent in the batched pass")
    parser.add_argument("--out", type=Path, default=None, help="write the table to this file too")
    args = parser.parse_args()

    from serve import cpu_name, make_adapters, report, scratch_home

    home = scratch_home("invariance")
    from conftest import write_peft_adapter
    from serving import ServerProcess

    from hatrack import basemodel
    from hatrack.registry import Registry

    registry = Registry()
    base = basemodel.ensure_base(registry)
    models = [base.name]
    for i, folder in enumerate(make_adapters(Path(base.path), home / "src", 8)):
        registry.register(folder, name=f"near{i}", base=base.name)
        models.append(f"near{i}")
    for i in range(2):
        folder = write_peft_adapter(Path(base.path), home / "src" / f"strong{i}", rank=16, alpha=32, seed=200 + i,
                                    scale=0.3)
        registry.register(folder, name=f"strong{i}", base=base.name)
        models.append(f"strong{i}")
    jobs = [(m, q) for q in questions(args.sums) for m in models]

    lines = [f"batch invariance on {base.name}, {len(models)} models x {args.sums} sums = {len(jobs)} greedy requests "
             f"of {MAX_TOKENS} tokens, each alone then all at concurrency {args.concurrency}"
             + (f", each sent {args.copies} times side by side" if args.copies > 1 else "") + f"; {cpu_name()}, "
             f"{os.cpu_count()} cores, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", "| --quantize | precision | requests | differ from alone | differing (model: question #) "
             "| steps that also prefilled (batched pass) | prompts shared (batched pass) |",
             "|---|---|---|---|---|---|---|"]
    for mode in args.quantize.split(","):
        print(f"{mode}: starting", file=sys.stderr, flush=True)
        server = ServerProcess(home, "--quantize", mode, "--device", "cpu", "--no-auth", "--max-batch", "32",
                               "--max-loaded", "16", "--log-level", "info").start(timeout=900)
        try:
            alone = [ask(server.url, m, q) for m, q in jobs]
            print(f"{mode}: {len(jobs)} answered alone", file=sys.stderr, flush=True)
            fused_before = counter(server.url, "hatrack_engine_fused_steps_total")
            shared_before = counter(server.url, "hatrack_engine_shared_prompts_total")
            sent = [job for job in jobs for _ in range(args.copies)]  # a request's copies side by side
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                together = list(pool.map(lambda job: ask(server.url, *job), sent))
            fused = counter(server.url, "hatrack_engine_fused_steps_total") - fused_before
            shared = counter(server.url, "hatrack_engine_shared_prompts_total") - shared_before
            precision = precision_of(server.log)
        finally:
            server.stop()
        # a request differs if any of its copies does
        differ = sorted({i // args.copies for i, b in enumerate(together) if b != alone[i // args.copies]})
        named = ", ".join(f"{jobs[i][0]}: {i // len(models)}" for i in differ[:6]) + (" ..." if len(differ) > 6 else "")
        print(f"{mode}: {len(differ)} of {len(jobs)} differ", file=sys.stderr, flush=True)
        lines.append(f"| {mode} | {precision} | {len(jobs)} | {len(differ)} | {named or '-'} | {fused} | {shared} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
