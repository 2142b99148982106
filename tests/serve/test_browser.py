"""The web page in a real browser: `python -m pneumonia.serve` in its own process, headless
Chromium driven by Selenium uploads a synthetic X-ray, and the probability, the decision, the
heatmap and the model card appear.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`;
`.ci/run` installs them); without them the test is skipped with that line. With
PNEUMONIA_SCREENSHOT=FILE it also saves its screenshot there (the README's picture; set
PNEUMONIA_SCREENSHOT_CKPT and PNEUMONIA_SCREENSHOT_IMAGE for a trained model and a real image).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver: apt-get install chromium chromium-driver (README: "
    "Using a trained model)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The server as a user starts it, until the module's tests are done."""
    checkpoint = Path(os.environ.get("PNEUMONIA_SCREENSHOT_CKPT", tiny_checkpoint))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumonia.serve", "--ckpt", str(checkpoint), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_healthy(url: str, process: subprocess.Popen, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the server did not answer /health in time")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags of a sandboxed CI machine with no network: no sandbox (root), no GPU, and
    # none of Chromium's background connections (refused here, slowly).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_dropping_an_xray_shows_probability_decision_heatmap_and_card(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    chosen = os.environ.get("PNEUMONIA_SCREENSHOT_IMAGE")  # a real radiograph for the README
    if chosen:
        xray = Path(chosen).resolve()  # chromedriver wants a canonical path
    else:
        xray = write_image(tmp_path / "xray.png", 150, (320, 280), fmt="PNG")
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "Validation" in d.find_element(By.ID, "card-body").text)
    browser.find_element(By.ID, "file").send_keys(str(xray))
    wait.until(ready.visibility_of_element_located((By.ID, "answer")))
    probability = browser.find_element(By.ID, "probability").text
    assert probability.endswith("%") and 0 <= float(probability[:-1]) <= 100
    assert browser.find_element(By.ID, "decision").text in ("NORMAL", "PNEUMONIA")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    for picture in ("image", "heatmap"):
        element = browser.find_element(By.ID, picture)
        wait.until(lambda d, e=element: d.execute_script(loaded, e) > 0)
    assert browser.find_element(By.ID, "error").text == ""
    assert "not a diagnostic device" in browser.find_element(By.ID, "caveat").text
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("PNEUMONIA_SCREENSHOT"):
        shutil.copy(shot, os.environ["PNEUMONIA_SCREENSHOT"])


def test_a_bad_upload_shows_its_reason_on_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    browser.get(server)
    browser.find_element(By.ID, "file").send_keys(str(text))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "notes.txt is not a JPEG, PNG or DICOM file"
