"""Time to first token with a tenant's long system prompt: prefix cache off and on.

    python bench/prefix.py [--system-tokens 1000] [--requests 8] [--repeats 3] [--out FILE]

The real default base at the CPU serving default, one random rank-16 all-linear adapter
(bench/engine.py's). Every request is the adapter's chat: the same system prompt of about
--system-tokens tokens, then one of 8 short questions; 16 new tokens, greedy, one request
at a time. Two engines, one with the prefix cache off and one with it on (its cache warmed
by two requests first), take turns request by request. Reported: median TTFT of each, the
ratio, the prompt tokens taken from the cache, and whether every answer is the same on
both (it must be: a cached prefix ends on a prefill chunk boundary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import QUESTIONS, in_thread, make_adapters  # noqa: E402
from serve import cpu_name, report  # noqa: E402

from hatrack import basemodel  # noqa: E402
from hatrack.precision import default_serving_quantize  # noqa: E402
from hatrack.server.engine import AdapterSpec, Engine, SamplingParams, load_peft_adapter  # noqa: E402

NEW_TOKENS = 16


def system_prompt(tokenizer, tokens: int) -> str:
    """A support policy of numbered rules, about `tokens` tokens long."""
    rules, i = [], 0
    while len(tokenizer(" ".join(rules))["input_ids"]) < tokens:
        i += 1
        rules.append(f"Rule {i}: when a customer asks about order {1000 + 7 * i}, check the warehouse "
                     f"log for shelf {i % 13} and answer within {i % 5 + 1} hours.")
    return "You are the support assistant of Acme Bikes. " + " ".join(rules)


def ttft(engine: Engine, prompt: list[int], spec: AdapterSpec) -> tuple[float, list[int]]:
    handle = engine.submit(prompt, spec, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    start = time.perf_counter()
    while not handle.tokens and not handle.finished:
        time.sleep(0.002)
    first = time.perf_counter() - start
    return first, handle.result(timeout=600)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the converted default base")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base_dir = args.base_dir or basemodel.ensure_default_base()
    quantize = default_serving_quantize("cpu")
    model, tokenizer = in_thread(basemodel.load_base, base_dir, quantize, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = in_thread(make_adapters, base_dir, Path(tmp))[0]
        spec = AdapterSpec("a0", lambda: load_peft_adapter(folder))
        system = system_prompt(tokenizer, args.system_tokens)
        asks = [tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(args.requests)]
        off = Engine(model, tokenizer, max_batch=8, prefix_cache_bytes=0)
        on = Engine(model, tokenizer, max_batch=8)
        off.start()
        on.start()
        for engine in (off, on):  # adapter loaded; on: the prefix seen twice, so kept
            for prompt in asks[:2]:
                ttft(engine, prompt, spec)
        times = {"off": [], "on": []}
        same = True
        for _ in range(args.repeats):
            for prompt in asks:
                t_off, a_off = ttft(off, prompt, spec)
                t_on, a_on = ttft(on, prompt, spec)
                times["off"].append(t_off)
                times["on"].append(t_on)
                same &= a_off == a_on
        stats = on.stats()
        off.stop()
        on.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    lengths = sorted(len(p) for p in asks)
    lines = [
        f"Prefix cache — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} — `python bench/prefix.py {' '.join(sys.argv[1:])}`",
        "",
        f"Base {base_dir.name} ({quantize}), one rank-16 adapter; prompts of {lengths[0]}–{lengths[-1]} tokens "
        f"sharing a system prompt; {NEW_TOKENS} new tokens, greedy, one request at a time; "
        f"{len(times['on'])} requests per side, alternating.",
        "",
        "| prefix cache | TTFT p50 s | prompt tokens from the cache per request |",
        "|---|---|---|",
        f"| off | {med['off']:.3f} | 0 |",
        f"| on | {med['on']:.3f} | {stats.prefix_cache_tokens / max(stats.prefix_cache_hits, 1):.0f} |",
        "",
        f"TTFT on / off: **{med['on'] / med['off']:.2f}**; every answer the same on both: **{same}**.",
    ]
    report(lines, args.out)
    if not same:
        raise SystemExit("error: an answer differed with the prefix cache on")


if __name__ == "__main__":
    main()
