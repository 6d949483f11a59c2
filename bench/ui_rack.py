"""Dashboard benchmark: how long the rack page (GET /ui/) takes on a big registry.

Builds a registry in a temporary HATRACK_HOME (SQLite) holding --versions adapter
versions, --per-adapter of them under each adapter name, recorded as a training run
records them (tags, dataset, train config, train metrics with a loss curve, held-out
scores beside the base's) with prod and staging aliases on each name. Every version
reuses one small PEFT adapter written once for the tiny test base, so building 1,000
versions takes seconds. Then it starts `hatrack ui` as its own process on loopback,
signs in with an admin key (or runs it --no-auth with --open) and times GET /ui/:

- server: wall time of each full response through httpx (median, p90), and the HTML size;
- with --browser: headless Chromium's load time of the page (performance.timing
  loadEventEnd - navigationStart, median and p90), driven by Selenium through the
  system chromedriver (HATRACK_CHROMEDRIVER, default /usr/bin/chromedriver).

Run from the repository root (the tiny base is built into .test-cache/bases on first use,
as the tests do; HATRACK_TEST_CACHE moves that cache):

    PYTHONPATH=. python bench/ui_rack.py [--versions 1000] [--per-adapter 10] [--requests 20]
                                         [--browser] [--open] [--keep DIR]

The goal it checks: the rack of 1,000 versions renders in under a second.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

BASE = "tiny"
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell", "cyberdyne"]


def loss_curve(steps: int, seed: int) -> list[list[float]]:
    return [[s, round(3.0 * math.exp(-s / 40) + 0.4 + 0.05 * math.sin(s * seed), 4)] for s in range(1, steps + 1)]


def build_registry(home: Path, versions: int, per_adapter: int, open_access: bool) -> str | None:
    """The registry in `home`; returns an admin key's secret (None with open access)."""
    from conftest import tiny_base, tiny_registry, write_peft_adapter
    from hatrack.registry import DatasetInfo, ScoreIn

    os.environ["HATRACK_HOME"] = str(home)
    os.environ.pop("HATRACK_DB_URL", None)
    base_dir = tiny_base()
    reg = tiny_registry(base_dir, BASE)
    folder = write_peft_adapter(base_dir, home / "src" / "adapter", rank=8, alpha=16, seed=1)
    names = [f"{CUSTOMERS[i % len(CUSTOMERS)]}-support-{i // len(CUSTOMERS):02d}"
             for i in range(math.ceil(versions / per_adapter))]
    made = 0
    for n, name in enumerate(names):
        for v in range(1, per_adapter + 1):
            if made == versions:
                break
            seed, steps = n * 100 + v, 100 + 10 * v
            dataset = f"{seed:064x}"
            eval_loss = round(2.6 - 0.08 * v + 0.01 * (seed % 7), 4)
            reg.register(
                folder, name=name, base=BASE, quantization="none", parent_version=v - 1 if v > 1 else None,
                tags={"customer": name.split("-")[0], "team": f"team-{n % 4}", "stage": "review" if v % 3 else "done"},
                dataset=DatasetInfo(dataset, 500 + seed % 300, f"{name}-v{v}.jsonl"),
                train_config={"data": f"{name}-v{v}.jsonl", "rank": 8, "alpha": 16, "lr": 2e-4, "epochs": 1,
                              "max_steps": steps, "seed": seed},
                seed=seed, lib_versions={"torch": "2.13", "peft": "0.17"},
                train_metrics={"final_loss": loss_curve(steps, seed)[-1][1], "steps": steps, "runtime_s": 60.0 + v,
                               "loss_curve": loss_curve(steps, seed)},
                scores=[ScoreIn("eval_loss", eval_loss, 3.1, dataset, "heldout", 50, "fp32"),
                        ScoreIn("perplexity", round(math.exp(eval_loss), 4), 22.2, dataset, "heldout", 50, "fp32"),
                        ScoreIn("exact_match", round(0.3 + 0.05 * v, 4), 0.1, dataset, "heldout", 50, "fp32")])
            made += 1
        top = min(per_adapter, versions - n * per_adapter)
        if top >= 2:
            reg.set_alias(name, "prod", top - 1, force=True)
        reg.set_alias(name, "staging", top)
    if open_access:
        return None
    _, secret = reg.create_key("ops", ["*"])
    return secret


