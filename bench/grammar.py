"""Cost of grammar-constrained rows in the engine's decode step.

    python bench/grammar.py [--batch 16] [--tokens 32] [--repeats 3] [--quantize none|nf4|int8|int8wo]

One batch of `--batch` requests to the base, greedy, run three ways: 0%, 50% and 100%
of its rows constrained to a JSON schema (llguidance masks, engine/constraints.py).
The schema is an array of short strings of up to 64 items, so a constrained row keeps
going for the whole `--tokens` instead of finishing early. Reported per share: the mean
decode step (engine stats: decode seconds / steps) and its cost over 0%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import report  # noqa: E402

from hatrack import basemodel  # noqa: E402
from hatrack.precision import QUANTIZE_CHOICES  # noqa: E402
from hatrack.chat_format import end_of_turn_ids  # noqa: E402
from hatrack.server.engine import Engine, SamplingParams  # noqa: E402
from hatrack.server.engine.constraints import GrammarCompiler  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 64}
SHARES = (0.0, 0.5, 1.0)


def in_thread(fn, *args):
    """Run torch work on a short-lived thread, as `hatrack serve` does (see bench/engine.py)."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn(*args)))
    thread.start()
    thread.join()
    return out["result"]


def step_seconds(engine: Engine, prompt: list[int], batch: int, share: float, tokens: int, grammar) -> float:
    """Mean decode step of one batch with `share` of its rows constrained."""
    constrained = round(batch * share)
    before = engine.stats()
    handles = [
        engine.submit(prompt, None, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                   constraint=grammar if i < constrained else None))
        for i in range(batch)
    ]
    for handle in handles:
        handle.result(timeout=600)
    after = engine.stats()
    steps = after.steps - before.steps
    return (after.decode_seconds - before.decode_seconds) / steps if steps else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the converted default base")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()

    base_dir = args.base_dir or basemodel.ensure_default_base()
    model, tokenizer = in_thread(basemodel.load_base, base_dir, args.quantize, "cpu")
    engine = Engine(model, tokenizer, max_batch=args.batch)
    engine.start()
    grammar = GrammarCompiler(tokenizer, tuple(end_of_turn_ids(tokenizer))).json_schema(SCHEMA)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List some fruits as JSON."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    try:
        step_seconds(engine, prompt, args.batch, 1.0, 4, grammar)  # warm up
        runs = {share: [] for share in SHARES}
        for _ in range(args.repeats):
            for share in SHARES:  # interleaved, so a noisy neighbour hits every share alike
                runs[share].append(step_seconds(engine, prompt, args.batch, share, args.tokens, grammar))
    finally:
        engine.stop()
    free = statistics.median(runs[0.0])
    lines = [f"decode step, batch {args.batch}, {args.tokens} tokens, base {base_dir.name} ({args.quantize}), "
             f"median of {args.repeats}", "", "| rows under a JSON schema | ms / step | vs 0% |", "|---|---|---|"]
    for share in SHARES:
        ms = statistics.median(runs[share])
        lines.append(f"| {share:.0%} | {1000 * ms:.2f} | {ms / free:.2f}x |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
