"""The web page in a real browser: headless Chromium (WebGL through SwiftShader) driven by selenium
opens the example volume, clicks inside a structure, presses P (propagate) and checks that the
overlay appeared. Skipped when chromium/chromedriver or niivue (npm ci) are missing:
`make browser-deps app-setup` installs them. APP_SCREENSHOT=PATH saves the page's screenshot,
taken with the demo model of `make train` (trained first when absent) instead of the test's
random-weights model, so it shows a plausible segmentation (`make screenshot`)."""

import gzip
import io
import os
import shutil
import socket
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")

from safeclick_jax.app.server import NIIVUE_DIST  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None or not (NIIVUE_DIST / "index.js").exists(),
    reason="needs chromium + chromium-driver (make browser-deps) and niivue (make app-setup)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    import uvicorn

    from demo import demo_checkpoint, example_volume
    from safeclick_jax.app.server import create_app, engine_factory

    data = tmp_path_factory.mktemp("appdata")
    path = example_volume(data)
    if os.environ.get("APP_SCREENSHOT"):
        factory, name = engine_factory(str(demo_checkpoint()), untrained_memory=True), "demo"
    else:
        factory, name = engine_factory(request.getfixturevalue("app_model_dir")), "tiny random"
    app = create_app(factory, data, model_name=name)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", path
    srv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--use-gl=angle",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
    ):
        opts.add_argument(arg)
    if shutil.which("chromium"):
        opts.binary_location = shutil.which("chromium")
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_script_timeout(60)
    yield d
    d.quit()


def _wait(driver, js, timeout=40.0):
    end = time.time() + timeout
    while time.time() < end:
        v = driver.execute_script(js)
        if v:
            return v
        time.sleep(0.2)
    err = driver.execute_script(
        "const t = (id) => document.getElementById(id).textContent; return t('error') + ' / status: ' + t('status')"
    )
    raise AssertionError(f"timed out waiting for: {js}; page error: {err}")


def _canvas_pixels(driver):
    from PIL import Image

    png = driver.find_element("id", "gl").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_page_click_propagate_overlay(server, driver):
    from selenium.webdriver.common.action_chains import ActionChains

    from demo import example_case

    url, path = server
    driver.get(url + "/")
    _wait(driver, "const s = window.safeclick; return s && s.state.vol && s.nv.volumes.length === 1 && !s.state.busy")
    before = _canvas_pixels(driver)
    # the voxel of the liver (label 1) of the example volume farthest from its boundary, on the
    # middle axial slice (the liver is not convex: its centroid may lie in a lesion or outside)
    _, labels, _ = example_case()
    k = labels.shape[2] // 2
    depth = scipy.ndimage.distance_transform_edt(labels[:, :, k] == 1)
    vox = [*map(int, np.unravel_index(np.argmax(depth), depth.shape)), k]
    pos = driver.execute_script(
        """const [s, v] = [window.safeclick, arguments[0]];
        const A = s.state.vol.affine;
        const mm = [0, 1, 2].map((r) => A[r][0] * v[0] + A[r][1] * v[1] + A[r][2] * v[2] + A[r][3]);
        const frac = s.nv.mm2frac(mm);
        s.nv.scene.crosshairPos = frac;  // that slice on the views, so the axial tile holds the voxel
        s.nv.drawScene();
        const t = s.nv.frac2canvasPosWithTile(frac, 0);
        const p = t ? t : { pos: s.nv.frac2canvasPos(frac) };
        const cv = document.getElementById('gl');
        return [p.pos[0] / (cv.width / cv.clientWidth), p.pos[1] / (cv.height / cv.clientHeight),
                cv.clientWidth, cv.clientHeight];""",
        vox,
    )
    x, y, w, h = pos
    canvas = driver.find_element("id", "gl")
    ActionChains(driver).move_to_element_with_offset(canvas, int(x - w / 2), int(y - h / 2)).click().perform()
    _wait(driver, "return document.getElementById('timing').textContent.startsWith('click')", 150)
    sid = driver.execute_script("return window.safeclick.state.vol.id")
    canvas.send_keys("p")
    driver.find_element("tag name", "body").send_keys("p")
    _wait(driver, "return document.getElementById('timing').textContent.startsWith('propagate')", 150)
    time.sleep(0.5)
    after = _canvas_pixels(driver)
    import urllib.request

    raw = urllib.request.urlopen(f"{url}/api/volumes/{sid}/labels.nii.gz").read()
    lab = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)
    assert lab.shape == labels.shape and (lab == 1).sum() > 0
    changed = np.abs(after - before).sum(-1) > 30
    assert changed.mean() > 0.0005, f"overlay not visible: {changed.sum()} pixels changed"
    # red overlay (object 1) on the slices: some changed pixels are red-dominant
    red = (after[..., 0] > after[..., 1] + 40) & changed
    assert red.sum() > 20, f"{red.sum()} red overlay pixels"
    shot = os.environ.get("APP_SCREENSHOT")
    if shot:
        driver.save_screenshot(shot)
    # a reload resumes the session named in the page's URL: same id, the overlay drawn again
    assert f"session={sid}" in driver.current_url
    driver.refresh()
    ready = "const s = window.safeclick; return s && s.state.vol && s.nv.volumes.length === 1 && !s.state.busy"
    _wait(driver, ready)
    assert driver.execute_script("return window.safeclick.state.vol.id") == sid
    time.sleep(0.5)
    again = _canvas_pixels(driver)
    assert ((again[..., 0] > again[..., 1] + 40) & (np.abs(again - before).sum(-1) > 30)).sum() > 20
