"""Preprocessing as in the paper (Sec. 4, "intensities normalised to [0, 1], volumes resampled
to isotropic spacing"), each step configurable:

1. `normalize_intensity`: percentile clipping (default 0.5 / 99.5 %, as MedSAM does for non-CT
   images) or a CT window (default level 40 / width 400 HU, the abdominal soft-tissue window),
   then a linear map to [0, 1].
2. `resample`: to isotropic spacing with scipy.ndimage.zoom, order 1 (linear) for images and
   order 0 (nearest) for labels, so label values never blend into values that do not exist.
3. `to_slices`: moves the slicing axis first and turns each slice into radiological display
   orientation; `from_slices` is its exact inverse, so evaluation can rebuild RAS volumes.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

AXIS_NAMES = {"sagittal": 0, "coronal": 1, "axial": 2}
PERCENTILES = (0.5, 99.5)  # percentile clipping's default (MedSAM's for non-CT images)
CT_WINDOW = (40.0, 400.0)  # (level, width) in HU: the abdominal soft-tissue window


def axis_index(axis) -> int:
    """Accepts 0/1/2 or 'sagittal'/'coronal'/'axial' (axes of a RAS volume)."""
    if isinstance(axis, str) and not axis.isdigit():
        if axis not in AXIS_NAMES:
            raise ValueError(f"axis {axis!r}: expected one of {sorted(AXIS_NAMES)} or 0/1/2")
        return AXIS_NAMES[axis]
    a = int(axis)
    if a not in (0, 1, 2):
        raise ValueError(f"axis {axis!r}: expected 0, 1 or 2")
    return a


def normalize_intensity(
    data: np.ndarray, mode: str = "percentile", percentiles=PERCENTILES, ct_window=CT_WINDOW
) -> np.ndarray:
    """Returns float32 intensities in [0, 1].

    mode 'percentile': clip to the volume's [lo, hi] percentiles; robust to scanner outliers.
    mode 'ct_window': clip to level +- width/2 in Hounsfield units (ct_window = (level, width)).
    """
    data = data.astype(np.float32, copy=False)
    if mode == "percentile":
        lo, hi = np.percentile(data, percentiles)
    elif mode == "ct_window":
        level, width = ct_window
        lo, hi = level - width / 2.0, level + width / 2.0
    else:
        raise ValueError(f"normalization mode {mode!r}: expected 'percentile' or 'ct_window'")
    if hi <= lo:  # a constant volume: map it to zeros rather than dividing by zero
        return np.zeros_like(data)
    out = (np.clip(data, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)


NORMALIZATIONS = ("auto", "percentile", "ct_window")


def looks_like_ct(data: np.ndarray) -> bool:
    """Whether a volume's values are Hounsfield units.

    A NIfTI file carries no modality, so it is decided from the values: CT puts air at -1000 HU, and
    no MR or PET intensity scale has a 0.5th percentile at or below -500 (air in the field of view),
    while a CT's 99.5th percentile stays below 4000 (bone ~1000, metal clipped at 3071).
    """
    flat = np.asarray(data).ravel()
    sample = flat[:: max(1, flat.size // 1_000_000)]  # percentiles of a regular subsample: fast, close enough
    lo, hi = np.percentile(sample.astype(np.float32, copy=False), (0.5, 99.5))
    return bool(lo <= -500.0 and hi <= 4000.0)


def resolve_mode(mode: str, modality: str | None = None, data: np.ndarray | None = None) -> str:
    """'auto' picks the CT window for CT volumes and percentile clipping otherwise; CT is known from
    `modality` when given, else from the values (`looks_like_ct`). Other modes are returned as they are."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization {mode!r}: expected one of {', '.join(NORMALIZATIONS)}")
    if mode != "auto":
        return mode
    if modality:
        return "ct_window" if modality.strip().upper() == "CT" else "percentile"
    return "ct_window" if data is not None and looks_like_ct(data) else "percentile"


def target_spacing_for(spacing, target) -> float | None:
    """target None/'none' -> no resampling; 'min' -> the finest of the volume's spacings."""
    if target is None or target == "none":
        return None
    if target == "min":
        return float(min(spacing))
    return float(target)


def resampled_shape(shape, spacing, target: float) -> tuple:
    return tuple(max(1, int(round(n * s / target))) for n, s in zip(shape, spacing))


def resample(data: np.ndarray, spacing, target: float | None, order: int) -> np.ndarray:
    """Resamples to `target` mm isotropic spacing (order 1 images, order 0 labels).

    grid_mode=True treats voxels as areas (the align_corners=False convention), so the volume's
    physical extent is kept; mode='nearest' repeats edge voxels instead of padding with zeros.
    """
    if target is None:
        return data
    new_shape = resampled_shape(data.shape, spacing, target)
    if new_shape == tuple(data.shape):
        return data
    zoom = [n / o for n, o in zip(new_shape, data.shape)]
    return scipy.ndimage.zoom(data, zoom, order=order, grid_mode=True, mode="nearest", prefilter=False)


def to_slices(vol: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z) RAS volume -> (num_slices, rows, cols) in radiological display orientation.

    The two remaining RAS axes (a, b) become rows = b reversed (anterior / superior at the top) and
    cols = a reversed (patient's right on the image's left). Slice k is voxel index k along `axis`.
    """
    moved = np.moveaxis(vol, axis, 0)
    return np.ascontiguousarray(moved.transpose(0, 2, 1)[:, ::-1, ::-1])


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `to_slices`: (num_slices, rows, cols) -> RAS volume."""
    moved = slices[:, ::-1, ::-1].transpose(0, 2, 1)
    return np.ascontiguousarray(np.moveaxis(moved, 0, axis))


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8, the 8-bit image SAM 2's ToTensor (/255) expects; rounds to nearest."""
    return np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
