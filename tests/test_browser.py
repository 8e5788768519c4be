"""The widgets in a real browser: JupyterLab on localhost, Debian's Chromium driven by Playwright.

Opens tests/browser/inspect_widgets.ipynb (built on the stored run log tests/browser/run), runs every
cell, checks that the inspector and the playground render, drags the playground's "format" weight to 0
and sees the zero-variance count and the advantages plot change. Screenshots go to test-output/.
CI installs the browser with scripts/install_browser.sh.
"""

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "browser"
OUTPUT = REPO / "test-output"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ISOLATED_DIRS = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                 "JUPYTERLAB_WORKSPACES_DIR")  # the user's Jupyter settings and workspaces stay out of the test
SERVER_START_S = 90
PAGE_S = 60  # bound on each wait inside the page, in seconds

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"no Chromium at {CHROMIUM}; run scripts/install_browser.sh "
                              "(apt-get install -y chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed; run scripts/install_browser.sh (pip install playwright)"),
    pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None, reason="jupyterlab is not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {SERVER_START_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a temp copy of tests/browser, token disabled, config isolated; yields its URL."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **{var: str(tmp_path / var.lower()) for var in ISOLATED_DIRS}}
    port, log = free_port(), tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
           "--ServerApp.allow_root=True", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    with open(log, "w") as out:
        # its own process group, so teardown also ends the kernels it started
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and kernels), SIGKILL it if still there after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


KERNEL_READY = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && panel.sessionContext.isReady && kernel.connectionStatus === 'connected'
    && kernel.status === 'idle';
}"""


def run_all_cells(page, url: str) -> None:
    page.goto(f"{url}/lab/tree/inspect_widgets.ipynb", timeout=PAGE_S * 1000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=PAGE_S * 1000)
    page.wait_for_function(KERNEL_READY, timeout=PAGE_S * 1000)  # earlier, run-all asks which kernel to start
    page.evaluate("() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }")  # not awaited
    page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                           ".every(p => /\\[\\d+\\]/.test(p.textContent))", timeout=PAGE_S * 1000)


def test_widgets_render_and_react_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            try:
                run_all_cells(page, lab)
                check_rendered(page)
                check_slider_changes_plot(page)
            except Exception:
                page.screenshot(path=str(OUTPUT / "browser_failure.png"), full_page=True)
                raise
        finally:
            browser.close()


def check_rendered(page) -> None:
    """Both widgets render: the inspector's completion cards, the playground's sliders, status and plot."""
    status = page.locator(".widget-html", has_text="zero-variance groups")
    status.wait_for(timeout=PAGE_S * 1000)
    assert "1 / 3" in status.inner_text()
    assert page.locator(".grpo-card").count() == 4  # the inspector shows the G = 4 completions of a prompt
    assert page.locator(".widget-slider").count() == 3  # format, answer, regex weights
    page.locator("img.widget-image").first.wait_for(timeout=PAGE_S * 1000)
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    for bad in ("Loading widget", "Error displaying widget", "Traceback", "Error:"):
        assert not any(bad in text for text in outputs), f"{bad!r} in the notebook's outputs: {outputs}"


def check_slider_changes_plot(page) -> None:
    """Drag the "format" weight to 0: group 1 turns flat, the count reads 2 / 3 and the plot is redrawn."""
    image = page.locator("img.widget-image").first
    before = image.get_attribute("src")
    page.screenshot(path=str(OUTPUT / "browser_widgets_before.png"), full_page=True)
    handle = page.locator(".widget-slider").first.locator(".noUi-handle")
    handle.scroll_into_view_if_needed(timeout=PAGE_S * 1000)
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] - 400, box["y"] + box["height"] / 2, steps=10)
    page.mouse.up()
    page.locator(".widget-html", has_text="zero-variance groups: 2 / 3").wait_for(timeout=PAGE_S * 1000)
    page.wait_for_function("([img, src]) => img.src !== src", arg=[image.element_handle(), before],
                           timeout=PAGE_S * 1000)
    assert page.locator(".widget-slider").first.locator(".widget-readout").inner_text().strip() in ("0", "0.00")
    page.screenshot(path=str(OUTPUT / "browser_widgets.png"), full_page=True)
