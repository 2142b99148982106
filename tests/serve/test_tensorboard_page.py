"""TensorBoard's own page in a real browser on a finished run: the curves come first and the
reported model's figures (`verdict/*`) after them, in the order TensorBoard itself draws the
groups. With PNEUMONIA_SCREENSHOT_TB=FILE it saves the page there (the docs' picture).
Skipped without Debian's chromium and chromium-driver, as the serve page's browser test is."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_browser import CHROMIUM, DRIVER, browser  # noqa: F401, F811  (the fixture)

from pneumonia import fit

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no chromium/chromedriver: apt-get install chromium "
    "chromium-driver"
)  # fmt: skip
TINY = ["--federated.enabled", "false", "--data.image_size", "32", "--model.width", "16",
        "--data.synthetic.n_patients", "40", "--trainer.max_epochs", "2"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(tmp_path_factory):
    """A finished tiny run served by TensorBoard as a user starts it."""
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    fit.main([*TINY, "--run_dir", str(run_dir)])
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host",
           "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def group_titles(driver, url: str) -> list[str]:
    driver.get(url + "#timeseries")
    for _ in range(60):
        titles = [e.text for e in driver.find_elements("css selector", ".group-title")]
        if "verdict" in titles:
            return titles
        time.sleep(0.5)
    return titles


def test_tensorboard_opens_on_the_curves_not_the_reported_models_figures(tensorboard, browser):  # noqa: F811
    titles = [t for t in group_titles(browser, tensorboard) if t != "Pinned"]
    assert "verdict" in titles, titles
    curves = [t for t in titles if t in ("train", "val", "val_shift", "global")]
    assert curves and titles.index("verdict") > max(titles.index(t) for t in curves), titles
    if os.environ.get("PNEUMONIA_SCREENSHOT_TB"):
        browser.save_screenshot(os.environ["PNEUMONIA_SCREENSHOT_TB"])
