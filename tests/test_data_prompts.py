"""Prompt geometry measured against the definitions in safeclick_jax.data.prompts."""

import numpy as np
import pytest

from safeclick_jax.data import prompts


def disc(h=100, w=120, cy=40, cx=70, r=15):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def test_center_point_is_center_of_mass_x_is_column():
    m = np.zeros((50, 80), np.uint8)
    m[10:21, 30:61] = 1  # rows 10..20, cols 30..60
    np.testing.assert_allclose(prompts.center_point(m), [45.0, 15.0])


@pytest.mark.parametrize("fraction", prompts.POINT_FRACTIONS)
def test_displaced_point_distance(fraction):
    m = disc()
    c = prompts.center_point(m)
    r = np.sqrt(m.sum() / np.pi)
    rng = np.random.default_rng(0)
    angles = []
    for _ in range(200):
        p = prompts.displaced_point(m, fraction, rng)
        np.testing.assert_allclose(np.linalg.norm(p - c), fraction * r, rtol=1e-5, atol=1e-4)
        angles.append(np.arctan2(p[1] - c[1], p[0] - c[0]))
    if fraction > 0:  # uniform direction: all four quadrants are hit
        assert len(set(np.floor(np.array(angles) / (np.pi / 2)).astype(int))) == 4


def test_displaced_point_is_clipped_into_image():
    m = np.zeros((20, 20), np.uint8)
    m[0:3, 0:3] = 1
    rng = np.random.default_rng(1)
    for _ in range(100):
        p = prompts.displaced_point(m, 1.0, rng)
        assert 0 <= p[0] <= 19 and 0 <= p[1] <= 19


def test_tight_box_and_scaled_box_sizes():
    m = np.zeros((100, 100), np.uint8)
    m[30:51, 20:61] = 1  # rows 30..50, cols 20..60
    np.testing.assert_array_equal(prompts.tight_box(m), [20, 30, 60, 50])
    for scale in prompts.BOX_SCALES:
        x0, y0, x1, y1 = prompts.scaled_box(m, scale)
        np.testing.assert_allclose([x1 - x0, y1 - y0], [40 * scale, 20 * scale], rtol=1e-6)
        np.testing.assert_allclose([(x0 + x1) / 2, (y0 + y1) / 2], [40, 40])


def test_scaled_box_clipped():
    m = np.zeros((40, 40), np.uint8)
    m[0:20, 30:40] = 1
    box = prompts.scaled_box(m, 1.5)
    assert box.min() >= 0 and box[2] <= 39 and box[3] <= 39


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        prompts.center_point(np.zeros((5, 5)))


def test_paper_grid_and_conditions():
    assert prompts.POINT_FRACTIONS == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert prompts.BOX_SCALES == (1.0, 0.5, 0.75, 1.25, 1.5)
    names = [prompts.condition_name(k, p) for k, p in prompts.CONDITIONS]
    assert names == [
        "point_0",
        "point_25",
        "point_50",
        "point_75",
        "point_100",
        "box_100",
        "box_50",
        "box_75",
        "box_125",
        "box_150",
    ]


def test_training_sampling_covers_both_families():
    m = disc()
    rng = np.random.default_rng(0)
    draws = [prompts.sample_training_prompt(m, rng) for _ in range(200)]
    types = np.array([d["prompt_type"] for d in draws])
    assert 60 < types.sum() < 140
    for d in draws:
        if d["prompt_type"] == prompts.BOX:
            assert 0.5 <= d["param"] <= 1.5
        else:
            assert 0.0 <= d["param"] <= 1.0
    grid = [prompts.sample_training_prompt(m, rng, grid=True)["param"] for _ in range(100)]
    assert set(grid) <= set(prompts.POINT_FRACTIONS) | set(prompts.BOX_SCALES)


def test_training_clicks_inside_the_mask():
    """point_mode "inside" (SAM's training click): every click on a pixel of the mask, spread over
    it, where the displaced family puts some outside a ring's pixels (its centre is the hole)."""
    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    ring = (r2 <= 20**2) & (r2 >= 12**2)
    rng = np.random.default_rng(0)
    draws = [prompts.sample_training_prompt(ring, rng, p_box=0.0, point_mode="inside") for _ in range(200)]
    pts = np.array([d["point"] for d in draws]).astype(int)
    assert all(d["prompt_type"] == prompts.POINT for d in draws)
    assert ring[pts[:, 1], pts[:, 0]].all()
    assert len({tuple(p) for p in pts}) > 150  # spread over the ring's 754 pixels
    displaced = [prompts.sample_training_prompt(ring, rng, p_box=0.0)["point"] for _ in range(200)]
    inside = [ring[int(round(y)), int(round(x))] for x, y in displaced]
    assert sum(inside) < 150
    with pytest.raises(ValueError, match="point_mode 'centre'"):
        prompts.sample_training_prompt(ring, rng, point_mode="centre")
