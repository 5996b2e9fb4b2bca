"""The map explorer (segx_helpers.tutorial.widgets): unit tests of its wiring and score, and a real-browser test.

The browser test starts JupyterLab on 127.0.0.1, opens a notebook in headless Chromium (Debian's
``chromium`` and ``chromium-driver``, driven by selenium), runs all cells, changes the explorer's
controls and checks that the picture and the score change and that no widget error shows.

It opens a small notebook written to a temporary folder, not notebook 04: notebook 04 needs the
dataset and trained models of notebooks 01-03 (several CPU minutes), too much for the CI budget on
top of the notebook test. The small notebook builds a synthetic set of images, maps and masks with
numpy and calls ``segx_helpers.tutorial.widgets.explorer`` with ``threshold=`` exactly as notebook 04 does,
so the widget code path in the browser is the same.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pytest

from segx_helpers.scores.segu import segu_iou
from segx_helpers.tutorial.widgets import SCORE_NAME, Explorer, explorer, panel_score, render_panels

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO_ROOT / "outputs" / "browser" / "explorer.png"
THRESHOLD = 0.4

# Three 64 px images with a round "lesion"; per image two explained classes for each of two methods, the maps
# being blobs at different offsets from the lesion, so class, method and p all change the c_IoU score.
SYNTHETIC_SOURCE = '''\
import numpy as np
from segx_helpers.explain.targets import Explanations

rng = np.random.default_rng(0)
size = 64
yy, xx = np.mgrid[:size, :size]


def blob(cy, cx, r):
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r)).astype(np.float32)


centres = [(22, 22), (40, 36), (30, 42)]
tint = np.array([0.55, 0.35, 0.2], dtype=np.float32)
images = np.stack([np.clip(0.75 - 0.5 * blob(cy, cx, 9)[..., None] * tint + 0.05 * rng.random((size, size, 3)), 0, 1)
                   for cy, cx in centres]).astype(np.float32)
mask_prob = np.stack([blob(cy, cx, 9) for cy, cx in centres])
class_names = ["nevus", "melanoma", "keratosis"]
image_ids = [f"img_{i:02d}" for i in range(len(images))]


def explanations_for(method, shift):
    maps, image_index, class_index = [], [], []
    for i, (cy, cx) in enumerate(centres):
        for c in (0, 1):
            offset = shift + 7 * c
            maps.append(blob(cy + offset, cx - offset, 4 + 2 * c))
            image_index.append(i)
            class_index.append((i + c) % 3)
    return Explanations(maps=np.stack(maps), image_index=np.array(image_index), class_index=np.array(class_index),
                        confidence=rng.uniform(0.3, 0.9, len(maps)).astype(np.float32), method=method)


explanations = {"gradcam": explanations_for("gradcam", 0), "gradient_shap": explanations_for("gradient_shap", 9)}
'''
EXPLORER_SOURCE = ("from segx_helpers.tutorial.widgets import explorer\n\n"
                   f"explorer(images, explanations, mask_prob, class_names, image_ids, threshold={THRESHOLD})")


@pytest.fixture(scope="module")
def synthetic():
    namespace: dict = {}
    exec(SYNTHETIC_SOURCE, namespace)
    return namespace


def _explorer(synthetic, threshold=THRESHOLD) -> Explorer:
    s = synthetic
    return Explorer(s["images"], s["explanations"], s["mask_prob"], s["class_names"], s["image_ids"], threshold=threshold)


# ---------------------------------------------------------------- unit tests (no browser)

def test_explorer_selects_a_class_and_draws_on_creation(synthetic):
    view = _explorer(synthetic)
    assert view.class_box.value is not None and view.class_box.label == view.state.class_name
    assert view.state.method == "gradcam" and view.state.image_index == 0
    assert bytes(view.picture.value)[:8] == b"\x89PNG\r\n\x1a\n"


def test_explorer_score_is_segu_iou_at_the_given_threshold(synthetic):
    view = _explorer(synthetic)
    seen = set()
    for method, e in synthetic["explanations"].items():
        view.method_box.value = method
        for image in sorted(set(e.image_index.tolist())):
            view.image_box.value = image
            for _, k in view.class_box.options:
                view.class_box.value = k
                for p in (5.0, 20.0):
                    view.p_box.value = p
                    index = int(e.image_index[k])
                    expected = segu_iou(e.maps[k][None], (synthetic["mask_prob"][index] >= THRESHOLD)[None], p)[0]
                    assert view.state.method == method and view.state.map_index == k
                    assert view.state.score == pytest.approx(float(expected), abs=1e-12)
                    assert f"{SCORE_NAME} = {expected:.3f}" in view.score_label.value
                    seen.add(round(float(expected), 3))
    assert len(seen) > 4, "the synthetic maps should give different scores"
    # the threshold is the one passed in, not a fixed 0.5
    e, k = synthetic["explanations"]["gradcam"], 0
    strict = panel_score(e.maps[k], synthetic["mask_prob"][0], 5.0, threshold=0.9)
    default = _explorer(synthetic).state.score
    assert _explorer(synthetic, threshold=0.9).state.score == pytest.approx(strict)
    assert strict != pytest.approx(default) and default > 0


def test_explorer_redraws_when_the_method_changes(synthetic):
    view = _explorer(synthetic)
    before, draws, class_name = bytes(view.picture.value), view.draws, view.state.class_name
    view.method_box.value = "gradient_shap"
    assert view.draws == draws + 1
    assert view.state.method == "gradient_shap" and "gradient_shap" in view.state.title
    assert view.state.class_name == class_name, "the class stays selected across methods"
    assert bytes(view.picture.value) != before
    before = bytes(view.picture.value)
    view.image_box.value = 2
    assert view.state.image_index == 2 and view.class_box.value is not None and bytes(view.picture.value) != before


def test_render_panels_labels_c_iou_and_uses_the_threshold(synthetic):
    e = synthetic["explanations"]["gradcam"]
    fig = render_panels(synthetic["images"][0], e.maps[0], synthetic["mask_prob"][0], 5.0, "binary", "t",
                        threshold=THRESHOLD)
    titles = [ax.get_title() for ax in fig.axes]
    score = segu_iou(e.maps[0][None], (synthetic["mask_prob"][0] >= THRESHOLD)[None], 5.0)[0]
    assert f"{SCORE_NAME} {score:.3f}" in titles[1] and f"{THRESHOLD:.2f}" in titles[0]
    plt.close(fig)


def test_explorer_without_a_kernel_shows_a_static_figure(synthetic, capsys):
    s = synthetic
    fig = explorer(s["images"], s["explanations"], s["mask_prob"], s["class_names"], s["image_ids"], threshold=THRESHOLD)
    assert "static view" in capsys.readouterr().out and SCORE_NAME in fig.axes[1].get_title()
    plt.close(fig)


# ---------------------------------------------------------------- the real browser

def _browser_binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (chromium, driver) if chromium and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer at {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving ``tmp_path/root`` with the explorer notebook; yields (url, token)."""
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed")
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SYNTHETIC_SOURCE), nbformat.v4.new_code_cell(EXPLORER_SOURCE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "explorer.ipynb")
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # offline: no news or update checks, no "get notified about news?" toast
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(args, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{url}/api/status?token={token}", process, log)
        yield url, token
    finally:
        try:  # a clean shutdown also stops the kernel
            request = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(request, timeout=10).close()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture()
def browser(tmp_path):
    binaries = _browser_binaries()
    if binaries is None:
        pytest.skip("no chromium/chromedriver here (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(binaries[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _picture(driver):
    """(src, sha256 of the rendered pixels) of the explorer's image."""
    from selenium.webdriver.common.by import By

    img = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook img.widget-image")
    return img.get_attribute("src"), hashlib.sha256(img.screenshot_as_png).hexdigest()


def _score(driver) -> str:
    from selenium.webdriver.common.by import By

    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .widget-html") if SCORE_NAME in e.text]
    return labels[0] if labels else ""


def _widget_errors(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.TAG_NAME, "body").text
    return [error for error in ("Error displaying widget", "Model not found", "Failed to load model") if error in text]


def _dropdown(driver, label: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for box in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .widget-dropdown"):
        if box.find_element(By.TAG_NAME, "label").text.strip() == label:
            return Select(box.find_element(By.TAG_NAME, "select"))
    raise AssertionError(f"no dropdown labelled {label!r}")


def _changed(driver, before_picture, before_score, wait):
    """Wait until the picture and the score have both changed; return the new ones."""
    wait.until(lambda d: _score(d) != before_score and _picture(d)[0] != before_picture[0])
    after = _picture(driver), _score(driver)
    assert after[0][1] != before_picture[1], "the displayed pixels did not change"
    assert after[1] != before_score and _widget_errors(driver) == []
    return after


def test_explorer_in_jupyterlab_with_headless_chromium(jupyterlab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, token = jupyterlab
    driver = browser
    wait = WebDriverWait(driver, 120, poll_frequency=0.5)
    driver.get(f"{url}/lab/tree/explorer.ipynb?token={token}")
    wait.until(lambda d: d.execute_script(
        "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
        "return !!k && k.status === 'idle';"))
    driver.execute_script("return window.jupyterapp.commands.execute('notebook:run-all-cells');")
    wait.until(lambda d: _score(d) != "" and d.find_elements(By.CSS_SELECTOR, ".jp-Notebook img.widget-image"))
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('.jp-Notebook img.widget-image'); return i && i.naturalWidth > 0;"))
    assert _widget_errors(driver) == []
    picture, score = _picture(driver), _score(driver)
    assert "gradcam" in score and _dropdown(driver, "class").first_selected_option.text

    _dropdown(driver, "class").select_by_index(1)
    picture, score = _changed(driver, picture, score, wait)

    _dropdown(driver, "method").select_by_visible_text("gradient_shap")
    picture, score = _changed(driver, picture, score, wait)
    assert "gradient_shap" in score

    readout = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook .widget-hslider .widget-readout")
    readout.click()
    readout.send_keys(Keys.CONTROL, "a")
    readout.send_keys("25", Keys.ENTER)
    picture, score = _changed(driver, picture, score, wait)
    assert "top 25 %" in score

    _dropdown(driver, "image").select_by_index(2)
    picture, score = _changed(driver, picture, score, wait)

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("document.querySelector('.jp-Notebook .widget-dropdown').scrollIntoView({block: 'start'});")
    driver.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000 and _widget_errors(driver) == []
