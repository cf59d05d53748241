"""The web app's HTTP API (safeclick_jax.app.server) on a tiny random model, with FastAPI's test client."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from safeclick_jax.data.synthetic import make_volume  # noqa: E402
from tests.test_volume_file import bomb  # noqa: E402


@pytest.fixture(scope="module")
def factory(app_model_dir):
    from safeclick_jax.app.server import engine_factory

    return engine_factory(app_model_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    image, labels, affine = make_volume(3, shape=(32, 28, 6))
    nib.save(nib.Nifti1Image(image, affine), str(d / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(image[:, :, :1], affine), str(d / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([image, image], -1)[:, :, :, None], affine), str(d / "five.nii"))  # 5D
    nan = image.astype(np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(d / "nan.nii.gz"))
    raw = gzip.compress(nib.Nifti1Image(image, affine).to_bytes())
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (d / "notnifti.nii").write_bytes(b"hello, not a NIfTI header" * 20)
    bomb(d / "bomb.nii.gz", (1500, 1500, 1500))  # a small file whose header claims 1500^3 int16 zeros
    (d / "sub").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    nib.save(nib.Nifti1Image(image, affine), str(outside / "secret.nii.gz"))
    os.symlink(outside / "secret.nii.gz", d / "link.nii.gz")
    return d


@pytest.fixture(scope="module")
def client(factory, data_dir):
    from safeclick_jax.app.server import create_app

    app = create_app(factory, data_dir, max_upload_mb=1, model_name="tiny")
    with TestClient(app) as c:
        yield c


def _open(client, name="ct.nii.gz"):
    r = client.post("/api/volumes", json={"path": name})
    assert r.status_code == 200, r.text
    return r.json()


def _labels(client, sid, **params):
    r = client.get(f"/api/volumes/{sid}/labels.nii.gz", params=params)
    assert r.status_code == 200
    return nib.Nifti1Image.from_bytes(gzip.decompress(r.content))


def test_health_and_files(client):
    assert client.get("/api/health").json()["status"] == "ok"
    names = [f["path"] for f in client.get("/api/files").json()["files"]]
    assert "ct.nii.gz" in names and "link.nii.gz" not in names  # the link leaves the data folder


def test_click_propagate_undo_download(client, data_dir):
    v = _open(client)
    sid = v["id"]
    assert v["shape"] == [32, 28, 6] and v["spacing"] == [2.0, 2.0, 5.0]
    img = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/api/volumes/{sid}/image.nii.gz").content))
    assert img.shape == (32, 28, 6)
    r = client.post(f"/api/volumes/{sid}/prompts", json={"object": 1, "voxel": [12, 12, 3], "label": 1})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["slice"] == 3 and p["axis"] == 2 and np.asarray(p["mask"]).shape == (32, 28)
    lab = _labels(client, sid)
    assert np.array_equal(np.asarray(lab.dataobj)[:, :, 3] == 1, np.asarray(p["mask"]) == 1)
    assert np.allclose(lab.affine, nib.load(str(data_dir / "ct.nii.gz")).affine)
    # box on object 2 (created by the prompt)
    r = client.post(f"/api/volumes/{sid}/prompts", json={"object": 2, "box": [2, 2, 20, 20], "slice": 2, "axis": 2})
    assert r.status_code == 200, r.text
    assert np.array_equal(np.asarray(_labels(client, sid).dataobj)[:, :, 2] == 2, np.asarray(r.json()["mask"]) == 1)
    assert 2 in [o["id"] for o in client.get(f"/api/volumes/{sid}").json()["objects"]]
    before = np.asarray(_labels(client, sid).dataobj).copy()
    r = client.post(f"/api/volumes/{sid}/propagate", json={"object": 1})
    assert r.status_code == 200, r.text
    after = np.asarray(_labels(client, sid).dataobj)
    assert set(r.json()["voxels"]) == {"1", "2"}
    assert r.json()["voxels"]["1"] == int((after == 1).sum())
    # the final count says every slice is done
    assert r.json()["progress"] == {"done": 6, "total": 6}
    ev = client.get(f"/api/volumes/{sid}/events").text
    assert ev.startswith('data: {"done": 6, "total": 6, "running": false}')
    assert client.post(f"/api/volumes/{sid}/undo").status_code == 200
    assert np.array_equal(np.asarray(_labels(client, sid).dataobj), before)
    assert client.post(f"/api/volumes/{sid}/redo").status_code == 200
    assert np.array_equal(np.asarray(_labels(client, sid).dataobj), after)
    # hide object 2 for the page's overlay; the download keeps every object
    client.patch(f"/api/volumes/{sid}/objects/2", json={"visible": False, "name": "kidney"})
    assert not (np.asarray(_labels(client, sid, visible="true").dataobj) == 2).any()
    assert np.array_equal(np.asarray(_labels(client, sid).dataobj), after)
    # clear and delete
    assert client.post(f"/api/volumes/{sid}/objects/2/clear").status_code == 200
    assert not (np.asarray(_labels(client, sid).dataobj) == 2).any()
    assert client.delete(f"/api/volumes/{sid}/objects/2").status_code == 200
    saved = client.post(f"/api/volumes/{sid}/save").json()["saved"]
    assert saved == "ct_labels.nii.gz"
    on_disk = nib.load(str(data_dir / saved))
    assert np.array_equal(np.asarray(on_disk.dataobj), np.asarray(_labels(client, sid).dataobj))
    (data_dir / saved).unlink()
    assert client.delete(f"/api/volumes/{sid}").status_code == 200
    assert client.get(f"/api/volumes/{sid}").status_code == 404


def test_slices_encoded_after_opening(client):
    """After opening, the server encodes every slice in the background (a click then runs only
    the decoder); the volume's description says how far it is."""
    import time

    sid = _open(client)["id"]
    for _ in range(300):
        enc = client.get(f"/api/volumes/{sid}").json()["encoding"]
        if enc["done"] == enc["total"]:
            break
        time.sleep(0.1)
    assert enc == {"done": 6, "total": 6}
    assert client.delete(f"/api/volumes/{sid}").status_code == 200


