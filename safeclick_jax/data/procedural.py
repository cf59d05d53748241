"""Procedural pretraining data for the stand-in SAM 2: many objects of random shapes, textures and
contrasts per volume, each changing smoothly from slice to slice, and nothing like CT.

  python -m safeclick_jax.data.procedural --out data/procedural --num-volumes 40 --seed 0

SAM 2 learned "what is an object" and "where did it go on the next frame" from SA-1B and SA-V,
natural images unlike any CT. Here the same two lessons come from a generator, so that the
fine-tuning and test data (the synthetic abdomen, real CT) stay unseen:
- five kinds of object, three label slots each (label = 1 + 3 * kind + instance, named e.g.
  `tube_2` in dataset.json), each slot filled with probability 0.75, painted in random order so
  that objects occlude each other:
  blob       an ellipsoid whose surface is pushed in and out by a smooth random field;
  ellipsoid  an oblique (rotated) ellipsoid;
  prism      a convex polygon (3-8 corners) extruded along z while it drifts, turns and tapers;
  tube       a disc whose centre wanders in-plane and whose radius breathes along z (a vessel);
  shell      a hollow rotated ellipsoid (a ring on each slice, background or texture inside);
- sizes from a few pixels to a third of the field of view (log-uniform), every object spans at
  least MIN_SLICES consecutive slices, so clips of 8 slices can track it;
- textures: flat, a smooth random field, a linear ramp, a sinusoidal grating or speckle, on a
  base intensity that differs from the background by a contrast drawn log-uniformly in
  [0.04, 0.5] (some objects are barely visible), over a background that is itself a smooth random
  field with 0-3 unlabelled distractor blobs;
- then a blur (sigma 0.3-1 px in-plane), Gaussian noise (sigma 0.005-0.04) and a scale to integers
  0..1000 (modality "procedural": the pipeline normalises it by percentiles, as non-CT data).
Volumes are 128 x 128 x 48 voxels at 1 mm isotropic (no resampling in `prepare`), in the MSD
layout of the other embedded datasets. Everything follows from the seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from safeclick_jax.data.synthetic import dataset_cli, write_msd

KINDS = ("blob", "ellipsoid", "prism", "tube", "shell")
PER_KIND = 3
P_PRESENT = 0.75
LABELS = {"0": "background"} | {
    str(1 + PER_KIND * k + i): f"{kind}_{i + 1}" for k, kind in enumerate(KINDS) for i in range(PER_KIND)
}
SHAPE = (128, 128, 48)
SPACING = (1.0, 1.0, 1.0)
MIN_SLICES = 10  # every object spans at least this many slices (>= a clip of 8)
SIZE = (0.03, 0.22)  # an object's semi-axis, log-uniform between these fractions of the field of view
TEXTURES = ("flat", "field", "ramp", "grating", "speckle")


def kind_of(name: str) -> str:
    """The object kind of a label name: 'tube_2' -> 'tube'; other names (an organ) are their own kind."""
    stem, _, suffix = name.rpartition("_")
    return stem if stem and suffix.isdigit() else name


def smooth_field(rng, shape, cells: float) -> np.ndarray:
    """A smooth random field of unit standard deviation with about `cells` bumps along each axis:
    Gaussian noise on a coarse grid, interpolated by Gaussian kernels one axis at a time (a product
    of three small matrices, fast for whole volumes)."""
    field = rng.normal(size=tuple(int(min(cells, n)) + 3 for n in shape))
    for axis, n in enumerate(shape):
        m = field.shape[axis]
        step = n / (m - 2)  # knots one step beyond each end, so the edges are as smooth as the middle
        knots = (np.arange(m) - 1.0) * step
        w = np.exp(-0.5 * ((np.arange(n)[:, None] + 0.5 - knots[None]) / step) ** 2)
        field = np.moveaxis(np.tensordot(w / w.sum(1, keepdims=True), field, axes=([1], [axis])), 0, axis)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def _rotation(rng) -> np.ndarray:
    """A random rotation: any angle about z, a tilt of the z axis up to 35 degrees."""
    a, t, b = rng.uniform(0, 2 * np.pi), rng.uniform(0, np.radians(35)), rng.uniform(0, 2 * np.pi)
    rz = lambda g: np.array([[np.cos(g), -np.sin(g), 0], [np.sin(g), np.cos(g), 0], [0, 0, 1]])  # noqa: E731
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rz(a) @ rx @ rz(b)


def _box(center, reach, shape):
    """The index box of a shape within `reach` voxels of `center` (per axis), clipped to the volume."""
    return tuple(
        slice(max(int(np.floor(c - r)), 0), min(int(np.ceil(c + r)) + 1, n)) for c, r, n in zip(center, reach, shape)
    )


def _coords(box):
    return np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij", sparse=True)


def _radius2(box, center, axes, rot):
    """Squared ellipsoidal radius of every voxel of `box` (1 on the surface)."""
    x, y, z = [g - c for g, c in zip(_coords(box), center)]
    r2 = 0.0
    for k in range(3):  # coordinate along the ellipsoid's k-th axis
        u = rot[0, k] * x + rot[1, k] * y + rot[2, k] * z
        r2 = r2 + (u / axes[k]) ** 2
    return r2


def _extent(rng, depth):
    """(first slice, last slice) of an object: at least MIN_SLICES, up to the whole volume."""
    n = int(rng.integers(min(MIN_SLICES, depth), depth + 1))
    z0 = int(rng.integers(0, depth - n + 1))
    return z0, z0 + n - 1


def _ellipsoid_params(rng, shape, size):
    z0, z1 = _extent(rng, shape[2])
    center = np.array([rng.uniform(0.15, 0.85) * shape[0], rng.uniform(0.15, 0.85) * shape[1], (z0 + z1) / 2])
    axes = np.array([size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.4), (z1 - z0 + 1) / 2])
    return center, axes, _rotation(rng)


def blob(rng, shape, size):
    center, axes, rot = _ellipsoid_params(rng, shape, size)
    box = _box(center, [axes.max() * 1.4] * 3, shape)
    r2 = _radius2(box, center, axes, rot)
    bumps = smooth_field(rng, r2.shape, rng.uniform(2.0, 4.0))
    return box, r2 + rng.uniform(0.25, 0.5) * bumps <= 1.0


def ellipsoid(rng, shape, size):
    center, axes, rot = _ellipsoid_params(rng, shape, size)
    box = _box(center, [axes.max()] * 3, shape)
    return box, _radius2(box, center, axes, rot) <= 1.0


def shell(rng, shape, size):
    center, axes, rot = _ellipsoid_params(rng, shape, size * 1.3)
    box = _box(center, [axes.max()] * 3, shape)
    r2 = _radius2(box, center, axes, rot)
    inner = rng.uniform(0.45, 0.75)
    return box, (r2 <= 1.0) & (r2 >= inner**2)


def _path(rng, z, z_mid, length):
    """A smooth offset along z: a drift plus one slow sine wave, in voxels (<= 0.55 per slice)."""
    drift = rng.uniform(-0.25, 0.25) * (z - z_mid)
    period = length * rng.uniform(1.0, 3.0)
    amp = rng.uniform(0, 0.3) * period / (2 * np.pi)  # the wave moves at most 0.3 voxels per slice
    return drift + amp * np.sin(2 * np.pi * (z - z_mid) / period + rng.uniform(0, 2 * np.pi))


def _track_box(cx, cy, reach, z0, z1, shape):
    """The index box of a cross-section of radius <= `reach` centred on (cx[z], cy[z]), z0 <= z <= z1."""
    return (
        slice(max(int(cx.min() - reach) - 1, 0), min(int(cx.max() + reach) + 2, shape[0])),
        slice(max(int(cy.min() - reach) - 1, 0), min(int(cy.max() + reach) + 2, shape[1])),
        slice(z0, z1 + 1),
    )


def _track(rng, shape, lo: float):
    """(z0, z1, z, mid-slice, slice count, centre x[z], centre y[z]) of a shape that moves along z,
    starting between `lo` and 1 - `lo` of the field of view."""
    z0, z1 = _extent(rng, shape[2])
    z = np.arange(z0, z1 + 1, dtype=np.float32)
    zm, n = (z0 + z1) / 2, z1 - z0 + 1
    cx = rng.uniform(lo, 1 - lo) * shape[0] + _path(rng, z, zm, n)
    cy = rng.uniform(lo, 1 - lo) * shape[1] + _path(rng, z, zm, n)
    return z0, z1, z, zm, n, cx, cy


def prism(rng, shape, size):
    z0, z1, z, zm, n, cx, cy = _track(rng, shape, 0.2)
    turn = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.05, 0.05) * (z - zm)  # radians per slice
    taper = (1.0 - np.abs((z - zm) / (n / 2)) ** 4) ** 0.25  # flat middle, ends narrowing to a point
    corners = int(rng.integers(3, 9))
    # Corners at increasing angles on an ellipse: a convex polygon, counter-clockwise.
    ang = (np.arange(corners) + rng.uniform(-0.35, 0.35, corners)) * 2 * np.pi / corners + rng.uniform(0, 2 * np.pi)
    ax, ay = size * rng.uniform(0.7, 1.5), size * rng.uniform(0.5, 1.1)
    px, py = ax * np.cos(ang), ay * np.sin(ang)
    box = _track_box(cx, cy, max(ax, ay), z0, z1, shape)
    x, y, _ = _coords(box)
    x, y = x[..., None], y[..., None]  # [bx, 1, 1, 1], [1, by, 1, 1]
    c, s = np.cos(turn)[:, None], np.sin(turn)[:, None]
    vx = (c * px - s * py) * taper[:, None] + cx[:, None]  # [bz, corners]
    vy = (s * px + c * py) * taper[:, None] + cy[:, None]
    ex, ey = np.roll(vx, -1, axis=1) - vx, np.roll(vy, -1, axis=1) - vy
    # Inside a counter-clockwise convex polygon: left of every edge.
    cross = ex * (y - vy) - ey * (x - vx)  # [bx, by, bz, corners]
    return box, (cross >= 0).all(axis=-1)


def tube(rng, shape, size):
    z0, z1, z, zm, n, cx, cy = _track(rng, shape, 0.15)
    r0 = float(np.clip(size * rng.uniform(0.2, 0.5), 2.0, 9.0))
    r = r0 * (1.0 + 0.3 * np.sin(2 * np.pi * (z - zm) / (n * rng.uniform(0.7, 2.0)) + rng.uniform(0, 6.3)))
    box = _track_box(cx, cy, r.max(), z0, z1, shape)
    x, y, _ = _coords(box)
    return box, (x - cx) ** 2 + (y - cy) ** 2 <= r**2


SHAPES = {"blob": blob, "ellipsoid": ellipsoid, "prism": prism, "tube": tube, "shell": shell}


def texture(rng, box_shape, kind: str) -> np.ndarray:
    """A texture of amplitude ~0.02-0.15 over an object's box (added to its base intensity)."""
    amp = rng.uniform(0.02, 0.15)
    if kind == "flat":
        return np.zeros(box_shape, np.float32)
    if kind == "field":
        return amp * smooth_field(rng, box_shape, rng.uniform(2, 6))
    x, y, z = _coords(tuple(slice(0, n) for n in box_shape))
    d = rng.normal(size=3) * [1, 1, 0.3]
    d /= np.linalg.norm(d)
    u = d[0] * x + d[1] * y + d[2] * z
    if kind == "ramp":
        return amp * 2 * (u - u.mean()) / (np.ptp(u) + 1e-6) * np.ones(box_shape, np.float32)
    if kind == "grating":
        return amp * np.sin(2 * np.pi * u / rng.uniform(3, 12) + rng.uniform(0, 6.3)) * np.ones(box_shape, np.float32)
    return amp * rng.normal(size=box_shape)  # speckle


