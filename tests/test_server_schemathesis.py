"""Schemathesis against the server's own /openapi.json: a real `hatrack serve` on the
tiny model, generated valid and invalid requests for every /v1 route and /health,
/ready and /metrics. No answer may be a 5xx, every answer must be a status, content
type and body the schema declares for that route (event streams included), and
every request that breaks the schema must be refused with a 4xx."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import register_random_adapters, tiny_registry
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
ADAPTERS = ("acme-support", "globex-support")
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection"]
ROUTES = r"^/(v1/.*|health|ready|metrics)$"
EXAMPLES = 60  # per operation and phase; deterministic generation keeps every run the same

# Random model names almost never exist, so nearly every generated request would stop
# at the 404. A fuzz dictionary mixes the names this server holds into generated
# `model` fields half the time, so generation and the bounds behind the lookup are
# reached too.
CONFIG = f"""
[generation]
mode = "all"
max-examples = {EXAMPLES}
deterministic = true
database = "none"

[dictionaries.served]
values = ["{BASE}", "acme-support", "acme-support@1", "globex-support"]

[parameters]
"body.model" = {{ dictionary = "served", probability = 0.5 }}
"path.model" = {{ dictionary = "served", probability = 0.5 }}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_dir: Path):
    home = tmp_path_factory.mktemp("fuzz-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        register_random_adapters(registry, BASE, tiny_base_dir, home / "src", ADAPTERS)
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu", "--no-auth",
                               "--max-loaded", "2", "--max-tokens", "4").start()
        yield server
        server.stop()


def test_generated_requests_find_no_server_error_and_no_schema_break(served, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    har = tmp_path / "run.har"
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
           f"{served.url}/openapi.json", "--checks", ",".join(CHECKS),
           "--phases", "examples,coverage,fuzzing", "--include-path-regex", ROUTES, "--workers", "1",
           "--request-timeout", "60", "--no-color", "--report", "har", "--report-har-path", str(har)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout, run.stdout[-3000:]
    assert served.proc.poll() is None, "the server died"

    # the run got past the lookup: real completions were generated and checked
    seen: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in json.loads(har.read_text())["log"]["entries"]:
        path = "/" + entry["request"]["url"].split("/", 3)[3].split("?")[0]
        seen[(entry["request"]["method"], path)][entry["response"]["status"]] += 1
    for route in ("/v1/chat/completions", "/v1/completions"):
        statuses = seen[("POST", route)]
        assert statuses[200] >= 5 and statuses[400] >= 20 and statuses[404] >= 5, (route, statuses)


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": {"include_usage": True}, "stop": ["\n"]}),
    ("/v1/completions", {"prompt": "Once upon", "stream": True, "max_tokens": 3}),
    ("/v1/completions", {"prompt": "Once upon", "stream": True, "stream_options": {"include_usage": True}}),
])
@pytest.mark.parametrize("model", [BASE, "acme-support"])
def test_event_streams_conform_to_the_schema(served, route, body, model):
    """Generated requests rarely ask for a stream with a served model; these do, and
    every event of the answer is checked against the chunk schema /openapi.json names."""
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    case = schema[route]["POST"].Case(body={"model": model, **body})
    response = case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                              content_type_conformance, response_schema_conformance])
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")
