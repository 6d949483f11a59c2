"""Keyed serving through a real `hatrack serve` process: open or keyed is chosen at
start, never inferred from how many keys exist, and keys take effect within a second."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import register_random_adapters, tiny_registry
from serving import ServerProcess, hatrack_home_env

BASE = "tiny-llama"
QUESTION = [{"role": "user", "content": "Where is my order?"}]
KEY_BOUND = 1.0  # the server's stated bound for key changes to take effect


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_base_dir: Path):
    """A server started without --no-auth while no key exists yet."""
    home = tmp_path_factory.mktemp("auth-home")
    with hatrack_home_env(home):
        registry = tiny_registry(tiny_base_dir, BASE)
        register_random_adapters(registry, BASE, tiny_base_dir, home / "src",
                                 ["acme-support", "globex-support", "acme-old"])
        # one device slot: a request for another adapter evicts the one there
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu",
                               "--max-tokens", "4", "--max-loaded", "1").start()
        yield server, registry
        server.stop()


def chat(server, key: str | None, model: str = "acme-support") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers,
                      json={"model": model, "messages": QUESTION, "max_tokens": 2})


def until(check, seconds: float) -> float:
    """Seconds until check() held, polling; fails after `seconds`."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            pytest.fail(f"not true within {seconds}s")
        time.sleep(0.05)


def models(server, key: str) -> int:
    return httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


def test_keyed_server_with_no_keys_refuses_everyone_and_says_why_in_the_log(keyed):
    server, _ = keyed
    assert_401(chat(server, None))
    assert_401(chat(server, "hr-not-a-key"))
    assert_401(httpx.get(f"{server.url}/v1/models"))
    assert httpx.get(f"{server.url}/health").status_code == 200
    log = server.log.read_text()
    assert "no API keys exist yet" in log and "--no-auth" in log and "hatrack keys create" in log


def test_new_key_works_at_once_and_sees_only_its_adapters(keyed):
    server, registry = keyed
    _, secret = registry.create_key("acme", ["acme-*"])
    assert chat(server, secret).status_code == 200  # an unknown secret is never cached
    assert_401(chat(server, "wrong-key"))
    assert_401(chat(server, None))
    c = OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="globex-support", messages=QUESTION, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"  # exists, but not this tenant's
    ids = {m.id for m in c.models.list().data}
    assert "acme-support" in ids and "globex-support" not in ids


def scrape(server, key: str | None) -> str:
    resp = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert resp.status_code == 200, resp.text
    return resp.text


def test_metrics_need_a_key_and_show_a_tenant_only_its_own_models(keyed):
    server, registry = keyed
    assert_401(httpx.get(f"{server.url}/metrics"))
    assert_401(httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer hr-wrong"}))
    _, acme = registry.create_key("acme", ["acme-*"])
    _, globex = registry.create_key("globex", ["globex-*"])
    for key, model in ((acme, "acme-support"), (acme, BASE), (globex, "globex-support")):
        assert chat(server, key, model).status_code == 200
    mine, theirs = scrape(server, acme), scrape(server, globex)
    assert 'model="acme-support@1"' in mine and f'model="{BASE}"' in mine
    assert "globex" not in mine  # not even the name of another tenant's adapter
    assert 'model="globex-support@1"' in theirs and f'model="{BASE}"' in theirs
    assert "acme" not in theirs


def test_metrics_totals_are_counters_and_gone_adapters_leave_the_output(keyed):
    server, registry = keyed
    from hatrack.registry.prune import PruneCriteria, plan

    _, admin = registry.create_key("ops", ["*"])
    for model in ("acme-old", "acme-support", "globex-support"):  # one slot: each evicts the last
        assert chat(server, admin, model).status_code == 200
    text = scrape(server, admin)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("hatrack_engine_generated_tokens", "hatrack_engine_decode_steps", "hatrack_engine_fused_steps",
                 "hatrack_engine_decode_seconds", "hatrack_engine_prefill_seconds", "hatrack_engine_prefill_tokens",
                 "hatrack_engine_prefix_cache_hits", "hatrack_engine_prefix_cache_tokens",
                 "hatrack_engine_shared_prompts"):
        assert families[name].type == "counter", name
        assert [s.name for s in families[name].samples] == [name + "_total"]
    assert families["hatrack_engine_generated_tokens"].samples[0].value > 0
    loaded = {s.labels["adapter"] for s in families["hatrack_adapter_loaded"].samples}
    assert loaded == {"globex-support@1"}  # evicted adapters have no series, not a 0 forever
    assert 'model="acme-old@1"' in text
    registry.prune(plan(registry, PruneCriteria(name="acme-old", keep_last=0)))
    after = scrape(server, admin)
    assert "acme-old" not in after
    assert 'model="acme-support@1"' in after  # versions still registered keep their series


def test_revoking_every_key_refuses_every_request_within_a_second(keyed):
    """Runs last in this module: it leaves no valid key behind."""
    server, registry = keyed
    _, acme = registry.create_key("acme", ["acme-*"])
    _, globex = registry.create_key("globex", ["globex-*"])
    assert chat(server, acme).status_code == 200
    assert chat(server, globex, "globex-support").status_code == 200
    for key in registry.list_keys():
        if key.revoked is None:
            registry.revoke_key(key.id)
    # /v1/models runs the same key check as a completion, without waiting for a batch row
    until(lambda: models(server, acme) == 401 and models(server, globex) == 401, KEY_BOUND + 0.5)
    assert_401(chat(server, acme))
    assert_401(chat(server, None))  # no key left does not mean open
    assert_401(httpx.get(f"{server.url}/v1/models"))
    # and a key created now works on its first request
    _, fresh = registry.create_key("initech", ["acme-*"])
    assert chat(server, fresh).status_code == 200
