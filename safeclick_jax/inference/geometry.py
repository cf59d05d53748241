"""Where a voxel of the input grid lies on the slice images the model sees, and back.

A volume is reoriented to RAS and sliced like the data pipeline (safeclick_jax.data.preprocess.
to_slices: radiological display orientation), so the model sees slices as in training. Prompt
coordinates are on those slice images (x = column, y = row); `axis` is an axis of the input's voxel
grid. Voxel indices must be exact integers (a float index is refused, not truncated).
"""

from __future__ import annotations

import math

import numpy as np

from safeclick_jax.data.preprocess import from_slices, to_slices

IDENTITY_ORNT = np.array([[0, 1], [1, 1], [2, 1]], np.float64)  # an array is its own RAS grid


def voxel_index(values, shape=None, what: str = "voxel") -> list[int]:
    """Three exact integer voxel indices (i, j, k), inside `shape` when given; ValueError naming
    the value otherwise (a non-integer, NaN or Inf index is refused, never rounded)."""
    vals = list(values) if isinstance(values, (list, tuple, np.ndarray)) else None
    if vals is None or len(vals) != 3:
        raise ValueError(f"{what} {values!r}: three voxel indices (i, j, k) are needed")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{what} {_show(vals)}: {v!r} is not a number")
        if not math.isfinite(v):
            raise ValueError(f"{what} {_show(vals)}: {v} is not a finite number")
        if v != round(v):
            raise ValueError(f"{what} {_show(vals)}: {v} is not an integer voxel index")
        out.append(int(round(v)))
    if shape is not None and any(not 0 <= x < n for x, n in zip(out, shape)):
        shape = tuple(int(n) for n in shape)
        raise ValueError(f"{what} {_show(vals)} lies outside the volume (voxel indices 0..n-1 of shape {shape})")
    return out


def _show(vals) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, (float, np.floating)) else repr(v) for v in vals) + "]"


class SliceGeometry:
    """The input grid of a volume (shape, orientation to RAS) and its slicing axis."""

    def __init__(self, ornt, ras_shape, axis: int):
        self.ornt = np.asarray(ornt)
        self.ras_shape = tuple(int(n) for n in ras_shape)
        self.axis = int(axis)  # slicing axis of the input grid
        self.ras_axis = int(self.ornt[axis, 0])
        self.input_shape = tuple(self.ras_shape[int(o)] for o in self.ornt[:, 0])
        p, q = [a for a in range(3) if a != self.ras_axis]
        self.num_slices = self.ras_shape[self.ras_axis]
        self.slice_hw = (self.ras_shape[q], self.ras_shape[p])  # to_slices: rows = q, columns = p

    def voxel_to_slice(self, ijk) -> tuple[int, float, float]:
        """Voxel index (i, j, k) of the input grid -> (slice index, x, y) on the slice images."""
        ijk = np.asarray(ijk, np.float64)
        if ijk.shape != (3,):
            raise ValueError(f"a voxel index needs 3 values (i, j, k), got {ijk.tolist()}")
        if not np.isfinite(ijk).all():
            raise ValueError(f"point {ijk.tolist()}: voxel indices must be finite numbers")
        bad = (ijk < 0) | (ijk > np.asarray(self.input_shape) - 1)
        if bad.any():
            raise ValueError(
                f"point {ijk.tolist()} lies outside the volume (voxel indices 0..n-1 of shape {self.input_shape})"
            )
        ras = np.empty(3)
        for a, (out, flip) in enumerate(self.ornt):
            ras[int(out)] = ijk[a] if flip > 0 else self.input_shape[a] - 1 - ijk[a]
        s = ras[self.ras_axis]
        if abs(s - round(s)) > 1e-6:
            raise ValueError(f"point {ijk.tolist()}: the index along the slicing axis must be an integer")
        p, q = [ax for ax in range(3) if ax != self.ras_axis]
        # to_slices: rows = q reversed, columns = p reversed
        return int(round(s)), float(self.ras_shape[p] - 1 - ras[p]), float(self.ras_shape[q] - 1 - ras[q])

    def box_to_slice(self, box, slice_index) -> tuple[int, list[float]]:
        """A box [u0, v0, u1, v1] of voxel indices on slice `slice_index` of the slicing axis (u, v:
        the two other input axes in increasing order) -> (slice, [x0, y0, x1, y1] on its image)."""
        b = list(box) if isinstance(box, (list, tuple, np.ndarray)) else None
        if b is None or len(b) != 4:
            raise ValueError(f"box {box!r}: [u0, v0, u1, v1] voxel indices are needed")
        u0, v0, u1, v1 = b
        if u1 < u0 or v1 < v0:
            raise ValueError(f"box {_show(b)}: needs u1 >= u0 and v1 >= v0")
        inplane = [a for a in range(3) if a != self.axis]
        corners = []
        for u, v in ((u0, v0), (u1, v1)):
            ijk = [0, 0, 0]
            ijk[self.axis], ijk[inplane[0]], ijk[inplane[1]] = slice_index, u, v
            corners.append(self.voxel_to_slice(voxel_index(ijk, self.input_shape, "box corner")))
        (t, xa, ya), (_, xb, yb) = corners
        return t, [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]

    def to_input_grid(self, slices: np.ndarray) -> np.ndarray:
        """[N, H, W] slice stack -> the input grid."""
        ras = from_slices(slices, self.ras_axis)
        out = np.transpose(ras, [int(o) for o in self.ornt[:, 0]])
        for a, flip in enumerate(self.ornt[:, 1]):
            if flip < 0:
                out = np.flip(out, a)
        return np.ascontiguousarray(out)

    def to_slice_stack(self, grid: np.ndarray) -> np.ndarray:
        """Inverse of to_input_grid: an array on the input grid -> [N, H, W] slice stack."""
        x = np.asarray(grid)
        for a, flip in enumerate(self.ornt[:, 1]):
            if flip < 0:
                x = np.flip(x, a)
        ras = np.transpose(x, np.argsort([int(o) for o in self.ornt[:, 0]]))
        return to_slices(ras, self.ras_axis)

    def plane(self, grid_of_one_slice: np.ndarray) -> np.ndarray:
        """A one-slice array on the input grid -> that plane, the slicing axis dropped."""
        return np.take(grid_of_one_slice, 0, axis=self.axis)
