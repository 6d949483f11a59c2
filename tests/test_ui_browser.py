"""`hatrack ui` in headless Chromium: a keyed dashboard on a small rack. Every page
loads without console errors, charts draw the recorded points, promotion goes through
the prod gate into the registry, prune deletes only a confirmed plan, and keys decide
what a browser sees and may change."""

from __future__ import annotations

import shutil

import httpx
import pytest
from selenium.webdriver.common.by import By

from browser import UIProcess, chrome, console_errors, screenshot, submit
from conftest import REPO, tiny_registry, write_peft_adapter
from serving import hatrack_home_env
from ui_data import build_rack


@pytest.fixture(scope="module")
def rack(tmp_path_factory, tiny_base_dir):
    home = tmp_path_factory.mktemp("ui-home")
    with hatrack_home_env(home):
        reg = tiny_registry(tiny_base_dir)
        build_rack(reg, write_peft_adapter(tiny_base_dir, home / "adapter", seed=1))
        _, admin = reg.create_key("ops", ["*"])
        _, tenant = reg.create_key("acme", ["acme-*"])
        ui = UIProcess(home).start()
        try:
            yield reg, ui, admin, tenant
        finally:
            ui.stop()


@pytest.fixture(scope="module")
def driver():
    d = chrome()
    yield d
    d.quit()


def sign_in(driver, ui, key: str | None) -> None:
    driver.delete_all_cookies()
    driver.get(f"{ui.url}/ui/login")
    if key:
        driver.find_element(By.ID, "key").send_keys(key)
        submit(driver, "sign-in")


def page(driver, url: str) -> str:
    driver.get(url)
    errors = console_errors(driver)
    assert not errors, f"{url}: console errors {errors}"
    return driver.page_source


def test_without_a_key_only_the_login_page(rack, driver):
    reg, ui, _, _ = rack
    sign_in(driver, ui, None)
    for path in ("/ui/", "/ui/v/acme-support@1", "/ui/compare?v=acme-support@1&v=acme-support@2", "/ui/prune"):
        driver.get(ui.url + path)
        assert driver.current_url.endswith("/ui/login"), path
        assert "acme" not in driver.page_source and "globex" not in driver.page_source
    screenshot(driver, "login")
    # a form posted without signing in changes nothing
    r = httpx.post(f"{ui.url}/ui/v/acme-support@2/alias", data={"alias": "prod", "token": "x"})
    assert r.status_code == 303 and r.headers["location"].endswith("/ui/login")
    assert reg.version_info("acme-support", 2)["aliases"] == []
    driver.find_element(By.ID, "key").send_keys("hr-not-a-key")
    submit(driver, "sign-in")
    assert "not valid" in driver.find_element(By.ID, "login-error").text
    console_errors(driver)  # the 401 of the refused sign-in is logged by the browser


def test_tenant_key_sees_only_its_adapters_read_only(rack, driver):
    reg, ui, _, tenant = rack
    sign_in(driver, ui, tenant)
    html = page(driver, f"{ui.url}/ui/")
    labels = [tr.get_attribute("data-label") for tr in driver.find_elements(By.CSS_SELECTOR, "#rack tbody tr")]
    assert labels == ["acme-support@1", "acme-support@2", "acme-support@3"]
    assert "globex" not in html and "read-only" in html
    page(driver, f"{ui.url}/ui/v/acme-support@2")
    assert not driver.find_elements(By.ID, "promote-form")
    driver.get(f"{ui.url}/ui/v/globex-support@1")  # hidden reads exactly like unknown
    hidden = driver.find_element(By.ID, "error").text
    driver.get(f"{ui.url}/ui/v/nobody-support@1")
    assert hidden.replace("globex", "nobody") == driver.find_element(By.ID, "error").text
    driver.get(f"{ui.url}/ui/compare?v=acme-support@1&v=globex-support@1")
    assert driver.find_element(By.ID, "error").text == hidden
    assert "customer=globex" not in driver.page_source and "globex.jsonl" not in driver.page_source
    console_errors(driver)  # the 404s above
    # a tenant's post is refused even with its own cookie
    cookie = {"hatrack_key": tenant}
    r = httpx.post(f"{ui.url}/ui/v/acme-support@2/alias", data={"alias": "prod", "token": "x"}, cookies=cookie)
    assert r.status_code == 403
    assert reg.version_info("acme-support", 2)["aliases"] == []


