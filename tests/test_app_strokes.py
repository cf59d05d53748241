"""Scribbles and lassos through the HTTP API (app/strokes.py), on the tiny random model of
tests/test_app_api.py: voxels of the input file in, the engine's stroke on the slice image and the
mask back; bad strokes answered 400 naming the value, the session unchanged."""

import numpy as np
import pytest

pytest.importorskip("fastapi")

from safeclick_jax.inference.interactions import from_json  # noqa: E402
from safeclick_jax.inference.prompts import scribble_points  # noqa: E402
from tests import test_app_api  # noqa: E402
from tests.test_app_api import _labels, _open  # noqa: E402

factory, data_dir, client = test_app_api.factory, test_app_api.data_dir, test_app_api.client  # the fixtures


def test_scribble_and_lasso(client):
    sid = _open(client)["id"]  # ct.nii.gz: 32 x 28 x 6, sliced along axis 2
    engine = client.app.state.store.get(sid).engine
    stroke = [[8, 6, 3], [9, 7, 3], [12, 10, 3], [16, 14, 3]]
    r = client.post(f"/api/volumes/{sid}/scribbles", json={"object": 1, "points": stroke})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["slice"] == 3 and p["axis"] == 2 and np.asarray(p["mask"]).shape == (32, 28)
    lab = np.asarray(_labels(client, sid).dataobj)
    np.testing.assert_array_equal(lab[:, :, 3] == 1, np.asarray(p["mask"]) == 1)
    # the engine got the voxels' positions on the slice image, in order, and clicked their midpoint
    entry = engine.interactions[-1]
    t = engine.voxel_to_slice(stroke[0])[0]
    assert entry["call"] == "add_scribble" and entry["args"]["label"] == 1 and entry["args"]["slice_index"] == t
    want = np.array([engine.voxel_to_slice(v)[1:] for v in stroke])
    np.testing.assert_array_equal(from_json(entry["args"]["stroke"]), want)
    np.testing.assert_array_equal(engine.object_state(1).points[t][0], scribble_points(want, engine.slice_hw, t))

    # a lasso on slice 2: a rectangle of voxels i in 4..14, j in 5..12 (closed by its last point)
    ring = [[4, 5, 2], [14, 5, 2], [14, 12, 2], [4, 12, 2], [4, 6, 2]]
    r = client.post(f"/api/volumes/{sid}/lassos", json={"object": 2, "points": ring})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["mask"]) == 1
    want = np.zeros((32, 28), bool)
    want[4:15, 5:13] = True
    assert (got == want).mean() > 0.97 and got[6:13, 7:11].all() and not got[20:].any()
    t = engine.voxel_to_slice([4, 5, 2])[0]
    assert client.post(f"/api/volumes/{sid}/undo").json()["undo"] == f"lasso on slice {t} of object 2"
    assert not (np.asarray(_labels(client, sid).dataobj) == 2).any()
    # background scribble on object 1
    r = client.post(f"/api/volumes/{sid}/scribbles", json={"points": [[20, 20, 3], [24, 22, 3]], "label": 0})
    t = engine.voxel_to_slice([20, 20, 3])[0]
    assert r.status_code == 200 and engine.history(1)[-1] == f"background scribble on slice {t}", r.text
    client.delete(f"/api/volumes/{sid}")


def test_bad_strokes_refused_and_session_kept(client):
    sid = _open(client)["id"]
    url = f"/api/volumes/{sid}"
    assert client.post(url + "/scribbles", json={"points": [[8, 6, 3], [16, 14, 3]]}).status_code == 200
    engine = client.app.state.store.get(sid).engine
    before = (np.asarray(_labels(client, sid).dataobj).copy(), len(engine.interactions))
    for kind, raw, words in (
        ("scribbles", b'{"points": [[8, 6, 3]]}', "scribble has 1 distinct point; at least 2 are needed"),
        ("scribbles", b'{"points": [[8, 6, 3], [8, 6, 3]]}', "scribble has 1 distinct point"),
        ("scribbles", b'{"points": []}', "points"),
        ("scribbles", b'{"points": [[8, 6, 3], [9, 6, 4]]}', "scribble point 1 [9, 6, 4] is off slice 3 of axis 2"),
        ("scribbles", b'{"points": [[8, 6, 3], [40, 6, 3]]}', "scribble point 1 [40, 6, 3] lies outside the volume"),
        ("scribbles", b'{"points": [[8, 6, 3], [NaN, 6, 3]]}', "voxel [nan, 6, 3]: nan is not a finite number"),
        ("scribbles", b'{"points": [[8, 6, 3], [8.5, 6, 3]]}', "8.5 is not an integer voxel index"),
        ("scribbles", b'{"points": [[8, 6, 3], [9, 6, 3]], "label": 2}', "label 2"),
        ("lassos", b'{"points": [[4, 5, 2], [14, 5, 2], [14, 12, 2]]}', "lasso does not close"),
        ("lassos", b'{"points": [[4, 5, 2], [14, 5, 2], [5, 5, 2]]}', "lasso encloses nothing on slice"),
        ("lassos", b'{"points": [[4, 5, 2], [14, 5, 1], [4, 5, 2]]}', "lasso point 1 [14, 5, 1] is off slice 2"),
        ("lassos", b'{"points": [[4, 5, 2], [14, 5, 2], [4, 5, 2]], "object": 0}', "object 0"),
    ):
        r = client.post(f"{url}/{kind}", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["detail"], (raw, r.text)
        np.testing.assert_array_equal(np.asarray(_labels(client, sid).dataobj), before[0])
        assert len(engine.interactions) == before[1]
    client.delete(f"/api/volumes/{sid}")
