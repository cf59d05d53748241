"""The prompts of one slice, checked: clicks and boxes as SAM 2's point tokens, masks as binary
images. Each check raises ValueError naming the value. A new kind of prompt (a scribble: points
along a stroke; a lasso: the mask it encloses) is a function here that turns it into these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safeclick_jax import prompting


@dataclass
class SlicePrompt:
    """Clicks and / or a box on one slice: coordinates (x, y) in slice pixels, SAM 2's labels."""

    box: np.ndarray | None  # [4] x0, y0, x1, y1
    points: np.ndarray | None  # [P, 2]
    labels: np.ndarray | None  # [P] 1 foreground, 0 background

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(coords [K, 2], labels [K]): the box first (corner labels 2, 3), then the clicks."""
        c, lab = [], []
        if self.box is not None:
            c.append(self.box.reshape(2, 2))
            lab.append(np.array(prompting.BOX_LABELS, np.int32))
        if self.points is not None:
            c.append(self.points)
            lab.append(self.labels)
        return np.concatenate(c), np.concatenate(lab)


def clicks_and_box(points, labels, box, slice_hw: tuple[int, int], t: int) -> SlicePrompt:
    """Checks points [P, 2] with labels [P] and / or a box (x0, y0, x1, y1) on slice t of size
    slice_hw (rows, columns): finite, labels 0 / 1, inside the slice (x in [0, W], y in [0, H])."""
    h, w = slice_hw
    b = pc = pl = None
    if box is not None:
        b = np.asarray(box, np.float32).reshape(-1)
        if b.shape != (4,) or not np.isfinite(b).all():
            raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {np.asarray(box).tolist()}")
        if b[2] < b[0] or b[3] < b[1]:
            raise ValueError(f"box {b.tolist()}: needs x1 >= x0 and y1 >= y0")
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together")
    if points is not None:
        pc, pl = np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels).reshape(-1)
        if pc.shape[0] != pl.shape[0]:
            raise ValueError(f"{pc.shape[0]} points but {pl.shape[0]} labels")
        if not np.isfinite(pc).all():
            raise ValueError(f"points must be finite numbers, got {pc.tolist()}")
        if not np.isin(pl, (0, 1)).all():
            raise ValueError(f"labels must be 0 (background) or 1 (foreground); got {np.unique(pl).tolist()}")
        pl = pl.astype(np.int32)
    if b is None and pc is None:
        raise ValueError("give points (with labels) or a box")
    prompt = SlicePrompt(b, pc, pl)
    coords, _ = prompt.tokens()
    bad = ((coords < 0) | (coords > np.array([w, h], np.float32))).any(-1)
    if bad.any():
        raise ValueError(f"prompt at {coords[bad][0].tolist()} lies outside slice {t} (x in [0, {w}], y in [0, {h}])")
    return prompt


def binary_mask(mask, slice_hw: tuple[int, int], what: str) -> np.ndarray:
    """A mask of the slice's shape, bool or 0/1, not empty -> bool [H, W]."""
    m = np.asarray(mask)
    if m.shape != tuple(slice_hw):
        raise ValueError(f"{what} has shape {m.shape}; the slices are {tuple(slice_hw)} (rows, columns)")
    if m.dtype != bool:
        if m.dtype.kind not in "biuf" or not np.isin(m, (0, 1)).all():
            vals = np.unique(m)[:6].tolist() if m.dtype.kind in "biuf" else m.dtype
            raise ValueError(f"{what} must be binary (0/1 or bool), got values {vals}")
        m = m.astype(bool)
    if not m.any():
        raise ValueError(f"{what} is empty (no foreground pixel)")
    return m


# --- scribbles and lassos: freehand strokes on one slice, as the prompts above ------------------------

SCRIBBLE_POINTS = 1  # clicks a scribble becomes: its midpoint (benchmarks/scribble_vs_click.py; docs/interactive.md)
LASSO_CLOSE_FRACTION = 0.2  # a lasso closes when its end lies within this fraction of its length from its start
CONTOUR_STEP = 0.25  # pixels between the samples of a lasso's contour that mark its outline pixels


