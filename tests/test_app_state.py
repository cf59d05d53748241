"""Nothing lost (app/persist.py, app/sessions.py): every path by which a session leaves memory (a
page reload, idle time, the cap on live sessions, a restart, kill -9) and comes back, each
checking that the label map after resuming equals the one before; the API key and the limits
of a shared server (app/auth.py)."""

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from safeclick_jax.data.synthetic import make_volume  # noqa: E402

KEY = "k" * 8 + "-test-key-0123"


@pytest.fixture(scope="module")
def factory(app_model_dir):
    from safeclick_jax.app.server import engine_factory

    return engine_factory(app_model_dir)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    image, _, affine = make_volume(3, shape=(32, 28, 6))
    nib.save(nib.Nifti1Image(image, affine), str(d / "ct.nii.gz"))
    return d


def _app(factory, data_dir, state_dir, **kw):
    from safeclick_jax.app.server import create_app

    return create_app(factory, data_dir, max_upload_mb=1, model_name="tiny", state_dir=state_dir, **kw)


def _labels(client, sid, status=200):
    r = client.get(f"/api/volumes/{sid}/labels.nii.gz")
    assert r.status_code == status, r.text
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj) if status == 200 else r


def _work(client):
    """A session with a click, a box on a second object and a propagation -> (id, label map)."""
    r = client.post("/api/volumes", json={"path": "ct.nii.gz"})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    assert client.post(f"/api/volumes/{sid}/prompts", json={"voxel": [12, 12, 3], "label": 1}).status_code == 200
    r = client.post(f"/api/volumes/{sid}/prompts", json={"object": 2, "box": [2, 2, 9, 9], "slice": 2, "axis": 2})
    assert r.status_code == 200, r.text
    assert client.post(f"/api/volumes/{sid}/propagate", json={"object": 1}).status_code == 200
    assert client.patch(f"/api/volumes/{sid}/objects/2", json={"name": "kidney", "visible": False}).status_code == 200
    lab = _labels(client, sid)
    assert set(np.unique(lab)) == {0, 1, 2}
    return sid, lab


def _undo_redo_equal(client, sid, lab):
    """Undo and redo after resuming: the histories came back with the label map."""
    assert client.post(f"/api/volumes/{sid}/undo").status_code == 200
    assert not np.array_equal(_labels(client, sid), lab)
    assert client.post(f"/api/volumes/{sid}/redo").status_code == 200
    assert np.array_equal(_labels(client, sid), lab)


def test_reload_resumes_the_session(factory, data_dir, tmp_path):
    with TestClient(_app(factory, data_dir, tmp_path / "state")) as c:
        sid, lab = _work(c)
        # a reload: the page asks for its session by the id in its URL
        d = c.get(f"/api/volumes/{sid}").json()
        assert d["live"] and [o["name"] for o in d["objects"]] == ["object 1", "kidney"]
        assert np.array_equal(_labels(c, sid), lab)
        r = c.get("/api/volumes/nonesuch")
        assert r.status_code == 404 and "'nonesuch'" in r.json()["detail"]
        assert c.post("/api/volumes/nonesuch/undo").status_code == 404


def test_idle_session_frees_its_engine_and_resumes(factory, data_dir, tmp_path):
    app = _app(factory, data_dir, tmp_path / "state", idle_s=3600)
    with TestClient(app) as c:
        sid, lab = _work(c)
        store = app.state.store
        store.idle_s = 0.0
        assert store.expire() == [sid]
        store.idle_s = 3600
        d = c.get(f"/api/volumes/{sid}").json()
        assert not d["live"] and d["resume"]["running"] is False
        assert np.array_equal(_labels(c, sid), lab)  # from disk, without waking
        assert not c.get(f"/api/volumes/{sid}").json()["live"]
        r = c.post(f"/api/volumes/{sid}/resume")  # the page, on return: wakes in the background
        assert r.status_code == 200
        for _ in range(200):
            d = c.get(f"/api/volumes/{sid}").json()
            if d["live"]:
                break
            time.sleep(0.05)
        assert d["live"] and d["resume"]["done"] == d["resume"]["total"] == 4  # add_object, 2 prompts, propagate
        _undo_redo_equal(c, sid, lab)


