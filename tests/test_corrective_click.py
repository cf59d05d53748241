"""The click rule of benchmarks/corrective_click.py: the interactive protocol's
(clicks.corrective_click_3d) on one slice, the deepest point of the largest error region,
positive where the object was missed, negative where the mask spilled over."""

from __future__ import annotations

import numpy as np

from safeclick_jax.evaluation import clicks


def correction(gt, pred):
    """(x, y, label) as the benchmark reads the click, or None."""
    fix = clicks.corrective_click_3d(pred, gt, np.random.default_rng(0))
    return None if fix is None else (fix[0][1], fix[0][0], int(fix[1]))


def test_correction_clicks_the_largest_error_region():
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    assert correction(gt, gt.copy()) is None
    missed = gt.copy()
    missed[5:25, 5:13] = False  # the left 8 columns missed: a positive click in their middle
    missed[30:32, 30:32] = True  # a small spill elsewhere: not the largest error
    x, y, label = correction(gt, missed)
    assert label == 1 and 8 <= x <= 9 and 5 <= y < 25  # the strip's middle columns
    spill = gt.copy()
    spill[5:25, 25:35] = True  # 10 columns of spill on the right: a negative click there
    x, y, label = correction(gt, spill)
    assert label == 0 and 25 <= x < 35
