"""Deterministic synthetic abdominal CT where imperfect prompts hurt: the default dataset of `make train`.

  python -m safeclick_jax.data.synthetic_abdomen --out data/abdomen --num-volumes 15 --seed 0

The smoke set (safeclick_jax.data.synthetic) has separate high-contrast blobs, so a displaced click
or a loose box still lands on the right organ. Here the structures are the ones that make prompts
fail in real CT (the paper's Table 2):
- organs that touch with similar intensities: liver (60 HU), stomach (40), spleen (52), a cluster
  of bowel loops (38) and the pancreas (45), painted as overlapping wobbly ellipsoids so they share
  boundaries; the bowel is one label made of several loops;
- thin and elongated structures: the aorta (a tube along z, 3-5 px across) and the splenic / portal
  vein (a curved in-plane tube 2-4 px wide, 150 HU) running along the pancreas;
- 1-3 lesions of several sizes inside the liver (25 HU, a little darker than the liver), one label;
- kidneys (130 HU), a vertebra (bone, unlabeled) and subcutaneous fat;
- partial-volume blur (Gaussian, sigma 1.2 mm), a smooth multiplicative bias field and Gaussian
  noise (12 HU).
Volumes are 128 x 128 x 40 at 1.5 mm isotropic (LPS affine, as the smoke set): 40 slices, so that
propagation through a volume shows. Everything follows from the seed; 15 volumes are written in a
few seconds, split 7:1:2 by `prepare` (10 / 2 / 3).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from safeclick_jax.data.synthetic import dataset_cli, write_msd

LABELS = {
    "0": "background",
    "1": "liver",
    "2": "spleen",
    "3": "stomach",
    "4": "bowel",
    "5": "right_kidney",
    "6": "left_kidney",
    "7": "aorta",
    "8": "splenic_portal_vein",
    "9": "pancreas",
    "10": "liver_lesion",
}
SHAPE = (128, 128, 40)
SPACING = (1.5, 1.5, 1.5)
BLUR_MM = 1.2  # partial-volume blur, Gaussian sigma
VEIN_MM = (9.0, 12.0)  # thickness of the splenic / portal vein across slices


def _wobbly(grid, center, axes, rng, amp=(0.04, 0.12)):
    """Boolean ellipsoid whose radius is modulated by low-frequency angular waves (smoke set's blobs),
    evaluated only inside its bounding box (the waves add at most amp[1] * (1/2 + 1/3 + 1/4) < 13 %)."""
    shape = grid[0].shape
    box = tuple(
        slice(max(int(c - 1.15 * a), 0), min(int(np.ceil(c + 1.15 * a)) + 1, n)) for c, a, n in zip(center, axes, shape)
    )
    x, y, z = [(g[box] - c) / a for g, c, a in zip(grid, center, axes)]
    r = np.sqrt(x * x + y * y + z * z)
    theta, phi = np.arctan2(y, x), np.arctan2(z, np.sqrt(x * x + y * y))
    wobble = 1.0
    for k in (2, 3, 4):
        wobble = wobble + rng.uniform(*amp) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) * np.cos((k - 1) * phi)
    out = np.zeros(shape, bool)
    out[box] = r <= wobble
    return out


def _tube_2d(shape2d, p0, p1, p2, radius):
    """Boolean in-plane tube of `radius` pixels along the quadratic Bezier curve p0 -> p1 -> p2."""
    t = np.linspace(0.0, 1.0, 64)[:, None]
    curve = (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)
    lo = np.maximum(np.floor(curve.min(0) - radius).astype(int), 0)
    hi = np.minimum(np.ceil(curve.max(0) + radius).astype(int) + 1, shape2d)
    yy, xx = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)
    d2 = np.full(len(pts), np.inf, np.float32)
    for c in curve:  # the squared distance to the nearest of 64 points along the curve
        d2 = np.minimum(d2, ((pts - c) ** 2).sum(1))
    out = np.zeros(shape2d, bool)
    out[lo[0] : hi[0], lo[1] : hi[1]] = (np.sqrt(d2) <= radius).reshape(yy.shape)
    return out


def make_volume(seed: int, shape=SHAPE, spacing=SPACING, noise_hu: float = 12.0):
    """Returns (image int16 HU, labels uint8, affine) for one synthetic abdominal volume."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    size = np.array(shape, dtype=np.float32)
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    j = lambda s: rng.uniform(-s, s, 3)  # noqa: E731  (jitter of a centre, as a fraction of the box)

    def paint(label, hu, center, axes, within=None, amp=(0.04, 0.12)):
        c = size * (np.array(center) + j(0.025))
        a = size * np.array(axes) * rng.uniform(0.88, 1.12, 3)
        m = _wobbly(grid, c, a, rng, amp) & body
        if within is not None:
            m &= within
        image[m] = hu + rng.uniform(-4, 4)
        if label:
            labels[m] = label
        return m

    # Axis 0 is image x (patient right -> left after RAS reorientation), axis 1 is y (anterior -> posterior).
    body = _wobbly(grid, size * [0.5, 0.5, 0.5], size * [0.47, 0.38, 4.0], rng, (0.02, 0.05))
    image[body] = -100.0  # subcutaneous fat
    inner = paint(0, 30.0, (0.5, 0.5, 0.5), (0.42, 0.33, 4.0), amp=(0.02, 0.05))  # muscle / soft tissue
    body = inner  # organs stay inside the muscle wall
    paint(0, 420.0, (0.5, 0.76, 0.5), (0.07, 0.06, 4.0))  # vertebral body, bright and unlabeled
    # Later paints overwrite earlier ones where they overlap, so neighbours share a boundary.
    paint(1, 60.0, (0.31, 0.46, 0.55), (0.19, 0.24, 0.75))  # liver: large, patient's right
    paint(5, 130.0, (0.33, 0.66, 0.45), (0.065, 0.085, 0.45))  # right kidney, behind the liver
    paint(6, 130.0, (0.67, 0.66, 0.45), (0.065, 0.085, 0.45))  # left kidney
    paint(2, 52.0, (0.70, 0.47, 0.60), (0.10, 0.12, 0.55))  # spleen, touches the stomach
    paint(3, 40.0, (0.57, 0.37, 0.60), (0.16, 0.09, 0.55))  # stomach, touches liver and spleen
    for _ in range(rng.integers(4, 7)):  # bowel loops, packed anteriorly below the stomach
        c = (rng.uniform(0.38, 0.66), rng.uniform(0.22, 0.36), rng.uniform(0.15, 0.55))
        r = rng.uniform(0.045, 0.07)
        paint(4, 38.0, c, (r, r * rng.uniform(0.8, 1.3), rng.uniform(0.2, 0.4)))
    # Pancreas: an elongated organ across the midline between the stomach and the vessels.
    pz = rng.uniform(0.35, 0.6)
    paint(9, 45.0, (0.53, 0.53, pz), (0.15, 0.03, 0.3), amp=(0.05, 0.15))
    # Aorta: a thin tube along z in front of the vertebra.
    ax, ay, ar = size[0] * (0.52 + j(0.01)[0]), size[1] * 0.64, rng.uniform(3.0, 4.5)
    aorta = (grid[0] - ax) ** 2 + (grid[1] - ay) ** 2 <= ar**2
    image[aorta & body] = 170.0
    labels[aorta & body] = 7
    # Splenic / portal vein: a curved in-plane tube from the spleen's hilum to the liver, 9-12 mm thick.
    p0 = size[:2] * [0.68 + j(0.02)[0], 0.56 + j(0.02)[1]]
    p1 = size[:2] * [0.52 + j(0.03)[0], 0.58 + j(0.03)[1]]
    p2 = size[:2] * [0.36 + j(0.02)[0], 0.52 + j(0.02)[1]]
    thick = max(1, int(round(rng.uniform(*VEIN_MM) / spacing[2])))
    z0 = int(round(pz * shape[2])) - thick // 2
    for z in range(max(z0, 0), min(z0 + thick, shape[2])):
        v = _tube_2d(shape[:2], p0, p1, p2, rng.uniform(1.2, 2.2)) & body[..., z]
        image[..., z][v] = 150.0
        labels[..., z][v] = 8
    # Lesions inside the liver, of several sizes, a little darker than the liver.
    liver = labels == 1
    points = np.argwhere(liver)
    for _ in range(rng.integers(1, 4)):
        if not len(points):
            break
        c = points[rng.integers(len(points))].astype(np.float32) / size
        r = rng.choice([0.025, 0.04, 0.06]) * rng.uniform(0.9, 1.2)
        m = paint(10, 25.0, c, (r, r, r * 3.0), within=liver)
        liver &= ~m

    # Partial-volume blur (the same in mm along every axis), smooth bias field, noise.
    image = ndimage.gaussian_filter(image, sigma=[BLUR_MM / s for s in spacing])
    bx, by = (grid[0] / size[0] - 0.5), (grid[1] / size[1] - 0.5)
    coeff = rng.uniform(-0.08, 0.08, 3)
    bias = 1.0 + coeff[0] * bx + coeff[1] * by + coeff[2] * (bx * bx + by * by)
    soft = image > -200  # the bias scales tissue, not air
    image[soft] = image[soft] * bias[soft] + 20.0 * (bias[soft] - 1.0)
    image += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS, as the smoke set
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), labels, affine


def write_dataset(out, num_volumes: int = 15, seed: int = 0, shape=SHAPE, spacing=SPACING) -> Path:
    """Writes `num_volumes` volumes and dataset.json in the MSD layout under `out`."""
    meta = {
        "name": "SafeClickSyntheticAbdomen",
        "description": "synthetic abdominal CT: touching organs, thin vessels, lesions (deterministic)",
        "labels": LABELS,
        "modality": "CT",
    }
    return write_msd(out, make_volume, "abdomen", meta, num_volumes, seed, shape, spacing)


def main(argv=None) -> int:
    return dataset_cli(
        argv,
        "safeclick_jax.data.synthetic_abdomen",
        __doc__,
        write_dataset,
        15,
        SHAPE,
        SPACING,
        "synthetic abdominal volumes",
    )


if __name__ == "__main__":
    sys.exit(main())
