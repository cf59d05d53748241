"""Dice, 2D per ROI and 3D per volume and label, and the resize from mask logits to a slice.

Definition (used everywhere in the evaluation):

    Dice(P, G) = 2 |P & G| / (|P| + |G|)

* G non-empty: always defined; an empty prediction scores 0.
* G empty and P non-empty: 0 (every predicted pixel is a false positive).
* G empty and P empty: undefined, returned as NaN, never 1.0. Such a pair carries no information
  about the model, and averaging it as 1.0 would inflate a dataset's score with slivers. NaNs are
  left out of every mean and counted (`summarize` -> n_nan).

An ROI whose ground truth is empty cannot be prompted at all (no centre of mass, no box), so the
protocol skips it before inference and counts it (`n_empty`); the NaN rule is the metric's own
safety net. Dice is computed at the cached slice's resolution (the raw ROI mask), after SAM 2's
postprocessing (bilinear, align_corners=False, no antialias) of the 4E x 4E logits, threshold 0.

3D Dice of a (volume, label) from its slices put back together: the predicted volume is the stack
of the per-slice predictions (slices without an ROI predict nothing), the ground truth is every
voxel of that label in the cached volume. Because |P & G|, |P| and |G| of a stack are sums over
its slices, `dice_3d` adds up per-slice counts instead of materialising volumes; the tests check
that this equals Dice on the volume rebuilt with `preprocess.from_slices`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def dice_from_counts(intersection, pred_sum, gt_sum) -> np.ndarray:
    """Dice from pixel counts (broadcasting numpy arrays); NaN where pred_sum + gt_sum == 0."""
    intersection = np.asarray(intersection, np.float64)
    denom = np.asarray(pred_sum, np.float64) + np.asarray(gt_sum, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * intersection / np.where(denom > 0, denom, 1.0), np.nan)


def dice(pred, gt) -> float:
    """Dice of two binary masks of the same shape (any dimension); see the module docstring."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return float(dice_from_counts(np.count_nonzero(pred & gt), np.count_nonzero(pred), np.count_nonzero(gt)))


def summarize(values) -> dict:
    """{'mean', 'std' (population, ddof=0), 'n' (finite values), 'n_nan'}; NaN mean when n == 0."""
    v = np.asarray(values, np.float64).ravel()
    finite = v[np.isfinite(v)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else float("nan"),
        "std": float(finite.std()) if n else float("nan"),
        "n": n,
        "n_nan": int(v.size - n),
    }


@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int, pad_to: int | None = None) -> np.ndarray:
    """[out (padded), in] weights of torch's interpolate(mode='bilinear', align_corners=False,
    antialias=False) along one axis: SAM 2's postprocess_masks. Rows past `out_size` (padding up to
    `pad_to`) are zero, so a padded output is 0 there (below the threshold: background)."""
    rows = out_size if pad_to is None else pad_to
    m = np.zeros((rows, in_size), np.float32)
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0 (linear modes)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    idx = np.arange(out_size)
    np.add.at(m, (idx, i0), 1.0 - w1)
    np.add.at(m, (idx, i1), w1)
    return m


def resize_logits(logits, ry, rx):
    """jnp: logits [..., L, L] -> [..., H, W] with per-slice matrices ry [..., H, L], rx [..., W, L]
    (leading axes broadcast); pure matmuls, so padded slices of different sizes share one shape."""
    return jnp.einsum("...hl,...lm,...wm->...hw", ry, logits, rx)


def mask_counts(logits, ry, rx, gt):
    """jnp: (|P & G|, |P|) per mask, P = resize_logits(...) > 0 at the slice's resolution.
    logits [..., L, L], gt bool [..., H, W] (zero-padded like ry / rx)."""
    pred = resize_logits(logits, ry, rx) > 0.0
    inter = jnp.sum(pred & gt, axis=(-2, -1), dtype=jnp.int32)
    return inter, jnp.sum(pred, axis=(-2, -1), dtype=jnp.int32)


def predict_mask(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """numpy: one [L, L] logit map -> bool [H, W] prediction, exactly as `mask_counts` sees it."""
    h, w = hw
    l = logits.shape[-1]
    return (bilinear_matrix(l, h) @ np.asarray(logits, np.float32) @ bilinear_matrix(l, w).T) > 0.0


def dice_3d(intersection, pred_sum, keys, gt_voxels: dict) -> dict:
    """3D Dice per key from per-ROI counts.

    intersection, pred_sum: [N, C] per ROI and condition; keys: N hashable (volume, label) of each
    ROI; gt_voxels: {(volume, label): voxel count of that label in the whole volume}.
    Returns {(volume, label): dice [C]}: the slices' counts summed, then Dice (NaN rule above)."""
    intersection, pred_sum = np.asarray(intersection, np.int64), np.asarray(pred_sum, np.int64)
    out = {}
    keys = list(keys)
    order = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    for k, rows in order.items():
        out[k] = dice_from_counts(intersection[rows].sum(0), pred_sum[rows].sum(0), gt_voxels[k])
    return out