def stroke(points, slice_hw: tuple[int, int], t: int, what: str) -> np.ndarray:
    """A freehand stroke on slice t: points [N, 2] (x, y), finite, inside the slice (x in [0, W],
    y in [0, H]), at least two distinct ones; consecutive repeats dropped -> float64 [M, 2]."""
    p = np.asarray(points, np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"{what} needs a list of (x, y) points, got an array of shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{what} points must be finite numbers, got {p[~np.isfinite(p).all(1)][0].tolist()}")
    h, w = slice_hw
    bad = ((p < 0) | (p > np.array([w, h]))).any(1)
    if bad.any():
        raise ValueError(f"{what} point {p[bad][0].tolist()} lies off slice {t} (x in [0, {w}], y in [0, {h}])")
    if len(p):
        p = p[np.r_[True, (np.diff(p, axis=0) != 0).any(1)]]
    if len(p) < 2:
        raise ValueError(f"{what} has {len(p)} distinct point{'s' * (len(p) != 1)}; at least 2 are needed")
    return p


def along(p: np.ndarray, s) -> np.ndarray:
    """Points at arc lengths s [K] along the polyline p [M, 2] (linear between its points)."""
    cum = np.r_[0.0, np.cumsum(np.hypot(*np.diff(p, axis=0).T))]
    return np.stack([np.interp(s, cum, p[:, 0]), np.interp(s, cum, p[:, 1])], -1)


def scribble_points(points, slice_hw: tuple[int, int], t: int, k: int = SCRIBBLE_POINTS) -> np.ndarray:
    """A scribble -> the middles (by arc length) of k equal parts of it (float32 [k, 2], x, y):
    the clicks it stands for; k = 1, the default, is its midpoint. The ends are left out: a
    stroke often ends near the object's boundary."""
    p = stroke(points, slice_hw, t, "scribble")
    length = np.hypot(*np.diff(p, axis=0).T).sum()
    return along(p, length * (np.arange(k) + 0.5) / k).astype(np.float32)


def lasso_mask(points, slice_hw: tuple[int, int], t: int) -> np.ndarray:
    """A closed freehand contour -> bool [H, W], the pixels it encloses. It closes when its last
    point lies within LASSO_CLOSE_FRACTION of its length from its first (the polygon is closed by
    that segment). A pixel belongs to the mask when its centre (x = column, y = row) lies inside
    the polygon (even-odd rule) or on the contour (the nearest pixel of each contour sample,
    every CONTOUR_STEP px). A polygon of area < 1 px^2 (shoelace formula) encloses nothing."""
    p = stroke(points, slice_hw, t, "lasso")
    seg = np.hypot(*np.diff(p, axis=0).T)
    gap = float(np.hypot(*(p[-1] - p[0])))
    if gap > LASSO_CLOSE_FRACTION * seg.sum():
        raise ValueError(
            f"lasso does not close: its end {p[-1].tolist()} is {gap:.1f} px from its start {p[0].tolist()}, "
            f"more than {LASSO_CLOSE_FRACTION:g} of its length ({seg.sum():.1f} px)"
        )
    ring = np.r_[p, p[:1]]
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    if area < 1.0:
        raise ValueError(f"lasso encloses nothing on slice {t}: its area is {area:.2f} px^2 (< 1)")
    h, w = slice_hw
    # even-odd by scanlines: each edge crossing row r at x = xc flips the pixels c < xc of that row
    flips = np.zeros((h, w + 1), np.int32)
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
        rows = np.arange(max(int(np.ceil(min(y0, y1))), 0), min(int(np.floor(max(y0, y1))), h - 1) + 1)
        rows = rows[(y0 > rows) != (y1 > rows)]  # half-open: a vertex on a row counts once
        xc = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
        np.add.at(flips, (rows, 0), 1)
        np.add.at(flips, (rows, np.clip(np.ceil(xc).astype(int), 0, w)), -1)
    inside = (np.cumsum(flips, axis=1)[:, :w] % 2).astype(bool)
    length = np.hypot(*np.diff(ring, axis=0).T).sum()
    outline = np.rint(along(ring, np.linspace(0.0, length, int(np.ceil(length / CONTOUR_STEP)) + 1))).astype(int)
    inside[np.clip(outline[:, 1], 0, h - 1), np.clip(outline[:, 0], 0, w - 1)] = True
    return inside
