"""Serving benchmark: hatrack's server over the OpenAI API vs the naive PEFT recipe.

Starts `hatrack serve` as its own process (loopback) on the default base with 8
distinct random adapters, drives it with concurrent streaming clients through the
official openai client, then runs the naive baseline in this process: one request at a
time, a PeftModel holding the 8 adapters and `set_adapter` before each `generate`.
Same base precision on both sides.

    python bench/serve.py [--quantize nf4|none|int8wo] [--device cpu|cuda] [--concurrency 8 32] [--requests 32] [--out FILE]

Prints a markdown table (and writes it to --out).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

QUESTION = "Write one sentence about bicycles and banks."
NEW_TOKENS = 32


def scratch_home(name: str) -> Path:
    """A fresh HATRACK_HOME for one benchmark run, set in this process's environment (its
    servers inherit it): a SQLite registry there, never the user's HATRACK_DB_URL, and the
    default base converted once into the test suite's cache."""
    home = Path(tempfile.mkdtemp(prefix=f"hatrack-{name}-"))
    os.environ["HATRACK_HOME"] = str(home)
    os.environ.pop("HATRACK_DB_URL", None)
    os.environ.setdefault("HATRACK_BASES_DIR", str(Path(__file__).resolve().parent.parent / ".test-cache" / "bases"))
    return home


def make_adapters(base_dir: Path, out: Path, n: int) -> list[Path]:
    from conftest import write_peft_adapter

    return [write_peft_adapter(base_dir, out / f"a{i}", rank=16, alpha=32, seed=100 + i, scale=0.02)
            for i in range(n)]


def drive(url: str, models: list[str], concurrency: int, total: int) -> dict:
    """`total` streaming requests from `concurrency` client threads, models round-robin."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = None
        tokens = 0
        stream = client.chat.completions.create(
            model=models[i % len(models)], messages=[{"role": "user", "content": QUESTION}],
            max_tokens=NEW_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return time.perf_counter() - start, first or 0.0, tokens

    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    wall = time.perf_counter() - started
    return _summary([r[0] for r in results], sum(r[2] for r in results), wall,
                    ttft_p50=statistics.median(r[1] for r in results))


class NaiveBaseline:
    """The tutorial way: one PeftModel, set_adapter before each request, one at a time."""

    def __init__(self, base_dir: Path, adapters: list[Path], quantize: str, device: str = "cpu") -> None:
        from peft import PeftModel

        from hatrack import basemodel

        model, self.tok = basemodel.load_base(base_dir, quantize=quantize, device=device)
        self.peft = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for i, path in enumerate(adapters[1:], start=1):
            self.peft.load_adapter(path, adapter_name=f"a{i}")
        self.n = len(adapters)
        prompt = self.tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                              add_generation_prompt=True, tokenize=False)
        self.ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)

    def run(self, total: int) -> dict:
        import torch

        latencies, tokens = [], 0
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(total):
                t = time.perf_counter()
                self.peft.set_adapter(f"a{i % self.n}")
                out = self.peft.generate(**self.ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False, pad_token_id=self.tok.eos_token_id)
                tokens += out.shape[1] - self.ids["input_ids"].shape[1]
                latencies.append(time.perf_counter() - t)
        return _summary(latencies, tokens, time.perf_counter() - started)


def _summary(latencies: list[float], tokens: int, wall: float, ttft_p50: float = float("nan")) -> dict:
    latencies = sorted(latencies)
    return {"tok_s": tokens / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "ttft_p50": ttft_p50, "tokens": tokens}


def time_to_new_adapter(url: str, registry, folder: Path, base: str) -> float:
    """Seconds from register() to the first answer, minus a warm answer's own time."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)

    def ask(model: str) -> float:
        t = time.perf_counter()
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=8, temperature=0)
        return time.perf_counter() - t

    warm = statistics.median(ask("a0") for _ in range(3))
    t = time.perf_counter()
    registry.register(folder, name="fresh", base=base)
    ask("fresh")
    return time.perf_counter() - t - warm


def report(lines: list[str], out: Path | None) -> None:
    """Print a benchmark's markdown lines, and write them to `out` when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")


def _median_run(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (printed beside every benchmark's numbers)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(device: str) -> str:
    """The machine line of a result: the CPU, and the GPU when the run was on one."""
    text = f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores, torch threads default"
    if device.startswith("cuda"):
        import torch

        text += f", {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "none", "int8wo"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3,
                        help="base-only and mixed runs alternate this many times; medians are reported")
    parser.add_argument("--device", default="cpu", help="where the server and the naive baseline run (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    home = scratch_home("bench")
    from serving import ServerProcess

    from hatrack import basemodel
    from hatrack.registry import Registry

    registry = Registry()
    base = basemodel.ensure_base(registry)
    adapters = make_adapters(Path(base.path), home / "src", 9)
    for i, folder in enumerate(adapters[:8]):
        registry.register(folder, name=f"a{i}", base=base.name)
    names = [f"a{i}" for i in range(8)]

    rows = []
    ratios: dict[int, tuple[float, float]] = {}
    naive = NaiveBaseline(Path(base.path), adapters[:8], args.quantize, args.device)
    server = ServerProcess(home, "--quantize", args.quantize, "--device", args.device, "--max-loaded", "8", "--no-auth",
                           "--max-batch", "32").start(timeout=600)
    try:
        drive(server.url, names, 8, 8)  # warm-up: loads all 8 adapters
        naive_runs = []
        for conc in args.concurrency:
            total = max(args.requests, conc)
            # alternate the runs so a noisy neighbour or a slow drift hits every side alike;
            # ratios are medians of the per-round ratios
            rounds = []
            for _ in range(args.repeats):
                base_run, mixed = drive(server.url, [base.name], conc, total), drive(server.url, names, conc, total)
                naive_run = naive.run(args.naive_requests)
                naive_runs.append(naive_run)
                rounds.append((base_run, mixed, naive_run))
            rows.append((f"base only, c={conc}", _median_run([b for b, _, _ in rounds])))
            rows.append((f"8 adapters mixed, c={conc}", _median_run([m for _, m, _ in rounds])))
            ratios[conc] = (statistics.median(m["tok_s"] / b["tok_s"] for b, m, _ in rounds),
                            statistics.median(m["tok_s"] / n["tok_s"] for _, m, n in rounds))
        new_adapter_s = time_to_new_adapter(server.url, registry, adapters[8], base.name)
    finally:
        server.stop()
    rows.append(("naive PEFT set_adapter, one at a time", _median_run(naive_runs)))

    lines = [
        f"Serving benchmark — {date.today()} — `python bench/serve.py --quantize {args.quantize} "
        f"--device {args.device} --repeats {args.repeats}` — {machine(args.device)}",
        "",
        "| run | output tok/s | p50 latency s | p95 latency s | p50 TTFT s |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft_p50']:.2f} |")
    for conc in args.concurrency:
        vs_base, vs_naive = ratios[conc]
        lines.append("")
        lines.append(f"c={conc}: mixed / base-only = **{vs_base:.2f}** (target >= 0.85); mixed / naive = "
                     f"**{vs_naive:.1f}x** (target >= 4); medians of {args.repeats} rounds that alternate "
                     "base-only, mixed and naive runs")
    lines.append(f"\nregistration -> first answer of a new adapter, beyond the answer itself: "
                 f"**{new_adapter_s:.3f} s** (target < 1 s)")
    report(lines, args.out)


if __name__ == "__main__":
    main()
