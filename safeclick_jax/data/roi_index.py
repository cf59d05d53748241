"""ROI index and the train/val/test split.

An ROI is one (volume, slice, label value) whose area on that slice (pixel count of the label
value, all connected components together) is at least `min_area` pixels. The split is by volume,
7:1:2, so no volume (and so no slice of it) appears in two splits.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}

# One row per ROI. `split` is an index into SPLITS.
ROI_DTYPE = np.dtype(
    [
        ("roi_id", np.int32),
        ("volume_id", np.int32),
        ("slice", np.int32),
        ("label", np.int32),
        ("area", np.int32),
        ("split", np.int8),
    ]
)


def find_rois(label_slices: np.ndarray, min_area: int) -> list[tuple[int, int, int]]:
    """(num_slices, H, W) label map -> [(slice, label value, area)] with area >= min_area."""
    rois = []
    for k in range(label_slices.shape[0]):
        sl = label_slices[k]
        counts = np.bincount(sl.ravel(), minlength=1)
        for value in np.nonzero(counts)[0]:
            if value == 0:
                continue
            if counts[value] >= min_area:
                rois.append((k, int(value), int(counts[value])))
    return rois


def split_counts(n: int, ratios=(0.7, 0.1, 0.2)) -> tuple[int, int, int]:
    """Number of volumes per split. Rounds half up (Python's round() would round 0.5 to 0);
    train takes the remainder, so 10 volumes -> 7/1/2 and 1 volume -> 1/0/0."""
    total = float(sum(ratios))
    n_val = int(np.floor(n * ratios[1] / total + 0.5))
    n_test = int(np.floor(n * ratios[2] / total + 0.5))
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    return n - n_val - n_test, n_val, n_test


def split_volumes(keys: list[str], seed: int, ratios=(0.7, 0.1, 0.2)) -> dict[str, str]:
    """Assigns each volume key (e.g. its image path) to a split, deterministically for `seed`.

    Keys are sorted first, so the result does not depend on the order files were listed in.
    """
    keys = sorted(keys)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train, n_val, _ = split_counts(len(keys), ratios)
    out = {}
    for rank, i in enumerate(order):
        out[keys[i]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out