def test_cap_frees_least_recently_used_engines_never_state(factory, data_dir, tmp_path):
    from safeclick_jax.app.sessions import Busy

    app = _app(factory, data_dir, tmp_path / "state", max_sessions=2)
    with TestClient(app) as c:
        a, lab_a = _work(c)
        b, lab_b = _work(c)
        c.get(f"/api/volumes/{a}")  # a is now more recently used than b
        new = c.post("/api/volumes", json={"path": "ct.nii.gz"}).json()["id"]
        live = {k: c.get(f"/api/volumes/{k}").json()["live"] for k in (a, b, new)}
        assert live == {a: True, b: False, new: True}
        assert np.array_equal(_labels(c, b), lab_b)
        _undo_redo_equal(c, b, lab_b)  # b wakes; a (least recently used now) is freed
        assert not c.get(f"/api/volumes/{a}").json()["live"]
        assert np.array_equal(_labels(c, a), lab_a)
        # every live session busy: a new one gets 503 with a message, nobody loses anything
        store = app.state.store
        held = [s for s in store._sessions.values() if s.live]
        for s in held:
            s.lock.acquire()
        try:
            r = c.post("/api/volumes", json={"path": "ct.nii.gz"})
            assert r.status_code == 503 and "all 2 live sessions are busy" in r.json()["detail"]
            with pytest.raises(Busy):
                store.make_room()
        finally:
            for s in held:
                s.lock.release()
        assert np.array_equal(_labels(c, a), lab_a) and np.array_equal(_labels(c, b), lab_b)


def test_restart_resumes_every_session(factory, data_dir, tmp_path):
    state = tmp_path / "state"
    with TestClient(_app(factory, data_dir, state)) as c:
        a, lab_a = _work(c)
        raw = (data_dir / "ct.nii.gz").read_bytes()
        up = c.post("/api/volumes", files={"file": ("mine.nii.gz", raw)}).json()["id"]
        assert c.post(f"/api/volumes/{up}/prompts", json={"voxel": [10, 14, 2]}).status_code == 200
        lab_up = _labels(c, up)
    with TestClient(_app(factory, data_dir, state)) as c:  # a new server on the same state folder
        d = c.get(f"/api/volumes/{a}").json()
        assert not d["live"] and [o["visible"] for o in d["objects"]] == [True, False]
        assert np.array_equal(_labels(c, a), lab_a) and np.array_equal(_labels(c, up), lab_up)
        _undo_redo_equal(c, a, lab_a)
        assert c.post(f"/api/volumes/{up}/undo").status_code == 200
        assert not _labels(c, up).any()
        assert c.delete(f"/api/volumes/{up}").status_code == 200
    assert sorted(p.name for p in state.iterdir()) == [a]  # a closed session's state is gone


def test_changed_or_deleted_volume_file_is_refused_and_state_kept(factory, data_dir, tmp_path):
    state = tmp_path / "state"
    f = data_dir / "ct.nii.gz"
    original = f.read_bytes()
    with TestClient(_app(factory, data_dir, state)) as c:
        sid, lab = _work(c)
    img = nib.load(str(f))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine), str(f))
    with TestClient(_app(factory, data_dir, state)) as c:
        r = _labels(c, sid, status=409)
        assert "'ct.nii.gz'" in r.json()["detail"] and "changed on disk" in r.json()["detail"]
        r = c.post(f"/api/volumes/{sid}/prompts", json={"voxel": [3, 3, 3]})
        assert r.status_code == 409 and "checksum" in r.json()["detail"]
        f.unlink()
        r = c.post(f"/api/volumes/{sid}/undo")
        assert r.status_code == 409 and "was deleted" in r.json()["detail"]
        assert c.get(f"/api/volumes/{sid}").status_code == 200  # the state is kept
        f.write_bytes(original)
        assert np.array_equal(_labels(c, sid), lab)
        _undo_redo_equal(c, sid, lab)


def test_autosave_writes_beside_the_input(factory, data_dir, tmp_path):
    app = _app(factory, data_dir, tmp_path / "state", autosave=True, quiet_s=30.0)
    with TestClient(app) as c:
        sid, lab = _work(c)
        app.state.store.flush()  # what the writer does once the session is quiet
        saved = nib.load(str(data_dir / "ct_labels.nii.gz"))
        assert np.array_equal(np.asarray(saved.dataobj), lab)
        assert np.allclose(saved.affine, nib.load(str(data_dir / "ct.nii.gz")).affine)


