"""Simulated users: where the next corrective click goes.

3D (CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation"): the largest
26-connected component of the error (prediction xor ground truth), a Euclidean distance transform
of that component on its bounding box padded by 25 % per side (at least one voxel, so the box edge
is background and the distance is to the component's own boundary), and the click at the voxel
farthest from the boundary; ties broken by a seeded generator. Foreground when the ground truth is
the label there, else background.

2D (RITM / NoC protocol, Sofiiuk et al. 2022): the false-negative and false-positive regions are
distance-transformed (the image border counts as boundary); the click goes to the maximum of the
region whose maximum is larger: a positive click for false negatives, a negative one otherwise.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected component (26 in 3D, 8 in 2D) of a binary mask; ties: lowest label."""
    lab, n = scipy.ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def component_distance(component: np.ndarray, pad_fraction: float = 0.25) -> np.ndarray:
    """Distance of every voxel of `component` to its boundary, computed on its padded bounding box."""
    idx = np.argwhere(component)
    lo, hi = idx.min(0), idx.max(0) + 1
    pad = np.maximum((pad_fraction * (hi - lo)).astype(int), 1)
    crop = component[tuple(slice(a, b) for a, b in zip(lo, hi))]
    dist = scipy.ndimage.distance_transform_edt(np.pad(crop, [(p, p) for p in pad]))
    out = np.zeros(component.shape, np.float64)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = dist[tuple(slice(p, p + s) for p, s in zip(pad, crop.shape))]
    return out


def argmax_tie(values: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
    """Index of the maximum of `values`; among equal maxima one drawn with `rng`."""
    best = np.argwhere(values == values.max())
    return tuple(int(v) for v in best[rng.integers(len(best))])


def corrective_click_3d(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator):
    """(voxel index, positive) of the next click for one label, or None when pred equals gt."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    error = pred ^ gt
    if not error.any():
        return None
    voxel = argmax_tie(component_distance(largest_component(error)), rng)
    return voxel, bool(gt[voxel])


def corrective_click_2d(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator):
    """((row, col), positive) of the next NoC click, or None when pred equals gt."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    fn, fp = gt & ~pred, pred & ~gt
    if not (fn.any() or fp.any()):
        return None
    dist = [scipy.ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] for m in (fn, fp)]
    positive = dist[0].max() > dist[1].max()
    return argmax_tie(dist[0] if positive else dist[1], rng), bool(positive)
