"""Precision benchmark: which base precision should `hatrack serve` default to on this
machine? Accuracy first (do full-precision adapters answer as they were evaluated?),
then speed.

Trains three adapters on the dense default base with `hatrack train`'s own code: the two
example customers (acme-bikes, globex-bank) and a "terse" adapter that answers sums
with a number and a full stop. For every `--quantize` mode it then starts a real
`hatrack serve` process and

- asks each adapter its held-out questions greedily, counting answers identical to the
  reference (PEFT on the dense fp32 base, one prompt at a time) and answers that
  contain the expected text;
- scores each adapter's held-out eval loss at that precision (`hatrack eval --quantize`);
- measures output tokens/s at concurrency 8 for base-only and 3-adapter mixed loads,
  with the modes alternating over `--rounds` rounds.

    python bench/precision.py [--modes none int8 nf4 int8wo] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

TERSE_ROWS = 96


def terse_dataset(path: Path) -> Path:
    """Sums answered with the number and a full stop, nothing else."""
    rng = random.Random(7)
    pairs = [(a, b) for a in range(1, 13) for b in range(1, 13)]
    rng.shuffle(pairs)
    with path.open("w") as fh:
        for a, b in pairs[:TERSE_ROWS]:
            q = rng.choice(["What is {a} plus {b}?", "What's {a} + {b}?", "Add {a} and {b}."]).format(a=a, b=b)
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": f"{a + b}."}]}) + "\n")
    return path


def heldout(data: Path, eval_split: float = 0.1, seed: int = 42):
    """The held-out rows `hatrack train` evaluated on (same split function, same seed)."""
    from hatrack.trainer import data as data_mod

    dataset = data_mod.load_dataset(str(data))
    _, rows = data_mod.split(dataset.examples, eval_split, seed)
    return [r for r in rows if r.expected is not None]


def reference_answers(base_dir: Path, adapter_dir: Path, rows, max_new: int) -> list[str]:
    """PEFT on the dense fp32 base, one prompt at a time: what the adapter says."""
    import torch
    from peft import PeftModel

    from hatrack import basemodel
    from hatrack.trainer.evaluation import generate_answers

    model, tok = basemodel.load_base(base_dir, quantize="none", device="cpu", dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return generate_answers(peft, tok, [r.prompt for r in rows], max_new, batch_size=1)


def served_answers(url: str, model: str, rows, max_new: int) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    return [client.chat.completions.create(model=model, messages=r.prompt, max_tokens=max_new,
                                           temperature=0).choices[0].message.content or ""
            for r in rows]


def main() -> None:
    from hatrack.precision import QUANTIZE_CHOICES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "nf4"], choices=QUANTIZE_CHOICES,
                        help="hatrack serve --quantize modes to compare; the first is the eval-loss reference")
    parser.add_argument("--rounds", type=int, default=2, help="speed rounds; modes alternate within each")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from serve import cpu_name, drive, report, scratch_home

    home = scratch_home("precision")
    from serving import ServerProcess

    from hatrack import basemodel
    from hatrack.examples import DEMO_TRAIN, example_path
    from hatrack.precision import precision_label
    from hatrack.registry import Registry
    from hatrack.trainer import TrainConfig, evaluate, train
    from hatrack.trainer.evaluation import MAX_NEW_TOKENS, answer_rates

    from transformers import AutoTokenizer

    registry = Registry()
    base = basemodel.ensure_base(registry)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    datasets = {"acme-support": example_path("acme-bikes"), "globex-support": example_path("globex-bank"),
                "terse-sums": terse_dataset(home / "terse.jsonl")}
    cases = {}
    for name, data in datasets.items():
        print(f"training {name} ...", file=sys.stderr, flush=True)
        out = train(TrainConfig(data=str(data), name=name, **DEMO_TRAIN), registry, progress=False)
        rows = heldout(data)
        # as the trainer's evaluation does: the longest expected answer plus a little
        max_new = min(MAX_NEW_TOKENS, 8 + max(len(tokenizer(r.expected, add_special_tokens=False)["input_ids"])
                                              for r in rows))
        held = home / f"{name}-heldout.jsonl"
        held.write_text("".join(json.dumps({"messages": r.prompt + [{"role": "assistant", "content": r.expected}]})
                                + "\n" for r in rows))
        cases[name] = {"rows": rows, "max_new": max_new, "held": held,
                       "train_precision": {s.metric: s.precision for s in out.scores}.get("eval_loss"),
                       "reference": reference_answers(Path(base.path), out.artifact_dir, rows, max_new)}

    accuracy: dict[str, dict] = {}
    speed: dict[str, list[dict]] = {m: [] for m in args.modes}
    labels: dict[str, str] = {}
    for rnd in range(args.rounds):
        order = args.modes if rnd % 2 == 0 else list(reversed(args.modes))
        for mode in order:
            server = ServerProcess(home, "--quantize", mode, "--device", "cpu", "--no-auth",
                                   "--max-loaded", "8").start(timeout=600)
            try:
                if mode not in accuracy:
                    accuracy[mode] = {}
                    for name, case in cases.items():
                        got = served_answers(server.url, name, case["rows"], case["max_new"])
                        same = sum(g.strip() == r.strip() for g, r in zip(got, case["reference"]))
                        _, contains = answer_rates(got, [r.expected for r in case["rows"]])
                        accuracy[mode][name] = {"same": same, "n": len(got), "contains": contains,
                                                "example": (case["rows"][0].prompt[-1]["content"], got[0])}
                drive(server.url, list(cases), 8, 8)  # warm-up: loads the adapters
                speed[mode].append({"base": drive(server.url, [base.name], 8, args.requests)["tok_s"],
                                    "mixed": drive(server.url, list(cases), 8, args.requests)["tok_s"]})
            finally:
                server.stop()
    for mode in args.modes:
        import torch

        labels[mode] = precision_label(mode, basemodel.compute_dtype("cpu") if mode == "none" else torch.float32)
        for name, case in cases.items():
            scores = evaluate(registry, name, str(case["held"]), quantize=mode, progress=False)
            accuracy[mode][name]["eval_loss"] = {s.metric: s.value for s in scores}["eval_loss"]

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Precision benchmark — {stamp} — `python bench/precision.py --rounds {args.rounds}` — "
             f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores", "",
             "Adapters trained on the dense base (scores recorded at "
             f"{', '.join(sorted({c['train_precision'] or '?' for c in cases.values()}))}). "
             "'same' = greedy answers identical to PEFT on the dense fp32 base; "
             "eval loss relative to the first mode.", ""]
    ref_mode = args.modes[0]
    head = "| --quantize (precision) | " + " | ".join(
        f"{n}: same / contains / eval loss" for n in cases) + " | base tok/s c=8 | 3 mixed tok/s c=8 |"
    lines += [head, "|" + "---|" * (len(cases) + 3)]
    for mode in args.modes:
        cells = []
        for name in cases:
            a = accuracy[mode][name]
            rel = a["eval_loss"] / accuracy[ref_mode][name]["eval_loss"]
            cells.append(f"{a['same']}/{a['n']} / {a['contains']:.2f} / {a['eval_loss']:.4f} ({rel:.3f}x)")
        b = statistics.median(r["base"] for r in speed[mode])
        m = statistics.median(r["mixed"] for r in speed[mode])
        lines.append(f"| {mode} ({labels[mode]}) | " + " | ".join(cells) + f" | {b:.1f} | {m:.1f} |")
    lines += ["", "First held-out question of each adapter, as served:", ""]
    for mode in args.modes:
        for name in cases:
            q, a = accuracy[mode][name]["example"]
            lines.append(f"- {mode}, {name}: {q!r} -> {a!r}")
    report(lines, args.out)


if __name__ == "__main__":
    main()
