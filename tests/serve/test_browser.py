"""The web page in a real browser: `python -m pneumonia.serve` in its own process, headless
Chromium driven by Selenium uploads a synthetic X-ray, and the probability, the decision, the
heatmap and the model card appear; markup in a model card or a file name shows as text and its
script does not run.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`;
`.ci/run` installs them); without them the test is skipped with that line. With
PNEUMONIA_SCREENSHOT=FILE it also saves its screenshot there (the docs' picture; set
PNEUMONIA_SCREENSHOT_CKPT and PNEUMONIA_SCREENSHOT_IMAGE for a trained model and a real image).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CARD, write_image
from test_process import serving

from pneumonia.training.checkpoint import finish_checkpoint, read_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver: apt-get install chromium chromium-driver (docs/use.md)",
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The server as a user starts it, until the module's tests are done."""
    checkpoint = Path(os.environ.get("PNEUMONIA_SCREENSHOT_CKPT", tiny_checkpoint))
    with serving(checkpoint) as (url, _):
        yield url


# Markup that runs script if a page parses it: it changes the title and leaves an element.
SCRIPT = "<img src=x id=injected onerror=\"document.title='pwned'\">"
TITLE = "pneumonia: chest radiograph classifier"


def hostile_card() -> dict:
    """The tiny checkpoint's card with markup in every field the page shows."""
    card = {
        key: dict(value) if isinstance(value, dict) else value for key, value in TINY_CARD.items()
    }
    card["trained_on"] |= {"source": SCRIPT, "images": SCRIPT, "per_class": {SCRIPT: SCRIPT}}
    card["training"] = {"selected_by": SCRIPT, "federated": {"strategy": SCRIPT, "clients": SCRIPT}}
    card["threshold_rule"] = card["caveat"] = SCRIPT
    card["privacy"] = {SCRIPT: {"mechanism": SCRIPT, "epsilon": 1.0, "delta": SCRIPT}}
    card["val"] = card["val"] | {"n": SCRIPT}
    return card


@pytest.fixture(scope="module")
def hostile_server(tiny_checkpoint, tmp_path_factory):
    """A server of a checkpoint whose model card holds markup."""
    checkpoint = tmp_path_factory.mktemp("hostile") / "best.ckpt"
    shutil.copy(tiny_checkpoint, checkpoint)
    finish_checkpoint(checkpoint, read_checkpoint(checkpoint)[2], 0.5, hostile_card())
    with serving(checkpoint) as (url, _):
        yield url


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


def upload(browser, server: str, xray: Path):
    """Open the page, wait for its model card, drop `xray` on it and wait for the answer;
    return the page's wait (60 s)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "Validation" in d.find_element(By.ID, "card-body").text)
    browser.find_element(By.ID, "file").send_keys(str(xray))
    wait.until(ready.visibility_of_element_located((By.ID, "answer")))
    return wait


def test_dropping_an_xray_shows_probability_decision_heatmap_and_card(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    chosen = os.environ.get("PNEUMONIA_SCREENSHOT_IMAGE")  # a real radiograph for the docs
    if chosen:
        xray = Path(chosen).resolve()  # chromedriver wants a canonical path
    else:
        xray = write_image(tmp_path / "xray.png", 150, (320, 280), fmt="PNG")
    wait = upload(browser, server, xray)
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


def test_markup_in_a_model_card_or_a_file_name_is_text_and_never_runs(
    hostile_server, browser, tmp_path
):
    from selenium.webdriver.common.by import By

    named = "<img src=x id=named>.png"  # a file name is the user's too
    xray = write_image(tmp_path / named, 150, (64, 64), fmt="PNG")
    upload(browser, hostile_server, xray)
    card = browser.find_element(By.ID, "card-body").text
    assert f"Trained on {SCRIPT}: {SCRIPT} images" in card
    assert f"Validation (patients held out of training) (n={SCRIPT})" in card
    assert browser.find_element(By.ID, "identity").text.startswith(named)
    assert browser.find_elements(By.CSS_SELECTOR, "#injected, #named") == []
    assert browser.title == TITLE
