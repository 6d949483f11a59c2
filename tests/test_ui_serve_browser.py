"""/ui on a keyed `hatrack serve` (tiny model) in headless Chromium: "try it" streams
two models side by side through /v1/chat/completions with the signed-in key, and the
serving page shows where adapters live and the requests they answered, polled live;
a tenant's view of it holds only its own adapters."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from browser import chrome, console_errors, screenshot, submit
from conftest import register_random_adapters, tiny_registry
from serving import ServerProcess, hatrack_home_env

BASE = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base_dir):
    home = tmp_path_factory.mktemp("ui-serve")
    with hatrack_home_env(home):
        reg = tiny_registry(tiny_base_dir, BASE)
        register_random_adapters(reg, BASE, tiny_base_dir, home / "src", ["acme-support", "globex-support"])
        _, admin = reg.create_key("ops", ["*"])
        _, tenant = reg.create_key("acme", ["acme-*"])
        server = ServerProcess(home, "--base", BASE, "--quantize", "none", "--device", "cpu",
                               "--max-tokens", "16",
                               # the pages are under test, not the CPU kernel: no compile at start
                               env={"HATRACK_CPU_KERNEL": "0"}).start()
        try:
            yield server, admin, tenant
        finally:
            server.stop()


@pytest.fixture(scope="module")
def driver():
    d = chrome()
    yield d
    d.quit()


def test_try_it_streams_two_models_and_serving_shows_them(served, driver):
    server, admin, _ = served
    driver.get(f"{server.url}/ui/login")
    driver.find_element(By.ID, "key").send_keys(admin)
    submit(driver, "sign-in")
    driver.get(f"{server.url}/ui/try")
    Select(driver.find_element(By.ID, "model-left")).select_by_value("acme-support")
    Select(driver.find_element(By.ID, "model-right")).select_by_value("globex-support@1")
    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("8")
    driver.find_element(By.ID, "send").click()
    for side in ("left", "right"):
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, f"answer-{side}").get_attribute("data-done") == "1"
            or "error" in d.find_element(By.ID, f"meta-{side}").text)
        meta = driver.find_element(By.ID, f"meta-{side}").text
        assert "chunks" in meta, meta
        assert driver.find_element(By.ID, f"answer-{side}").text.strip()
    assert not console_errors(driver)
    screenshot(driver, "try")

    driver.get(f"{server.url}/ui/serving")
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "updated").text.startswith("updated"))
    assert not console_errors(driver)
    rows = {tr.find_elements(By.TAG_NAME, "td")[0].text: int(tr.find_elements(By.TAG_NAME, "td")[1].text)
            for tr in driver.find_elements(By.CSS_SELECTOR, "#s-models tbody tr")}
    assert rows.get("acme-support@1") == 1 and rows.get("globex-support@1") == 1
    device = driver.find_element(By.ID, "s-device").text
    assert "acme-support@1" in device and "globex-support@1" in device
    assert int(driver.find_element(By.ID, "s-tokens").text) >= 2
    screenshot(driver, "serving")


def test_tenant_sees_only_its_own_serving_state(served):
    server, admin, tenant = served
    httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {admin}"},
               json={"model": "globex-support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    mine = httpx.get(f"{server.url}/ui/api/serving", cookies={"hatrack_key": tenant}).json()
    everything = httpx.get(f"{server.url}/ui/api/serving", headers={"Authorization": f"Bearer {admin}"}).json()
    assert any(m["model"].startswith("globex") for m in everything["models"])
    assert "globex" not in str(mine) and any(m["model"].startswith("acme") for m in mine["models"])
    page = httpx.get(f"{server.url}/ui/try", cookies={"hatrack_key": tenant}).text
    assert "acme-support" in page and "globex" not in page
    assert httpx.get(f"{server.url}/ui/api/serving").status_code == 401
    # the dashboard's cookie is a key for /v1 only with the dashboard's own header (no cross-site use)
    body = {"model": "acme-support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/chat/completions", cookies={"hatrack_key": tenant}, json=body).status_code == 401
    ok = httpx.post(f"{server.url}/v1/chat/completions", cookies={"hatrack_key": tenant}, json=body,
                    headers={"X-Hatrack-UI": "1"})
    assert ok.status_code == 200