def test_upload_and_label_map_start(client, data_dir):
    raw = (data_dir / "ct.nii.gz").read_bytes()
    r = client.post("/api/volumes", files={"file": ("mine.nii.gz", raw)})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    lab = np.zeros((32, 28, 6), np.uint8)
    lab[5:10, 5:10, 2:4] = 3
    up = nib.Nifti1Image(lab, nib.load(str(data_dir / "ct.nii.gz")).affine).to_bytes()
    r = client.post(f"/api/volumes/{sid}/labels", files={"file": ("l.nii", up)})
    assert r.status_code == 200 and r.json()["objects"] == [3]
    assert np.array_equal(np.asarray(_labels(client, sid).dataobj), lab)
    assert client.post(f"/api/volumes/{sid}/save").status_code == 400  # uploads have no place in data-dir


def test_two_sessions_do_not_mix(client):
    a, b = _open(client)["id"], _open(client)["id"]
    client.post(f"/api/volumes/{a}/prompts", json={"object": 1, "voxel": [12, 12, 3], "label": 1})
    assert np.asarray(_labels(client, a).dataobj).any()
    assert not np.asarray(_labels(client, b).dataobj).any()
    client.delete(f"/api/volumes/{a}")
    client.delete(f"/api/volumes/{b}")


BAD_OPEN = [
    ({"path": "../outside.nii.gz"}, "'..'"),
    ({"path": "/etc/passwd"}, "absolute"),
    ({"path": "link.nii.gz"}, "leaves the data folder"),
    ({"path": "missing.nii.gz"}, "no such file"),
    ({"path": "flat.nii.gz"}, "3D volume is needed"),
    ({"path": "five.nii"}, "3D volume is needed"),
    ({"path": "nan.nii.gz"}, "NaN"),
    ({"path": "truncated.nii.gz"}, "truncated"),
    ({"path": "notnifti.nii"}, "not a readable NIfTI"),
    ({"path": "bomb.nii.gz"}, "bomb.nii.gz: the header declares 1500 x 1500 x 1500 = 3375000000 voxels, above"),
    ({"path": "sub"}, "only .nii"),
    ({"path": 3}, "relative"),
]


