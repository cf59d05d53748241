"""Scribbles and lassos in the engine: the points a scribble becomes and the mask a lasso encloses,
exactly; each is the prompt it stands for (same logits, same object state); both replay, undo
and redo; refused strokes name the value and leave the session as it was. The tiny random model
of tests/test_interactive.py (values are not meaningful; the bookkeeping is checked exactly)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safeclick_jax.inference import VolumePredictor
from safeclick_jax.inference.prompts import LASSO_CLOSE_FRACTION, SCRIBBLE_POINTS, lasso_mask, scribble_points
from tests import test_interactive
from tests.test_interactive import assert_same, snapshot, volume

predictor = test_interactive.predictor  # the fixture: a tiny random SAM 2 at 128 px

HW = (26, 30)  # the test volume's slices (rows, columns)


def test_scribble_points_are_the_middles_of_equal_parts():
    # an L of length 6 + 6 = 12 (a repeated point is dropped): its midpoint is the corner; 4 parts
    # of length 3 have their middles at arc lengths 1.5, 4.5, 7.5, 10.5
    stroke = [[2, 3], [8, 3], [8, 3], [8, 9]]
    assert SCRIBBLE_POINTS == 1
    np.testing.assert_array_equal(scribble_points(stroke, HW, 0), np.float32([[8, 3]]))
    got = scribble_points(stroke, HW, 0, k=4)
    np.testing.assert_array_equal(got, np.float32([[3.5, 3], [6.5, 3], [8, 4.5], [8, 7.5]]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(scribble_points([[0, 0], [10, 0]], HW, 0, k=5)[:, 0], [1, 3, 5, 7, 9])


def test_lasso_mask_is_the_enclosed_pixels():
    # a square through pixel centres 2..6, closed within the tolerance: 5 x 5 pixels, outline included
    square = lasso_mask([[2, 2], [6, 2], [6, 6], [2, 6], [2, 2.5]], HW, 0)
    want = np.zeros(HW, bool)
    want[2:7, 2:7] = True
    np.testing.assert_array_equal(square, want)
    # a right triangle with legs 7: the pixels with x + y <= 9 (x, y >= 1)
    tri = lasso_mask([[1, 1], [8, 1], [1, 8], [1, 1.2]], HW, 0)
    yy, xx = np.mgrid[0 : HW[0], 0 : HW[1]]
    np.testing.assert_array_equal(tri, (xx >= 1) & (yy >= 1) & (xx + yy <= 9))
    # a polygon with a concave notch: the notch stays out
    u = lasso_mask([[2, 2], [12, 2], [12, 12], [8, 12], [8, 6], [6, 6], [6, 12], [2, 12], [2, 2]], HW, 0)
    assert u[3, 3] and u[10, 10] and u[10, 3] and not u[10, 7] and u.sum() == 11 * 11 - 6  # x = 7, y = 7..12


def test_scribble_is_its_clicks_and_lasso_is_its_mask(predictor):
    p = predictor
    stroke = [[4, 5], [10, 6], [16, 12], [20, 20]]
    contour = [[3, 3], [18, 4], [20, 15], [6, 18], [3.5, 4]]
    p.set_volume(volume(), axis=2)
    s1 = p.add_scribble(2, stroke, obj_id=1, return_logits=True)
    p.add_scribble(2, [[25, 2], [28, 8]], label=0, obj_id=1)
    l1 = p.add_lasso(4, contour, obj_id=2, return_logits=True)
    got = snapshot(p)
    assert p.history(1) == ["scribble on slice 2", "background scribble on slice 2"]
    assert p.history(2) == ["lasso on slice 4"]
    pts = p.object_state(1).points[2]
    np.testing.assert_array_equal(pts[0][:SCRIBBLE_POINTS], scribble_points(stroke, p.slice_hw, 2))
    np.testing.assert_array_equal(pts[1], [1] * SCRIBBLE_POINTS + [0] * SCRIBBLE_POINTS)

    p.set_volume(volume(), axis=2)
    k = SCRIBBLE_POINTS
    c1 = p.add_prompt(2, points=scribble_points(stroke, p.slice_hw, 2), labels=[1] * k, obj_id=1, return_logits=True)
    p.add_prompt(2, points=scribble_points([[25, 2], [28, 8]], p.slice_hw, 2), labels=[0] * k, obj_id=1)
    m1 = p.add_mask(4, lasso_mask(contour, p.slice_hw, 4), obj_id=2, return_logits=True)
    want = snapshot(p)
    np.testing.assert_array_equal(s1, c1)
    np.testing.assert_array_equal(l1, m1)
    np.testing.assert_array_equal(got[0], want[0])
    for k in (1, 2):
        np.testing.assert_array_equal(got[1][k], want[1][k])


def test_strokes_replay_undo_redo(predictor):
    p = predictor
    p.set_volume(volume(), axis=2)
    p.add_scribble(1, [[4, 5], [10, 6], [16, 12]], obj_id=1)
    p.add_lasso(3, [[3, 3], [18, 4], [20, 15], [6, 18], [3, 3]], obj_id=2)
    p.propagate()
    p.add_scribble(3, [[12, 10], [14, 10]], label=0, obj_id=2)
    p.undo()
    p.redo()
    state = snapshot(p)
    log = json.loads(json.dumps(p.interactions))
    assert [e["call"] for e in log] == ["add_scribble", "add_lasso", "propagate", "add_scribble", "undo", "redo"]
    other = VolumePredictor(p.model, p.memory)
    other.set_volume(volume(), axis=2)
    other.replay(log)
    assert_same(snapshot(other), state)
    # undo the whole scribble (one step), then the lasso's propagation and the lasso itself
    assert p.undo(2) == "background scribble on slice 3 of object 2"
    assert p.undo(2).startswith("propagation") and p.undo(2) == "lasso on slice 3 of object 2"
    assert not (p.label_map() == 2).any()


def test_refused_strokes_keep_the_session(predictor):
    p = predictor
    p.set_volume(volume(), axis=2)
    p.add_scribble(1, [[4, 5], [10, 6]], obj_id=1)
    state, n = snapshot(p), len(p.interactions)
    bad = [
        (lambda: p.add_scribble(1, [[4, 5]]), "scribble has 1 distinct point; at least 2"),
        (lambda: p.add_scribble(1, [[4, 5], [4, 5]]), "scribble has 1 distinct point"),
        (lambda: p.add_scribble(1, []), r"scribble needs a list of \(x, y\) points"),
        (lambda: p.add_scribble(1, [[4, 5], [31, 6]]), r"scribble point \[31.0, 6.0\] lies off slice 1"),
        (lambda: p.add_scribble(1, [[4, 5], [np.nan, 6]]), r"scribble points must be finite.*nan"),
        (lambda: p.add_scribble(1, [[4, 5], [9, 6]], label=2), "scribble label 2"),
        (lambda: p.add_scribble(6, [[4, 5], [9, 6]]), "slice 6 outside the volume"),
        (lambda: p.add_lasso(1, [[2, 2], [12, 2], [12, 12]]), r"lasso does not close: its end \[12.0, 12.0\]"),
        (lambda: p.add_lasso(1, [[2, 2], [12, 2], [2.5, 2]]), "lasso encloses nothing on slice 1"),
        (lambda: p.add_lasso(1, [[2, 2], [-1, 2], [2, 5], [2, 2]]), r"lasso point \[-1.0, 2.0\] lies off slice 1"),
        (lambda: p.add_lasso(1, [[2, 2], [8, 2], [5, 7], [2, 2]], obj_id=0), "object id 0"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
        assert_same(snapshot(p), state)
        assert len(p.interactions) == n
    # the closing tolerance: a square's outline of length 30 + (12 - end) closes when its end lies
    # within LASSO_CLOSE_FRACTION of that length from its start (2, 2)
    assert LASSO_CLOSE_FRACTION == 0.2
    assert lasso_mask([[2, 2], [12, 2], [12, 12], [2, 12], [2, 8]], p.slice_hw, 1).sum() == 121  # 6 <= 6.8
    with pytest.raises(ValueError, match=r"7.0 px from its start \[2.0, 2.0\], more than 0.2 of its length \(33.0"):
        lasso_mask([[2, 2], [12, 2], [12, 12], [2, 12], [2, 9]], p.slice_hw, 1)
