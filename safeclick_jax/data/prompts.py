"""Prompt simulation (paper Sec. 4): perfect prompts and their imperfect versions.

Coordinates are pixel coordinates of the 2D mask, x = column, y = row, as SAM 2's predictor
takes them. A pixel's centre is at its integer index (pixel (row 3, col 5) is the point (5, 3)).

* `center_point`: the centre of mass of the mask, the paper's perfect point.
* `displaced_point(mask, fraction, rng)`: a point at distance fraction * r from the centre of
  mass, in a uniformly random direction, r = sqrt(area / pi) the object's equivalent radius;
  clipped into the image ([0, W-1] x [0, H-1]).
* `click_from_mask(rng, mask)`: a uniformly drawn pixel of the mask (SAM's training click; of
  the background for an empty mask, label 0).
* `tight_box`: (x0, y0, x1, y1) = (min col, min row, max col, max row) of the mask, inclusive,
  as SAM 2's mask-to-box helpers compute it.
* `scaled_box(mask, scale)`: the tight box scaled by `scale` in width (x1 - x0) and height
  (y1 - y0) about its centre, clipped into the image.

Paper grid: point displacement 0, 25, 50, 75, 100 % of r; box scale 100, 50, 75, 125, 150 %.
"""

from __future__ import annotations

import numpy as np

POINT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
BOX_SCALES = (1.0, 0.5, 0.75, 1.25, 1.5)

POINT, BOX = 0, 1  # prompt_type codes in batches
POINT_MODES = ("displaced", "inside")  # training clicks: the paper's displaced family, or SAM's

# The paper's ten evaluation conditions, in the order of its Table 2.
CONDITIONS = tuple([("point", f) for f in POINT_FRACTIONS] + [("box", s) for s in BOX_SCALES])


def condition_name(kind: str, param: float) -> str:
    return f"{kind}_{int(round(param * 100))}"


def _check(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: no prompt can be simulated")
    return mask.astype(bool, copy=False)


def center_point(mask: np.ndarray) -> np.ndarray:
    """Centre of mass as float32 [x, y]."""
    rows, cols = np.nonzero(_check(mask))
    return np.array([cols.mean(), rows.mean()], dtype=np.float32)


def equivalent_radius(mask: np.ndarray) -> float:
    """r = sqrt(area / pi): the radius of a disc with the mask's area."""
    return float(np.sqrt(np.count_nonzero(mask) / np.pi))


def displaced_point(mask: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Centre of mass moved by fraction * r in a uniformly random direction, clipped; [x, y]."""
    mask = _check(mask)
    center = center_point(mask).astype(np.float64)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    d = fraction * equivalent_radius(mask)
    p = center + d * np.array([np.cos(theta), np.sin(theta)])
    h, w = mask.shape
    p = np.clip(p, [0.0, 0.0], [w - 1.0, h - 1.0])
    return p.astype(np.float32)


def click_from_mask(rng, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """sam2_utils.get_next_point(gt, None, 'uniform'): a uniform pixel of the object (label 1), or
    of the background for an empty mask (label 0). -> ((x, y), label)."""
    label = int(mask.any())
    ys, xs = np.nonzero(mask if label else ~mask)
    i = rng.integers(len(xs))
    return np.array([xs[i], ys[i]], np.float32), label


def tight_box(mask: np.ndarray) -> np.ndarray:
    """float32 [x0, y0, x1, y1], inclusive pixel extent of the mask."""
    rows, cols = np.nonzero(_check(mask))
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)


def scaled_box(mask: np.ndarray, scale: float) -> np.ndarray:
    """The tight box scaled by `scale` in width and height about its centre, clipped."""
    mask = _check(mask)
    x0, y0, x1, y1 = tight_box(mask).astype(np.float64)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    hw, hh = (x1 - x0) * scale / 2.0, (y1 - y0) * scale / 2.0
    h, w = mask.shape
    box = np.array([cx - hw, cy - hh, cx + hw, cy + hh])
    box = np.clip(box, 0.0, [w - 1.0, h - 1.0, w - 1.0, h - 1.0])
    return box.astype(np.float32)


def condition_prompt(mask: np.ndarray, kind: str, param: float, rng: np.random.Generator) -> dict:
    """One prompt of a family: {'prompt_type', 'point' [x, y], 'box' [x0, y0, x1, y1]}.

    Both point and box are always filled (the unused one is the perfect prompt of its family), so
    every sample has the same structure; `prompt_type` says which one the model should use.
    """
    if kind == "point":
        return {"prompt_type": POINT, "point": displaced_point(mask, param, rng), "box": tight_box(mask)}
    if kind == "box":
        return {"prompt_type": BOX, "point": center_point(mask), "box": scaled_box(mask, param)}
    raise ValueError(f"prompt kind {kind!r}: expected 'point' or 'box'")


def sample_training_prompt(
    mask: np.ndarray,
    rng: np.random.Generator,
    p_box: float = 0.5,
    point_fraction_range=(0.0, 1.0),
    box_scale_range=(0.5, 1.5),
    grid: bool = False,
    point_mode: str = "displaced",
) -> dict:
    """Training-time prompt: a random family member, as a dict like `condition_prompt` plus
    'param' (the displacement fraction or box scale drawn).

    grid=False draws the parameter uniformly from the range (covering the paper's grid and
    everything between); grid=True draws one of the paper's grid values. point_mode "inside":
    a click on a uniformly drawn pixel of the mask instead (SAM's training click; 'param' 0).
    """
    if point_mode not in POINT_MODES:
        raise ValueError(f"point_mode {point_mode!r}: expected one of {POINT_MODES}")
    if rng.uniform() < p_box:
        kind = "box"
        param = rng.choice(BOX_SCALES) if grid else rng.uniform(*box_scale_range)
    elif point_mode == "inside":
        point, _ = click_from_mask(rng, _check(mask))
        return {"prompt_type": POINT, "point": point, "box": tight_box(mask), "param": 0.0}
    else:
        kind = "point"
        param = rng.choice(POINT_FRACTIONS) if grid else rng.uniform(*point_fraction_range)
    out = condition_prompt(mask, kind, float(param), rng)
    out["param"] = float(param)
    return out