def test_bad_requests_refused_and_server_still_segments(client):
    for body, words in BAD_OPEN:
        r = client.post("/api/volumes", json=body)
        assert r.status_code == 400 and words in r.json()["detail"], (body, r.text)
    assert (
        client.post("/api/volumes", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 400
    )
    r = client.post("/api/volumes", files={"file": ("x.pkl", b"\x80\x04pickle")})
    assert r.status_code == 400 and "only .nii" in r.json()["detail"]
    big = b"\0" * (2 * 2**20)
    assert client.post("/api/volumes", files={"file": ("big.nii", big)}).status_code == 413

    def chunks():
        for _ in range(40):
            yield b"\0" * 2**16

    r = client.post("/api/volumes", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    sid = _open(client)["id"]
    for body in (
        {"object": 1, "voxel": [99, 0, 0], "label": 1},
        {"object": 0, "voxel": [1, 1, 1]},
        {"object": 1, "voxel": [1, 1, 1], "label": 7},
        {"object": 1, "voxel": "x"},
        {"object": 1, "box": [5, 5, 1, 1], "slice": 2, "axis": 2},
        {"object": 1, "box": [1, 1, 5, 5], "slice": 99, "axis": 2},
        {"object": 1, "box": [1, 1, 5, 5], "slice": 2, "axis": 0},
        {"object": 1},
    ):
        r = client.post(f"/api/volumes/{sid}/prompts", json=body)
        assert r.status_code == 400, (body, r.text)
    assert client.post(f"/api/volumes/{sid}/propagate", json={}).status_code == 400  # nothing prompted
    assert client.post(f"/api/volumes/{sid}/propagate", json={"object": 9}).status_code == 400
    assert client.post(f"/api/volumes/{sid}/undo").status_code == 400
    assert client.post(f"/api/volumes/{sid}/labels", files={"file": ("l.nii.gz", b"junk")}).status_code == 400
    assert client.get("/api/volumes/nope/labels.nii.gz").status_code == 404
    # the same session still segments
    r = client.post(f"/api/volumes/{sid}/prompts", json={"object": 1, "voxel": [12, 12, 3], "label": 1})
    assert r.status_code == 200
    assert client.post(f"/api/volumes/{sid}/propagate").status_code == 200
    assert np.asarray(_labels(client, sid).dataobj).any() or r.json()["voxels"] == 0
    client.delete(f"/api/volumes/{sid}")


def test_voxels_must_be_finite_integers(client):
    """A non-integer, NaN or Inf voxel index is refused with 400 naming the value (never rounded),
    and the session keeps its state."""
    sid = _open(client)["id"]
    url = f"/api/volumes/{sid}/prompts"
    assert client.post(url, json={"object": 1, "voxel": [12, 12, 3], "label": 1}).status_code == 200
    before = (np.asarray(_labels(client, sid).dataobj), client.get(f"/api/volumes/{sid}").json())
    for raw, words in (
        (b'{"voxel": [1.5, 1, 1]}', "voxel [1.5, 1, 1]: 1.5 is not an integer voxel index"),
        (b'{"voxel": [NaN, 1, 1]}', "voxel [nan, 1, 1]: nan is not a finite number"),
        (b'{"voxel": [1, Infinity, 1]}', "voxel [1, inf, 1]: inf is not a finite number"),
        (b'{"box": [1, 1, 5.5, 5], "slice": 2}', "5.5 is not an integer voxel index"),
        (b'{"box": [1, 1, 5, 5], "slice": 2.5}', "slice 2.5: Input should be a valid integer"),
        (b'{"voxel": [1, 1, 1], "object": 1.5}', "object 1.5: Input should be a valid integer"),
        (b'{"voxel": [1, 1, 1], "lable": 0}', "lable: unknown field"),
    ):
        r = client.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["detail"], (raw, r.text)
    after = (np.asarray(_labels(client, sid).dataobj), client.get(f"/api/volumes/{sid}").json())
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1]["objects"] == before[1]["objects"]
    undone = client.post(f"/api/volumes/{sid}/undo").json()["undo"]  # the one click before, no other
    assert undone.startswith("click on slice") and undone.endswith("of object 1") and "," not in undone
    client.delete(f"/api/volumes/{sid}")


def test_normalization_field(client):
    """The intensity mapping is chosen when a volume opens (default auto: the CT window for this CT);
    a bad value is refused with 400 naming it, and no session or file is left behind."""
    for body, mode in (({}, "ct_window"), ({"normalization": "percentile"}, "percentile")):
        r = client.post("/api/volumes", json={"path": "ct.nii.gz", **body})
        assert r.status_code == 200 and r.json()["normalization"] == mode, r.text
        client.delete(f"/api/volumes/{r.json()['id']}")
    store = client.app.state.store
    before = (len(store), sorted(store.root.iterdir()))
    for bad in ("hu", None, 3):
        r = client.post("/api/volumes", json={"path": "ct.nii.gz", "normalization": bad})
        assert r.status_code == 400 and repr(bad) in r.json()["detail"], r.text
    r = client.post("/api/volumes", files={"file": ("ct.nii.gz", b"x")}, data={"normalization": "hu"})
    assert r.status_code == 400 and "'hu'" in r.json()["detail"], r.text
    assert (len(store), sorted(store.root.iterdir())) == before


def test_idle_sessions_free_their_engine_and_keep_their_state(client):
    """(Resuming them: tests/test_app_state.py.)"""
    import time

    store = client.app.state.store
    sid = _open(client)["id"]
    for _ in range(300):  # the background encoding makes the session busy, and busy ones stay
        if client.get(f"/api/volumes/{sid}").json()["encoding"] == {"done": 6, "total": 6}:
            break
        time.sleep(0.1)
    store.idle_s, idle = 0.0, store.idle_s
    try:
        assert sid in store.expire()
    finally:
        store.idle_s = idle
    d = client.get(f"/api/volumes/{sid}").json()
    assert d["live"] is False and d["objects"] == [{"id": 1, "name": "object 1", "visible": True}]
    assert (store.root / sid / "state.json").is_file()
    assert client.delete(f"/api/volumes/{sid}").status_code == 200
    assert not (store.root / sid).exists()


def test_safe_path(tmp_path):
    from safeclick_jax.app.server import safe_path
    from safeclick_jax.app.sessions import BadInput

    (tmp_path / "a").mkdir()
    assert safe_path(tmp_path, "a/x.nii") == (tmp_path / "a" / "x.nii").resolve()
    for bad in ("a/../../b", "/abs.nii", "", "\\x.nii"):
        with pytest.raises(BadInput):
            safe_path(tmp_path, bad)


def test_dicom_series_folder_and_zip(client, data_dir):
    """A DICOM series folder under --data-dir and an uploaded .zip of one open as volumes on the
    series' own grid; the label map is saved beside the folder as NAME_labels.nii.gz."""
    import io
    import zipfile

    from safeclick_jax.data.volume_file import read_volume
    from tests.dicom_series import phantom, rotation, series_geometry, write_series

    r = rotation(20, -12, 31)
    paths = write_series(
        data_dir / "series1", phantom(), *series_geometry(r[:, 0], r[:, 1], 2 * r[:, 2], (0.75, 0.6), (0, 0, 0))
    )
    assert "series1" in [f["path"] for f in client.get("/api/files").json()["files"]]
    want = read_volume(data_dir / "series1").image
    v = _open(client, "series1")
    assert v["shape"] == [24, 20, 12]
    img = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(f"/api/volumes/{v['id']}/image.nii.gz").content))
    assert img.shape == (24, 20, 12) and np.allclose(img.affine, want.affine)
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(want.dataobj))
    r = client.post(f"/api/volumes/{v['id']}/prompts", json={"object": 1, "voxel": [12, 10, 6], "label": 1})
    assert r.status_code == 200, r.text
    assert client.post(f"/api/volumes/{v['id']}/save").json()["saved"] == "series1_labels.nii.gz"
    saved = nib.load(str(data_dir / "series1_labels.nii.gz"))
    assert saved.shape == (24, 20, 12) and np.allclose(saved.affine, want.affine)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in paths:
            z.write(p, os.path.basename(p))
    r = client.post("/api/volumes", files={"file": ("ct.zip", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == [24, 20, 12]
    r = client.post("/api/volumes", files={"file": ("bad.zip", b"PK\x03\x04 not a zip")})
    assert r.status_code == 400 and "unreadable zip file" in r.json()["detail"]