def test_rack_and_version_pages_show_the_registry(rack, driver):
    reg, ui, admin, _ = rack
    sign_in(driver, ui, admin)
    page(driver, f"{ui.url}/ui/")
    rows = driver.find_elements(By.CSS_SELECTOR, "#rack tbody tr")
    assert [r.get_attribute("data-label") for r in rows] == [r["label"] for r in reg.list_versions()]
    screenshot(driver, "rack")
    page(driver, f"{ui.url}/ui/?sort=eval_loss")
    sorted_labels = [r.get_attribute("data-label") for r in driver.find_elements(By.CSS_SELECTOR, "#rack tbody tr")]
    assert sorted_labels == [r["label"] for r in reg.list_versions(sort="eval_loss")]
    page(driver, f"{ui.url}/ui/?sort=nonsense")
    assert "unknown sort key" in driver.find_element(By.ID, "rack-error").text

    info = reg.version_info("acme-support", 3)
    page(driver, f"{ui.url}/ui/v/acme-support@3")
    points = driver.find_elements(By.CSS_SELECTOR, "#loss-chart circle.pt")
    assert len(points) == len(info["train_metrics"]["loss_curve"]) == 12
    first_title = points[0].find_element(By.TAG_NAME, "title").get_attribute("textContent")
    assert first_title.endswith(f"{info['train_metrics']['loss_curve'][0][1]:.4g}")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#loss-chart rect.mark")) == 1  # held-out eval loss
    bars = driver.find_elements(By.CSS_SELECTOR, "#score-chart rect.bar")
    assert len(bars) == 2 * len(info["scores"])  # each metric beside the base's
    assert "acme-support@2" in driver.find_element(By.ID, "parents").text
    assert info["sha256"][:16] in driver.page_source
    assert "acme-support@3" in driver.find_element(By.ID, "snip-curl").text
    screenshot(driver, "version")


def test_compare_overlays_curves_and_highlights_differences(rack, driver):
    reg, ui, admin, _ = rack
    sign_in(driver, ui, admin)
    page(driver, f"{ui.url}/ui/")
    for label in ("acme-support@1", "acme-support@2", "globex-support@1"):
        driver.find_element(By.CSS_SELECTOR, f"input[value='{label}']").click()
    submit(driver, "compare")
    assert not console_errors(driver)
    series = driver.find_elements(By.CSS_SELECTOR, "#loss-chart g.series")
    curves = [len(reg.version_info(n, v)["train_metrics"]["loss_curve"])
              for n, v in (("acme-support", 1), ("acme-support", 2), ("globex-support", 1))]
    assert [len(s.find_elements(By.CSS_SELECTOR, "circle.pt")) for s in series] == curves
    differs = {tr.find_element(By.TAG_NAME, "td").text
               for tr in driver.find_elements(By.CSS_SELECTOR, "#config-diff tr.differs")}
    assert {"lr", "max_steps", "name"} <= differs and "rank" not in differs
    assert "-0.3" in driver.find_element(By.ID, "scores").text  # acme@2's eval_loss against acme@1's
    screenshot(driver, "compare")


def test_rack_pages_keep_the_sort_and_cover_every_version(rack, driver):
    reg, ui, admin, _ = rack
    sign_in(driver, ui, admin)
    want = [r["label"] for r in reg.list_versions(sort="eval_loss")]
    assert len(want) > 2
    seen = []
    page(driver, f"{ui.url}/ui/?sort=eval_loss&per_page=2")
    while True:
        labels = [tr.get_attribute("data-label") for tr in driver.find_elements(By.CSS_SELECTOR, "#rack tbody tr")]
        assert 1 <= len(labels) <= 2
        assert f"versions {len(seen) + 1}–{len(seen) + len(labels)} of {len(want)}" in driver.find_element(By.ID, "pager").text
        seen += labels
        if not driver.find_elements(By.ID, "next-page"):
            break
        submit(driver, "next-page")
        assert "sort=eval_loss" in driver.current_url
    assert seen == want
    submit(driver, "prev-page")
    assert [tr.get_attribute("data-label") for tr in driver.find_elements(By.CSS_SELECTOR, "#rack tbody tr")] \
        == want[-(len(want) % 2 or 2) - 2:-(len(want) % 2 or 2)]
    page(driver, f"{ui.url}/ui/?per_page=2&page=999")  # past the end: the last page
    assert f"of {len(want)}" in driver.find_element(By.ID, "pager").text
    assert driver.find_elements(By.CSS_SELECTOR, "#rack tbody tr")


