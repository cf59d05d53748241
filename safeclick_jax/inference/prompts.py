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
