"""The interactive protocols on a real (random, 128 px) network through the engine adapters of
evaluation/volume_session.py: the session's prompts reach the engine."""

import numpy as np
import pytest

from safeclick_jax.evaluation import interactive, noc, volume_session


def blob_case(labels=(1, 2)) -> interactive.Case:
    """8 slices of 32 x 32: label 1 a bright square on slices 2..5, label 2 a dim bar on slices 1..6."""
    rng = np.random.default_rng(0)
    image = rng.integers(20, 60, (8, 32, 32)).astype(np.uint8)
    lab = np.zeros((8, 32, 32), np.uint8)
    if 1 in labels:
        lab[2:6, 6:16, 6:16] = 1
    if 2 in labels:
        lab[1:7, 20:28, 4:28] = 2
    image[lab == 1] = 220
    image[lab == 2] = 140
    return interactive.Case("blobs", "toy", image, lab, (2.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def engine_model(app_model_dir):
    return volume_session.volume_model("tiny", app_model_dir)


def test_protocol_runs_on_the_engine(engine_model):
    case = blob_case()
    rows, notes = interactive.run([engine_model], [case], seed=1)
    assert notes == {}
    assert len(rows) == 2 * interactive.STEPS
    assert [(r["label"], r["step"]) for r in rows] == [(lab, s) for s in range(1, 7) for lab in (1, 2)]
    assert all(0.0 <= r["dsc"] <= 1.0 and 0.0 <= r["nsd"] <= 1.0 and r["seconds"] > 0 for r in rows)


def test_session_keeps_each_label_inside_its_box_and_clicks_reach_the_engine(engine_model):
    case = blob_case()
    session = engine_model.factory(case, [1, 2])
    rng = np.random.default_rng(0)
    boxes = {lab: interactive.box_3d(case.labels == lab, rng) for lab in (1, 2)}
    for lab, b in boxes.items():
        session.add_box(lab, b)
    pred = session.predict()
    assert pred.shape == case.labels.shape
    for lab, b in boxes.items():
        outside = np.ones(len(pred), bool)
        outside[b.z0 : b.z1 + 1] = False
        assert not (pred[outside] == lab).any()
    assert session.p.object_ids == [1, 2]
    before = len(session.p.history(1))
    session.add_click(1, (3, 10, 10), True)
    assert len(session.p.history(1)) == before + 1


def test_noc_on_the_image_predictor(app_model_dir):
    case = blob_case()
    model = volume_session.click_model("tiny", app_model_dir)
    results = [noc.noc_roi(model, case.image[3], case.labels[3] == 1, np.random.default_rng(0), 5) for _ in range(2)]
    r = results[0]
    assert 1 <= len(r["ious"]) <= 5 and all(0.0 <= v <= 1.0 for v in r["ious"])
    for key in ("85", "90"):
        assert r[f"noc_{key}"] == 5 or r[f"reached_{key}"]
    assert results[0] == results[1]