def test_promotion_goes_through_the_gate(rack, driver):
    reg, ui, admin, _ = rack
    sign_in(driver, ui, admin)
    page(driver, f"{ui.url}/ui/v/acme-support@3")
    assert "3.4" in driver.find_element(By.ID, "gate").text and "3" in driver.find_element(By.ID, "gate").text
    submit(driver, "promote")
    assert "worse than the base model" in driver.find_element(By.ID, "flash").text
    assert reg.version_info("acme-support", 3)["aliases"] == []

    page(driver, f"{ui.url}/ui/v/acme-support@2")
    submit(driver, "promote")
    assert driver.find_element(By.ID, "flash").text == "acme-support@prod -> acme-support@2"
    assert reg.version_of("acme-support@prod").version == 2
    assert "prod" in driver.find_element(By.ID, "alias-history").text
    page(driver, f"{ui.url}/ui/")
    assert "prod" in driver.find_element(By.CSS_SELECTOR, "tr[data-label='acme-support@2']").text
    screenshot(driver, "rack-promoted")

    page(driver, f"{ui.url}/ui/v/acme-support@1")  # 2.2 against prod's 1.9: refused, with both numbers
    assert "current prod acme-support@2 1.9" in driver.find_element(By.ID, "gate").text
    submit(driver, "promote")
    assert "worse than acme-support@2 (current prod)" in driver.find_element(By.ID, "flash").text
    assert reg.version_of("acme-support@prod").version == 2
    # a form without this page's token is refused
    r = httpx.post(f"{ui.url}/ui/v/acme-support@1/alias", data={"alias": "prod", "force": "on", "token": "x"},
                   cookies={"hatrack_key": admin})
    assert r.status_code == 403 and reg.version_of("acme-support@prod").version == 2


def test_prune_shows_the_plan_then_deletes_it(rack, driver):
    reg, ui, admin, _ = rack
    sign_in(driver, ui, admin)
    reg.set_alias("acme-support", "prod", 2)  # as the promotion test leaves it; this test also runs alone
    page(driver, f"{ui.url}/ui/prune?name=acme-support&keep_last=1")
    plan = driver.find_element(By.ID, "plan").text
    assert "remove acme-support@1" in plan and "keep acme-support@2" in plan
    assert [r["version"] for r in reg.list_versions(name="acme-support")] == [1, 2, 3]  # nothing gone yet
    screenshot(driver, "prune")
    reg.set_alias("acme-support", "staging", 1)  # the rack changes between plan and confirmation
    submit(driver, "confirm")
    assert "the plan changed" in driver.find_element(By.ID, "flash").text
    assert "remove acme-support@1" not in driver.find_element(By.ID, "plan").text  # the new plan is shown
    assert [r["version"] for r in reg.list_versions(name="acme-support")] == [1, 2, 3]
    reg.delete_alias("acme-support", "staging")
    page(driver, f"{ui.url}/ui/prune?name=acme-support&keep_last=1")
    submit(driver, "confirm")
    assert "deleted 1 versions" in driver.find_element(By.ID, "flash").text
    assert [r["version"] for r in reg.list_versions(name="acme-support")] == [2, 3]


def test_hatrack_ui_imports_no_torch():
    """`hatrack ui` is the registry's dashboard: it starts without torch or a model."""
    import subprocess
    import sys

    code = "import hatrack.ui.app, hatrack.cli.ui_cmd, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
