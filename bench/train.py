"""Training benchmark: hatrack's trainer against the plain tutorial recipe.

Both train the same LoRA (r=16, alpha=32, all-linear) on the same base and rows,
for the same steps, batch size and learning rate, each in its own process (so peak
RSS is its own):

- recipe:  TRL SFTTrainer with its defaults on a `messages` dataset (fp32 on CPU,
           gradient checkpointing on, padded batches, loss on every token), as a
           tutorial would run it on a CPU;
- hatrack: hatrack.trainer's loop (bf16 compute where the CPU has it, NF4 base where
           bitsandbytes works, padding-free batches, loss on answer tokens).

Reported: training tokens/s (input tokens, padding not counted), peak RSS, and the
eval loss on the same held-out rows (answer tokens, hatrack.trainer.evaluation).

    python bench/train.py [--steps 30] [--data acme-bikes] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _base_dir() -> Path:
    cached = REPO / ".test-cache" / "bases" / "smollm2-135m"
    if (cached / "config.json").is_file():
        return cached
    from hatrack import basemodel

    return basemodel.ensure_default_base()


def _rows(example: str, seed: int):
    from hatrack.examples import example_path
    from hatrack.trainer import data

    dataset = data.load_dataset(str(example_path(example)))
    return data.split(dataset.examples, 0.1, seed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _heldout_loss(model, tokenizer, heldout) -> float:
    from hatrack.trainer import evaluation, render

    eot = render.end_of_turn_ids(tokenizer)
    encoded = [render.encode(tokenizer, e, eot, 1024) for e in heldout]
    return evaluation.eval_loss(model, encoded, tokenizer.pad_token_id)


def run_recipe(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train_rows, heldout = _rows(args.data, args.seed)
    base = _base_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dataset = datasets.Dataset.from_list([{"messages": e.messages} for e in train_rows])
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="recipe-"),
        bf16=False,  # the CPU tutorial path: fp32
        use_cpu=True,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",  # measurement only
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen
    trainer.model.eval()
    return {
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "eval_loss": _heldout_loss(trainer.model, tokenizer, heldout), "peak_rss_mb": _peak_rss_mb(),
        "setup": "fp32, gradient checkpointing, padded batches, loss on all tokens",
    }


def run_hatrack(args) -> dict:
    from transformers import AutoTokenizer, set_seed

    from hatrack.trainer import loop, render, runtime as rt

    train_rows, heldout = _rows(args.data, args.seed)
    base = _base_dir()
    runtime = rt.choose_runtime(None if args.quantize == "auto" else args.quantize)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eot = render.end_of_turn_ids(tokenizer)
    encoded = [render.encode(tokenizer, e, eot, 1024) for e in train_rows]
    set_seed(args.seed)
    model, tokenizer = rt.load_trainable(base, runtime, rt.LoraSpec(16, 32, "all-linear"))
    settings = loop.LoopSettings(epochs=1, max_steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                 max_length=1024, seed=args.seed, save_steps=None)
    result = loop.run(model, tokenizer, encoded, runtime, settings, Path(tempfile.mkdtemp(prefix="hatrack-")),
                      progress=False)
    model.eval()
    return {
        "tokens": result.tokens, "seconds": result.runtime_s, "tokens_per_s": result.tokens_per_s,
        "eval_loss": _heldout_loss(model, tokenizer, heldout), "peak_rss_mb": _peak_rss_mb(),
        "setup": f"{runtime.device} {str(runtime.dtype).replace('torch.', '')} compute, quantize {runtime.quantize}, "
                 "padded batches, answer-only loss",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default="acme-bikes", help="example dataset name")
    parser.add_argument("--quantize", default="auto", help="hatrack's --quantize (auto = its default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", choices=["recipe", "hatrack"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.only:
        out = run_recipe(args) if args.only == "recipe" else run_hatrack(args)
        print("RESULT " + json.dumps(out), flush=True)
        return

    results = {}
    for which in ("hatrack", "recipe"):
        cmd = [sys.executable, __file__, "--only", which] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
        results[which] = json.loads(line[len("RESULT "):])
        r = results[which]
        print(f"{which:8s} {r['tokens_per_s']:7.1f} tok/s  {r['tokens']:6d} tokens in {r['seconds']:6.1f}s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB  eval loss {r['eval_loss']:.4f}  [{r['setup']}]", flush=True)
    h, r = results["hatrack"], results["recipe"]
    speedup = h["tokens_per_s"] / r["tokens_per_s"]
    loss_ratio = h["eval_loss"] / r["eval_loss"]
    print(f"speed-up {speedup:.2f}x (target >= 1.5x), eval loss ratio {loss_ratio:.3f} (target <= 1.05)")
    results["summary"] = {"speedup": speedup, "eval_loss_ratio": loss_ratio, "steps": args.steps,
                          "batch_size": args.batch_size, "lr": args.lr, "data": args.data,
                          "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
