"""benchmarks/corrective_click.py's click rule: the deepest point of the largest error region,
positive where the object was missed, negative where the mask spilled over."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corrective_click import correction  # noqa: E402


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
