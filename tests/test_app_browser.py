"""The web page in a real browser: headless Chromium (WebGL through SwiftShader) driven by selenium
opens the example volume, clicks inside a structure, presses P (propagate) and checks that the
overlay appeared; draws a scribble (S) and a lasso (L) and checks the strokes the server got and
the masks they gave. Skipped when chromium/chromedriver or niivue (npm ci) are missing:
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
    yield f"http://127.0.0.1:{port}", path, app
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


def _open_page(driver, url):
    driver.get(url + "/")
    _wait(driver, "const s = window.safeclick; return s && s.state.vol && s.nv.volumes.length === 1 && !s.state.busy")


def _liver_voxel():
    """(labels, voxel): the voxel of the liver (label 1) of the example volume farthest from its
    boundary on the middle axial slice (the liver is not convex: its centroid may lie in a lesion
    or outside)."""
    from demo import example_case

    _, labels, _ = example_case()
    k = labels.shape[2] // 2
    depth = scipy.ndimage.distance_transform_edt(labels[:, :, k] == 1)
    return labels, [*map(int, np.unravel_index(np.argmax(depth), depth.shape)), k]


def _canvas_offsets(driver, voxels):
    """Where voxels (all on one axial slice) are on the axial tile of the viewer, in CSS pixels
    from the canvas centre (what ActionChains' offsets are). Moves the crosshair to that slice."""
    pos = driver.execute_script(
        """const [s, vs] = [window.safeclick, arguments[0]];
        const A = s.state.vol.affine;
        const mm = (v) => [0, 1, 2].map((r) => A[r][0] * v[0] + A[r][1] * v[1] + A[r][2] * v[2] + A[r][3]);
        const frac = (v) => s.nv.mm2frac(mm(v));
        s.nv.scene.crosshairPos = frac(vs[0]);  // that slice on the views, so the axial tile holds the voxels
        s.nv.drawScene();
        const cv = document.getElementById('gl');
        const [sx, sy] = [cv.width / cv.clientWidth, cv.height / cv.clientHeight];
        return vs.map((v) => {
          const t = s.nv.frac2canvasPosWithTile(frac(v), 0);
          const p = t ? t.pos : s.nv.frac2canvasPos(frac(v));
          return [p[0] / sx - cv.clientWidth / 2, p[1] / sy - cv.clientHeight / 2];
        });""",
        voxels,
    )
    return [(int(round(x)), int(round(y))) for x, y in pos]


def test_page_click_propagate_overlay(server, driver):
    from selenium.webdriver.common.action_chains import ActionChains

    url, path, _ = server
    _open_page(driver, url)
    before = _canvas_pixels(driver)
    labels, vox = _liver_voxel()
    [(x, y)] = _canvas_offsets(driver, [vox])
    canvas = driver.find_element("id", "gl")
    ActionChains(driver).move_to_element_with_offset(canvas, x, y).click().perform()
    _wait(driver, "return document.getElementById('timing').textContent.startsWith('click')", 150)
    sid = driver.execute_script("return window.safeclick.state.vol.id")
    canvas.send_keys("p")
    driver.find_element("tag name", "body").send_keys("p")
    _wait(driver, "return document.getElementById('timing').textContent.startsWith('propagate')", 150)
    time.sleep(0.5)
    after = _canvas_pixels(driver)
    lab = _labels(url, sid)
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


def _draw(driver, key, offsets, steps=4):
    """Presses the tool's key, then drags the pointer through `offsets` (from the canvas centre),
    `steps` pointer moves between consecutive ones."""
    from selenium.webdriver.common.action_chains import ActionChains

    driver.find_element("tag name", "body").send_keys(key)
    canvas = driver.find_element("id", "gl")
    chain = ActionChains(driver).move_to_element_with_offset(canvas, *offsets[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(offsets[:-1], offsets[1:]):
        done = (0, 0)
        for i in range(1, steps + 1):
            to = (round((x1 - x0) * i / steps), round((y1 - y0) * i / steps))
            chain.move_by_offset(to[0] - done[0], to[1] - done[1])
            done = to
    chain.release().perform()


def test_page_scribble_and_lasso(server, driver):
    """S, a stroke inside the liver: a scribble of object 1 there; N, L, a closed square on the next
    slice (where object 1 has nothing, so the overlap rule leaves it whole): object 2's mask is
    that square on that slice and nothing elsewhere."""
    from safeclick_jax.inference.interactions import from_json

    url, path, app = server
    _open_page(driver, url)
    labels, (i, j, k) = _liver_voxel()
    liver = labels[:, :, k] == 1
    lo, hi = i, i
    while lo > i - 6 and liver[lo - 1, j]:
        lo -= 1
    while hi < i + 6 and liver[hi + 1, j]:
        hi += 1
    line = [[lo, j, k], [hi, j, k]]  # along the first voxel axis, inside the liver
    _draw(driver, "s", _canvas_offsets(driver, [line[0], line[-1]]), steps=8)
    _wait(driver, "return document.getElementById('timing').textContent.startsWith('scribble')", 150)
    sid = driver.execute_script("return window.safeclick.state.vol.id")
    engine = app.state.store.get(sid).engine
    entry = engine.interactions[-1]
    assert entry["call"] == "add_scribble" and entry["args"]["label"] == 1 and entry["args"]["obj_id"] == 1
    drawn = from_json(entry["args"]["stroke"])  # (x, y) on the slice image
    want = np.array([engine.voxel_to_slice(v)[1:] for v in (line[0], line[-1])])
    assert len(drawn) >= 3 and np.abs(drawn[[0, -1]] - want).max() <= 1.0, (drawn, want)
    t = engine.voxel_to_slice(line[0])[0]
    on_liver = engine.geometry.to_slice_stack(labels)[t] == 1
    xs, ys = np.rint(drawn).astype(int).T
    assert on_liver[ys, xs].all(), "the stroke left the liver"
    lab = _labels(url, sid)
    assert (lab[:, :, k] == 1).sum() > 0 and not (lab[:, :, [n for n in range(lab.shape[2]) if n != k]] == 1).any()

    driver.find_element("tag name", "body").send_keys("n")
    _wait(driver, "return window.safeclick.state.obj === 2 && !window.safeclick.state.busy")
    r, k = 8, k + 1
    corners = [[i - r, j - r, k], [i + r, j - r, k], [i + r, j + r, k], [i - r, j + r, k], [i - r, j - r + 1, k]]
    _draw(driver, "l", _canvas_offsets(driver, corners))
    _wait(driver, "return document.getElementById('timing').textContent.startsWith('lasso')", 150)
    t = engine.voxel_to_slice(corners[0])[0]
    assert engine.interactions[-1]["call"] == "add_lasso" and engine.history(2) == [f"lasso on slice {t}"]
    lab = _labels(url, sid)
    square = np.zeros(lab.shape[:2], bool)
    square[i - r : i + r + 1, j - r : j + r + 1] = True
    got = lab[:, :, k] == 2
    dice = 2 * (got & square).sum() / (got.sum() + square.sum())
    assert dice > 0.8 and not (got & ~scipy.ndimage.binary_dilation(square, iterations=2)).any(), dice
    assert (lab == 2).sum() == got.sum()  # nothing on the other slices


def _labels(url, sid):
    import urllib.request

    raw = urllib.request.urlopen(f"{url}/api/volumes/{sid}/labels.nii.gz").read()
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj)
