"""What HTTP and SSE cost on top of hatrack's engine: the same requests in-process and through `hatrack serve`.

Each round has two phases, never both alive at once (they would share the cores):

1. engine: this process builds exactly what `hatrack serve` builds (ServerState.load: the
   same base, precision, engine options, stop tokens and adapter specs from the registry)
   and submits the requests straight to the Engine, `--concurrency` client threads each
   waiting on its handle. Then the engine is stopped and dropped.
2. server: a `hatrack serve` process on loopback answers the same requests through the
   official openai client, non-streaming ("http") then streaming ("sse"), per cell.
   Then the server is stopped.

Both sides get the same token ids (the chat route's own template function turns the
messages into the prompt the engine gets), greedy, at most --max-tokens new tokens, the
base's end-of-turn tokens as stops. Output tokens/s counts the tokens each side really
made (engine: tokens returned; HTTP: usage.completion_tokens); the per-side totals are
printed so a difference shows. Cases: "base" (every request to the base) and "8 mixed"
(round-robin over 8 random rank-16 all-linear adapters, bench/serve.py's).

Per cell: output tok/s of engine, http, sse (medians of rounds); http/engine and
sse/engine (medians of per-round ratios); the overhead per token of one stream,
(1/tps_side - 1/tps_engine) * 1000 * concurrency ms: with c streams decoding together
that is the time each stream's every token waits beyond the engine alone; and the
CPU each process used per second of wall time (server: /proc/PID/stat user+system of the
`hatrack serve` process; client: this process's CPU time, the openai client threads;
engine: this process's CPU time, engine thread included).

    python bench/http_share.py [--concurrency 8 32] [--rounds 3] [--requests 64]
        [--max-tokens 32] [--quantize auto] [--json-out FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # this checkout's hatrack, here and in the server process

from engine import in_thread  # noqa: E402  (bench/engine.py)
from serve import cpu_name, make_adapters, report, scratch_home  # noqa: E402  (bench/serve.py)
from side_by_side import N_ADAPTERS, write_json  # noqa: E402  (bench/side_by_side.py)

# open-ended asks, so a greedy answer runs to the token limit rather than ending early: on
# smollm2-135m each made 32 of 32 tokens through the engine, base and all 8 adapters (an
# ask for "how a bicycle works, part by part" ended at 16-26 and was dropped)
QUESTIONS = [
    "Write a long story about a dragon who learns to cook.",
    "Describe a walk through a busy city market, with every sound and smell.",
    "Write a long letter to a friend about your summer holidays.",
    "Explain step by step how to bake bread at home.",
    "Tell the history of the printing press in detail.",
    "Describe your ideal house, room by room.",
    "Write a long poem about the sea and the wind.",
]
SIDES = ("engine", "http", "sse")
CASES = ("base", "mixed")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (/proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def _run(one, concurrency: int, total: int, server_pid: int | None = None) -> dict:
    """`total` calls of one(i) -> tokens from `concurrency` threads; tok/s and CPU shares."""
    cpu0, server0 = time.process_time(), process_cpu_seconds(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(total)))
    wall = time.perf_counter() - started
    out = {"tok_s": tokens / wall, "tokens": tokens, "requests": total, "wall_s": wall,
           "this_process_cpu": (time.process_time() - cpu0) / wall}
    if server_pid:
        out["server_cpu"] = (process_cpu_seconds(server_pid) - server0) / wall
    return out


# ---------------------------------------------------------------- phase 1: the engine alone


def load_state(config, registry):
    """What `hatrack serve` holds after its background load, built in this process."""
    from hatrack.server.state import ServerState

    state = ServerState(config, registry)
    in_thread(state.load)  # torch work off the main thread, as the server does it (see in_thread)
    if state.load_error:
        raise SystemExit(f"error: the base failed to load in-process: {state.load_error}")
    return state


def engine_run(state, models: list[str], concurrency: int, total: int, max_tokens: int) -> dict:
    from hatrack.server.engine import SamplingParams
    from hatrack.server.routes import _chat_prompt_ids  # the chat route's own prompt ids

    prompts = [_chat_prompt_ids(state.tokenizer, messages(i)) for i in range(len(QUESTIONS))]
    targets = [state.catalog.lookup(m, lambda name: True) for m in models]
    # what the chat route asks of the engine for {temperature: 0, max_tokens}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=state.stop_ids)

    def one(i: int) -> int:
        handle = state.engine.submit(prompts[i % len(prompts)], targets[i % len(targets)].adapter, params)
        return len(handle.result(timeout=900)[0])

    return _run(one, concurrency, total)


def engine_phase(config, registry, names: dict[str, list[str]], args, round_no: int) -> dict:
    print(f"[round {round_no}] engine: loading in-process", file=sys.stderr, flush=True)
    state = load_state(config, registry)
    try:
        top = max(args.concurrency)
        # warm-up: every adapter loaded into its slot, a full-length batch run once
        engine_run(state, names["warm"], top, max(top, N_ADAPTERS + 1), args.max_tokens)
        out = {}
        for conc in args.concurrency:
            for case in CASES:
                out[f"{case}_c{conc}"] = engine_run(state, names[case], conc, max(args.requests, conc),
                                                    args.max_tokens)
                print(f"[round {round_no}] engine {case} c={conc}: {out[f'{case}_c{conc}']['tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
    finally:
        state.engine.stop()
        del state
        gc.collect()
    return out


# ---------------------------------------------------------------- phase 2: through the server


def http_run(url: str, server_pid: int, models: list[str], concurrency: int, total: int,
             max_tokens: int, stream: bool) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)

    def one(i: int) -> int:
        model = models[i % len(models)]
        kwargs = dict(model=model, messages=messages(i), max_tokens=max_tokens, temperature=0)
        if not stream:
            return client.chat.completions.create(**kwargs).usage.completion_tokens
        tokens = None
        for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        if tokens is None:
            raise RuntimeError(f"{url}: a stream for {model!r} ended without usage")
        return tokens

    return _run(one, concurrency, total, server_pid)


def server_phase(home: Path, server_args: list[str], names: dict[str, list[str]], args, round_no: int) -> dict:
    from serving import ServerProcess  # tests/serving.py

    print(f"[round {round_no}] server: starting", file=sys.stderr, flush=True)
    server = ServerProcess(home, *server_args).start(timeout=600)
    try:
        top = max(args.concurrency)
        for stream in (False, True):  # warm both paths; every adapter loaded
            http_run(server.url, server.proc.pid, names["warm"], top, max(top, N_ADAPTERS + 1), args.max_tokens, stream)
        out = {}
        for conc in args.concurrency:
            for case in CASES:
                for side, stream in (("http", False), ("sse", True)):
                    r = http_run(server.url, server.proc.pid, names[case], conc, max(args.requests, conc),
                                 args.max_tokens, stream)
                    out[f"{case}_c{conc}_{side}"] = r
                    print(f"[round {round_no}] {side} {case} c={conc}: {r['tok_s']:.1f} tok/s, "
                          f"server CPU {r['server_cpu']:.2f} cores", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return out


# ---------------------------------------------------------------- report


def summarize(rounds: list[dict], concurrency: list[int]) -> dict:
    """Medians over rounds; ratios and overheads are medians of per-round values."""
    summary: dict = {}
    for conc in concurrency:
        for case in CASES:
            key = f"{case}_c{conc}"
            runs = {side: [r["engine" if side == "engine" else "server"][key if side == "engine" else f"{key}_{side}"]
                           for r in rounds] for side in SIDES}
            cell: dict = {"concurrency": conc, "case": case}
            for side in SIDES:
                cell[f"{side}_tok_s"] = statistics.median(r["tok_s"] for r in runs[side])
                cell[f"{side}_tokens"] = [r["tokens"] for r in runs[side]]
            cell["engine_process_cpu"] = statistics.median(r["this_process_cpu"] for r in runs["engine"])
            for side in ("http", "sse"):
                pairs = list(zip(runs[side], runs["engine"]))
                cell[f"{side}_over_engine"] = statistics.median(s["tok_s"] / e["tok_s"] for s, e in pairs)
                cell[f"{side}_overhead_ms_per_token"] = statistics.median(
                    (1 / s["tok_s"] - 1 / e["tok_s"]) * 1000 * conc for s, e in pairs)
                cell[f"{side}_server_cpu"] = statistics.median(r["server_cpu"] for r in runs[side])
                cell[f"{side}_client_cpu"] = statistics.median(r["this_process_cpu"] for r in runs[side])
            summary[key] = cell
    return summary


def table(summary: dict) -> list[str]:
    lines = [
        "| case | c | engine tok/s | http tok/s | sse tok/s | http / engine | sse / engine "
        "| http ms/token | sse ms/token | CPU cores: engine process | server (http / sse) | client (http / sse) |",
        "|---" * 12 + "|",
    ]
    for cell in summary.values():
        lines.append(
            f"| {'base' if cell['case'] == 'base' else '8 mixed'} | {cell['concurrency']} "
            f"| {cell['engine_tok_s']:.1f} | {cell['http_tok_s']:.1f} | {cell['sse_tok_s']:.1f} "
            f"| **{cell['http_over_engine']:.2f}** | **{cell['sse_over_engine']:.2f}** "
            f"| {cell['http_overhead_ms_per_token']:.1f} | {cell['sse_overhead_ms_per_token']:.1f} "
            f"| {cell['engine_process_cpu']:.2f} | {cell['http_server_cpu']:.2f} / {cell['sse_server_cpu']:.2f} "
            f"| {cell['http_client_cpu']:.2f} / {cell['sse_client_cpu']:.2f} |")
    unequal = [f"{key}: engine {c['engine_tokens']}, http {c['http_tokens']}, sse {c['sse_tokens']}"
               for key, c in summary.items()
               if len({t for side in SIDES for t in c[f"{side}_tokens"]}) > 1]
    lines.append("")
    lines.append("Output tokens per run differ between sides (each side's tok/s counts its own): "
                 + "; ".join(unequal) if unequal else
                 "Every run of every side made the same number of output tokens.")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (engine, then http and sse)")
    parser.add_argument("--requests", type=int, default=64, help="requests per run (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max new tokens per request (greedy)")
    parser.add_argument("--quantize", default="auto",
                        help="base precision on both sides, as `hatrack serve --quantize` (default: auto)")
    parser.add_argument("--json-out", type=Path, default=None, help="write raw numbers here")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.rounds < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --rounds and --max-tokens must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    started = datetime.now(timezone.utc)
    home = scratch_home("http-share")
    print(f"registry and server logs in {home}", file=sys.stderr, flush=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    from hatrack import basemodel
    from hatrack.registry import Registry
    from hatrack.server.state import ServeConfig

    registry = Registry()
    base = basemodel.ensure_base(registry)
    adapters = [f"a{i}" for i in range(N_ADAPTERS)]
    for name, folder in zip(adapters, make_adapters(Path(base.path), home / "src", N_ADAPTERS)):
        registry.register(folder, name=name, base=base.name)
    names = {"base": [base.name], "mixed": adapters, "warm": [base.name, *adapters]}

    top = max(32, *args.concurrency)
    config = ServeConfig(base=base.name, quantize=args.quantize, device="cpu", max_loaded=N_ADAPTERS,
                         max_batch=top, auth=False)
    server_args = ["--base", base.name, "--quantize", args.quantize, "--device", "cpu", "--no-auth",
                   "--max-loaded", str(N_ADAPTERS), "--max-batch", str(top)]

    rounds: list[dict] = []
    meta = {"date": started.isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), "args": vars(args),
            "base": base.name, "server_args": server_args, "rounds": rounds}
    try:
        for round_no in range(1, args.rounds + 1):
            engine = engine_phase(config, registry, names, args, round_no)
            server = server_phase(home, server_args, names, args, round_no)
            rounds.append({"engine": engine, "server": server})
            write_json(args.json_out, {**meta, "complete": False})  # a long run keeps what it measured
    finally:
        for bulky in ("src", "store"):  # the adapters; the server logs stay
            shutil.rmtree(home / bulky, ignore_errors=True)

    summary = summarize(rounds, args.concurrency)
    from hatrack.server.state import resolve_quantize

    lines = [
        f"HTTP and SSE share — {started:%Y-%m-%d %H:%M} UTC — {cpu_name()}, {os.cpu_count()} cores — "
        f"`python bench/http_share.py {' '.join(sys.argv[1:])}`",
        "",
        f"Base {base.name} ({resolve_quantize(args.quantize, 'cpu')}); {N_ADAPTERS} random rank-16 all-linear "
        f"adapters; greedy chat requests of at most {args.max_tokens} new tokens, {args.requests} per run; "
        f"engine = the same Engine in-process, http = `hatrack serve` non-streaming, sse = streaming, both "
        f"through the openai client; medians of {args.rounds} round(s) (engine, then http and sse per cell), "
        f"ratios and ms/token medians of per-round values. ms/token = (1/tps_side - 1/tps_engine) x 1000 x c: "
        "the time every token of one stream waits beyond the engine alone. CPU cores = CPU seconds per wall "
        "second (client: the openai client threads in the benchmark process).",
        "",
        *table(summary),
    ]
    report(lines, args.out)
    write_json(args.json_out, {**meta, "complete": True, "summary": summary})


if __name__ == "__main__":
    main()