def start_ui(home: Path, open_access: bool):
    """`hatrack ui` on the registry in `home`, this checkout's hatrack (tests/browser.py's UIProcess)."""
    from browser import UIProcess

    os.environ["PYTHONPATH"] = str(REPO)
    return UIProcess(home, *(["--no-auth"] if open_access else [])).start()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def time_server(url: str, secret: str | None, requests: int, versions: int) -> tuple[list[float], int]:
    with httpx.Client(base_url=url, timeout=60) as client:
        if secret is not None:
            resp = client.post("/ui/login", data={"key": secret})
            if resp.status_code != 303:
                raise SystemExit(f"sign-in failed: HTTP {resp.status_code}")
        warm = client.get("/ui/")
        if warm.status_code != 200 or f"{versions} versions" not in warm.text:
            raise SystemExit(f"GET /ui/ did not show the rack of {versions} versions: HTTP {warm.status_code}")
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            resp = client.get("/ui/")
            times.append(time.perf_counter() - t0)
            resp.raise_for_status()
        return times, len(warm.content)


def time_browser(url: str, secret: str | None, requests: int) -> list[tuple[float, float]]:
    from browser import chrome
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome()
    try:
        if secret is not None:
            driver.get(f"{url}/ui/login")
            driver.find_element(By.NAME, "key").send_keys(secret)
            driver.find_element(By.NAME, "key").submit()
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "rack"))
        times = []
        for _ in range(requests + 1):  # the first load warms the browser's cache of the stylesheet
            driver.get(f"{url}/ui/")
            # [until loaded, until the HTML had arrived], in ms since navigationStart
            loaded, arrived = WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "const t = performance.timing; return t.loadEventEnd > 0 && "
                "[t.loadEventEnd - t.navigationStart, t.responseEnd - t.navigationStart]"))
            times.append((loaded / 1000, arrived / 1000))
        return times[1:]
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", type=int, default=1000, help="adapter versions in the registry")
    ap.add_argument("--per-adapter", type=int, default=10, help="versions under each adapter name")
    ap.add_argument("--requests", type=int, default=20, help="timed GET /ui/ (after one warm-up)")
    ap.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    ap.add_argument("--open", action="store_true", help="run `hatrack ui --no-auth` instead of signing in")
    ap.add_argument("--keep", type=Path, help="build the registry in this (new) folder and keep it")
    args = ap.parse_args()

    home = args.keep or Path(tempfile.mkdtemp(prefix="hatrack-ui-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    secret = build_registry(home, args.versions, args.per_adapter, args.open)
    print(f"registry: {args.versions} versions ({args.per_adapter} per adapter) built in "
          f"{time.perf_counter() - t0:.1f} s in {home}")
    ui = start_ui(home, args.open)
    url = ui.url
    try:
        times, size = time_server(url, secret, args.requests, args.versions)
        print(f"GET /ui/ server ({args.requests} requests, {'open' if args.open else 'admin key'}): "
              f"median {statistics.median(times) * 1000:.0f} ms, p90 {percentile(times, 0.9) * 1000:.0f} ms, "
              f"HTML {size / 1024:.0f} KiB")
        if args.browser:
            shown = time_browser(url, secret, args.requests)
            loaded, arrived = [t[0] for t in shown], [t[1] for t in shown]
            print(f"GET /ui/ headless Chromium load ({args.requests} loads, loadEventEnd - navigationStart): "
                  f"median {statistics.median(loaded) * 1000:.0f} ms, p90 {percentile(loaded, 0.9) * 1000:.0f} ms; "
                  f"of which until the HTML had arrived (responseEnd): median "
                  f"{statistics.median(arrived) * 1000:.0f} ms")
    finally:
        ui.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
