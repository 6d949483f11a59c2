"""Throughput of hatrack's engine on the real default base.

    python bench/engine.py [--precision nf4-bf16|fp32 ...] [--batch 8 32] [--repeats 3]

(a) base only, batched through the engine; (b) a batch mixing 8 distinct adapters
(rank 16, all-linear) through the engine; (c) the naive baseline: one request at a
time through HF PeftModel with all 8 adapters loaded and set_adapter before each.
32 new tokens per request, greedy, no stop token (every request makes all 32).
Each measurement is repeated and the median reported; runs of (a), (b), (c) are
interleaved so a noisy neighbour hits them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hatrack import basemodel
from hatrack.server.engine import AdapterSpec, Engine, SamplingParams, load_peft_adapter

N_ADAPTERS, RANK, NEW_TOKENS = 8, 16, 32
QUESTIONS = [
    "How do I reset my password?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three fruits that are red.",
    "Why is the sky blue?",
    "Give me a tip for writing clean Python code.",
    "What does HTTP status 404 mean?",
]


def make_adapters(base_dir: Path, root: Path) -> list[Path]:
    """8 random PEFT adapters saved as real folders (what the registry would hold)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        peft_model.add_adapter(f"a{i}", config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(root)
    # PEFT writes the first adapter at the root and the others in sub-folders
    folders = []
    for i in range(N_ADAPTERS):
        folder = root / f"a{i}"
        if not (folder / "adapter_config.json").is_file():
            folder.mkdir(exist_ok=True)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                (root / f).rename(folder / f)
        folders.append(folder)
    return folders


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    return out


def in_thread(fn, *args):
    """Run fn on a short-lived thread and return its result. OpenMP gives every thread
    that runs torch ops its own thread team, and a team left on another thread (this
    one's, say) slows the engine's scheduler thread by ~1.6x on 2 cores. `hatrack serve`
    does all its torch work on the load and engine threads; so does this benchmark."""
    out: dict = {}

    def target() -> None:
        out["result"] = fn(*args)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return out["result"]


def run_engine(engine: Engine, jobs) -> tuple[float, int]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    start = time.perf_counter()
    handles = [engine.submit(p, a, params) for p, a in jobs]
    tokens = sum(len(h.result(timeout=600)[0]) for h in handles)
    return time.perf_counter() - start, tokens


def run_peft_sequential(peft_model, tokenizer, jobs) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for prompt, name in jobs:
            peft_model.set_adapter(name)
            out = peft_model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            tokens += out.shape[1] - len(prompt)
    return time.perf_counter() - start, tokens


def bench(
    precision: str, batches: list[int], repeats: int, base_dir: Path, folders: list[Path], notes: list[str]
) -> list[str]:
    from peft import PeftModel

    quantize, dtype = {"nf4-bf16": ("nf4", torch.bfloat16), "fp32": ("none", torch.float32)}[precision]
    model, tokenizer = in_thread(basemodel.load_base, base_dir, quantize, "cpu", dtype)
    engine = Engine(model, tokenizer, max_loaded=N_ADAPTERS, max_batch=max(batches))
    engine.start()
    specs = [AdapterSpec(f"a{i}", (lambda f=f: load_peft_adapter(f))) for i, f in enumerate(folders)]
    # warm up: every adapter into its slot (load times are reported on their own)
    run_engine(engine, [(p, s) for p, s in zip(prompts(tokenizer, N_ADAPTERS), specs)])
    load_times = engine.stats().adapter_load_seconds

    def load_peft():
        baseline_model, _ = basemodel.load_base(base_dir, quantize, "cpu", dtype)
        peft = PeftModel.from_pretrained(baseline_model, folders[0], adapter_name="a0")
        for i, f in enumerate(folders[1:], start=1):
            peft.load_adapter(f, adapter_name=f"a{i}")
        return peft.eval()

    peft_model = in_thread(load_peft)

    lines = []
    rc = None  # (c) does not depend on the batch: one request at a time
    for batch in batches:
        ps = prompts(tokenizer, batch)
        base_jobs = [(p, None) for p in ps]
        mixed_jobs = [(p, specs[i % N_ADAPTERS]) for i, p in enumerate(ps)]
        seq_jobs = [(p, f"a{i % N_ADAPTERS}") for i, p in enumerate(ps[:N_ADAPTERS])]
        a, b, c = [], [], []
        for _ in range(repeats):
            t, n = run_engine(engine, base_jobs)
            a.append(n / t)
            t, n = run_engine(engine, mixed_jobs)
            b.append(n / t)
            if batch == batches[0]:
                t, n = in_thread(run_peft_sequential, peft_model, tokenizer, seq_jobs)
                c.append(n / t)
        ra, rb = statistics.median(a), statistics.median(b)
        row = f"| {precision} | {batch} | {ra:.1f} | {rb:.1f} | "
        if c:
            rc = statistics.median(c)
            row += f"{rc:.1f} | {rb / ra:.2f} | {rb / rc:.1f} |"
        else:
            row += f"{rc:.1f} (from batch {batches[0]}) | {rb / ra:.2f} | {rb / rc:.1f} |"
        print(row, "runs a/b/c:", [round(x, 1) for x in a], [round(x, 1) for x in b], [round(x, 1) for x in c], flush=True)
        lines.append(row)
    notes.append(
        f"- {precision}: adapter load (disk + checks) {statistics.median(load_times) * 1000:.0f} ms median; "
        f"{engine.stats().steps} decode steps in all"
    )
    engine.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", nargs="+", default=["nf4-bf16"], choices=["nf4-bf16", "fp32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the converted default base")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_dir = args.base_dir or basemodel.ensure_default_base()
    lines = [
        "| precision | batch | (a) base batched tok/s | (b) 8 adapters mixed tok/s | (c) PEFT one-at-a-time tok/s | b/a | b/c |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = in_thread(make_adapters, base_dir, Path(tmp))
        for precision in args.precision:
            lines += bench(precision, args.batch, args.repeats, base_dir, folders, notes)
    lines += [""] + notes
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    header = [
        "# Engine benchmark",
        "",
        f"- command: `python bench/engine.py {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average before the run {os.getloadavg()[0]:.2f}",
        f"- {N_ADAPTERS} random adapters, rank {RANK}, all-linear; {NEW_TOKENS} new tokens per request, greedy; "
        f"median of {args.repeats} interleaved runs; (c) always runs 8 requests one at a time",
        "",
    ]
    if args.out:
        args.out.write_text("\n".join(header + lines) + "\n")
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
