"""Headless Chromium for the dashboard tests (Selenium + the system chromedriver), and
`hatrack ui` as a real process on a loopback port. A missing browser fails the tests
with how to install it: scripts/test.sh installs it where it can, nothing skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving import free_port

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-artifacts" / "ui"
CHROMEDRIVER = os.environ.get("HATRACK_CHROMEDRIVER", "/usr/bin/chromedriver")


def chrome():
    """One headless Chromium that records its console, 1280x900."""
    if not Path(CHROMEDRIVER).is_file():
        pytest.fail(f"headless Chromium is needed for the dashboard tests, and {CHROMEDRIVER} is missing: "
                    f"`apt-get install chromium chromium-driver` (scripts/test.sh does it when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


def console_errors(driver) -> list[str]:
    """SEVERE console entries since the last call (reading the log empties it)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def submit(driver, element_id: str, timeout: float = 30.0) -> None:
    """Click a button that loads a new page, and wait until that page has loaded. A bare
    click returns before the navigation ends, so the next lookup could read the old page."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    try:
        driver.find_element(By.ID, element_id).click()
    except WebDriverException as e:
        # chromedriver checks the clicked node after the click; when the new page came
        # first it reports that node as gone, though the click went through
        if "does not belong to the document" not in str(e):
            raise

    def old_page_gone(_) -> bool:
        try:
            old.is_enabled()
            return False
        except StaleElementReferenceException:
            return True
        except WebDriverException as e:  # the same race, seen from the old node
            return "does not belong to the document" in str(e)

    WebDriverWait(driver, timeout).until(old_page_gone)
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.readyState") == "complete")


def screenshot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


class UIProcess:
    """`hatrack ui` on a loopback port, on the registry in `home`."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home, self.args, self.port = home, list(args), free_port()
        self.log = home / f"ui-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "UIProcess":
        env = {**os.environ, "HATRACK_HOME": str(self.home)}
        env.pop("HATRACK_DB_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "hatrack.cli.main", "ui", "--port", str(self.port),
                                      *self.args], env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hatrack ui exited early:\n{self.log.read_text()[-3000:]}")
            try:
                httpx.get(f"{self.url}/ui/login", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"hatrack ui did not answer in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