def make_volume(seed: int, shape=SHAPE, spacing=SPACING):
    """Returns (image int16 0..1000, labels uint8, affine) for one procedural volume."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    labels = np.zeros(shape, np.uint8)
    bg = rng.uniform(0.2, 0.8)
    image = bg + rng.uniform(0.02, 0.12) * smooth_field(rng, shape, rng.uniform(2, 5))
    fov = min(shape[:2])
    objects = [(label, name) for label, name in ((int(k), v) for k, v in LABELS.items() if k != "0")]
    present = [o for o in objects if rng.random() < P_PRESENT]
    distractors = [(0, "blob")] * int(rng.integers(0, 4))  # unlabelled: not everything is an object
    order = rng.permutation(len(present) + len(distractors))
    painted = present + distractors
    for i in order:
        label, name = painted[i]
        kind = kind_of(name)
        size = float(np.exp(rng.uniform(*np.log(np.multiply(SIZE, fov)))))  # semi-axis, voxels
        box, mask = SHAPES[kind](rng, shape, size)
        contrast = float(np.exp(rng.uniform(np.log(0.04), np.log(0.5)))) * rng.choice([-1, 1])
        base = float(np.clip(bg + contrast, 0.02, 0.98))
        if abs(base - bg) < 0.03:  # clipped onto the background: flip to the other side
            base = float(np.clip(bg - contrast, 0.02, 0.98))
        values = base + texture(rng, mask.shape, TEXTURES[int(rng.integers(len(TEXTURES)))])
        image[box][mask] = values[mask]
        labels[box][mask] = label
    image = ndimage.gaussian_filter(image, sigma=(*(rng.uniform(0.3, 1.0),) * 2, 0.3))
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.04), shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-s * n / 2 for s, n in zip(spacing, shape)]
    return np.clip(np.rint(image * 1000), 0, 1000).astype(np.int16), labels, affine


def write_dataset(out, num_volumes: int = 40, seed: int = 0, shape=SHAPE, spacing=SPACING) -> Path:
    """Writes `num_volumes` volumes and dataset.json in the MSD layout under `out`."""
    meta = {
        "name": "SafeClickProcedural",
        "description": "procedural objects for pretraining: random shapes, textures, contrasts (deterministic)",
        "labels": LABELS,
        "modality": "procedural",
    }
    return write_msd(out, make_volume, "procedural", meta, num_volumes, seed, shape, spacing)


def main(argv=None) -> int:
    return dataset_cli(
        argv, "safeclick_jax.data.procedural", __doc__, write_dataset, 40, SHAPE, SPACING, "procedural volumes"
    )


if __name__ == "__main__":
    sys.exit(main())