def test_api_key(factory, data_dir, tmp_path):
    with TestClient(_app(factory, data_dir, tmp_path / "state", api_key=KEY)) as c:
        for headers, words in (
            ({}, "needs an API key"),
            ({"Authorization": "Bearer "}, "empty"),
            ({"Authorization": "Bearer"}, "empty"),
            ({"Authorization": "Bearer " + KEY[:-1] + "x"}, "wrong API key"),
            ({"Authorization": "Basic " + KEY}, "'Basic'"),
        ):
            r = c.get("/api/files", headers=headers)
            assert r.status_code == 401 and words in r.json()["detail"], (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/api/volumes", json={"path": "ct.nii.gz"}).status_code == 401
        assert c.get("/").status_code == 200  # the page holds no data: it asks for the key
        ok = {"Authorization": "Bearer " + KEY}
        assert c.get("/api/files", headers=ok).json()["files"][0]["path"] == "ct.nii.gz"


def test_key_required_beyond_loopback(tmp_path):
    from safeclick_jax.app.__main__ import main

    args = ["--checkpoint", str(tmp_path), "--data-dir", str(tmp_path), "--state-dir", str(tmp_path / "s")]
    with pytest.raises(SystemExit, match="--host 0.0.0.0 serves beyond this machine: give --api-key-file"):
        main(args + ["--host", "0.0.0.0"])
    (tmp_path / "key").write_text("\n")
    with pytest.raises(SystemExit, match="at least 16 characters"):
        main(args + ["--host", "0.0.0.0", "--api-key-file", str(tmp_path / "key")])


def test_limits_name_themselves(factory, data_dir, tmp_path):
    with TestClient(_app(factory, data_dir, tmp_path / "state", max_voxels=1000, max_bytes=1 << 20)) as c:
        r = c.post("/api/volumes", json={"path": "ct.nii.gz"})
        assert r.status_code == 400 and "above the limit of 1000 voxels" in r.json()["detail"]
    with TestClient(_app(factory, data_dir, tmp_path / "state", max_bytes=1000)) as c:
        r = c.post("/api/volumes", json={"path": "ct.nii.gz"})
        assert r.status_code == 400 and "(max_bytes)" in r.json()["detail"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model, data_dir, state, cache, port):
    cmd = [sys.executable, "-m", "safeclick_jax.app", "--checkpoint", model, "--data-dir", str(data_dir)]
    cmd += ["--state-dir", str(state), "--compilation-cache", str(cache), "--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())


def _wait_ready(http, proc):
    for _ in range(1200):
        assert proc.poll() is None, "the server exited"
        try:
            if http.get("/api/health").json()["state"] == "ready":
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


def test_kill_9_loses_nothing(app_model_dir, data_dir, tmp_path):
    """A real server process killed with SIGKILL right after a click answered: the restarted one
    has the session, its label map and its undo history."""
    httpx = pytest.importorskip("httpx")
    state, cache, port = tmp_path / "state", tmp_path / "xla", _free_port()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    proc = _serve(app_model_dir, data_dir, state, cache, port)
    try:
        _wait_ready(http, proc)
        sid, _ = _work(http)
        assert http.post(f"/api/volumes/{sid}/prompts", json={"voxel": [20, 8, 1], "object": 3}).status_code == 200
        lab = _labels(http, sid)
        os.kill(proc.pid, signal.SIGKILL)  # before the quiet period after which the label map is written behind
        proc.wait()
        proc = _serve(app_model_dir, data_dir, state, cache, port)
        _wait_ready(http, proc)
        assert [o["id"] for o in http.get(f"/api/volumes/{sid}").json()["objects"]] == [1, 2, 3]
        assert np.array_equal(_labels(http, sid), lab)  # replayed: no label map was on disk
        _undo_redo_equal(http, sid, lab)
    finally:
        proc.kill()
        proc.wait()
        http.close()
        shutil.rmtree(cache, ignore_errors=True)
