"""Deterministic synthetic CT-like volumes in the MSD layout: the project's own default dataset.

  python -m safeclick_jax.data.synthetic --out data/synthetic --num-volumes 10 --seed 0

Each volume is an abdomen-like body ellipse (soft tissue ~ 0-40 HU, air -1000 HU outside) holding
organ-like structures with perturbed (non-ellipsoidal) boundaries: liver, two kidneys, spleen and
a small lesion inside the liver. Spacing is anisotropic (thin in-plane, thick slices), the affine
is LPS-oriented (as DICOM-derived files often are) so loading must reorient to RAS, and Gaussian
noise is added. Everything follows from the seed: the same call writes identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {
    "0": "background",
    "1": "liver",
    "2": "right_kidney",
    "3": "left_kidney",
    "4": "spleen",
    "5": "lesion",
}
# (label, HU, centre as a fraction of the box, semi-axes as a fraction of the box)
ORGANS = (
    (1, 60.0, (0.35, 0.45, 0.55), (0.20, 0.20, 0.30)),
    (2, 150.0, (0.35, 0.72, 0.45), (0.07, 0.08, 0.18)),
    (3, 150.0, (0.65, 0.72, 0.45), (0.07, 0.08, 0.18)),
    (4, 45.0, (0.70, 0.55, 0.60), (0.09, 0.10, 0.16)),
)


def _blob(grid, center, axes, rng):
    """Boolean ellipsoid whose radius is modulated by low-frequency angular waves."""
    x, y, z = [(g - c) / a for g, c, a in zip(grid, center, axes)]
    r = np.sqrt(x * x + y * y + z * z)
    theta, phi = np.arctan2(y, x), np.arctan2(z, np.sqrt(x * x + y * y))
    wobble = 1.0
    for k in (2, 3):
        wobble = wobble + rng.uniform(0.03, 0.10) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) * np.cos(
            (k - 1) * phi
        )
    return r <= wobble


def make_volume(seed: int, shape=(48, 48, 16), spacing=(2.0, 2.0, 5.0), noise_hu: float = 20.0):
    """Returns (image int16 HU, labels uint8, affine) for one synthetic volume."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    size = np.array(shape, dtype=np.float32)
    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    body = _blob(grid, size * [0.5, 0.5, 0.5], size * [0.46, 0.40, 0.9], rng)
    image[body] = 20.0
    for label, hu, center, axes in ORGANS:
        c = size * (np.array(center) + rng.uniform(-0.04, 0.04, 3))
        a = size * np.array(axes) * rng.uniform(0.85, 1.15, 3)
        m = _blob(grid, c, a, rng) & body
        image[m] = hu + rng.uniform(-10, 10)
        labels[m] = label
    # A lesion inside the liver, darker than the liver around it.
    liver = np.argwhere(labels == 1)
    if len(liver):
        c = liver[rng.integers(len(liver))].astype(np.float32)
        m = _blob(grid, c, size * np.array([0.05, 0.05, 0.1]) * rng.uniform(0.8, 1.5), rng) & (labels == 1)
        image[m] = 10.0
        labels[m] = 5
    image += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    # LPS orientation: x and y axes point to the patient's right and anterior in reverse.
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), labels, affine


def write_dataset(out, num_volumes: int = 10, seed: int = 0, shape=(48, 48, 16), spacing=(2.0, 2.0, 5.0)) -> Path:
    """Writes `num_volumes` volumes and dataset.json in the MSD layout under `out`."""
    meta = {
        "name": "SafeClickSynthetic",
        "description": "synthetic CT-like volumes (deterministic)",
        "labels": LABELS,
        "modality": "CT",
    }
    return write_msd(out, make_volume, "synth", meta, num_volumes, seed, shape, spacing)


def write_msd(out, make, prefix: str, meta: dict, num_volumes: int, seed: int, shape, spacing) -> Path:
    """Volume i = make(seed * 100003 + i, shape, spacing) -> (image, labels, affine), written as
    imagesTr/labelsTr/<prefix>_<i>.nii.gz with a dataset.json (MSD layout) holding `meta` (name,
    description, labels, modality)."""
    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(num_volumes):
        image, labels, affine = make(seed * 100003 + i, shape, spacing)
        name = f"{prefix}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(out / "imagesTr" / name))
        nib.save(nib.Nifti1Image(labels, affine), str(out / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": meta["name"],
        "description": meta["description"],
        "tensorImageSize": "3D",
        "modality": {"0": meta["modality"]},
        "labels": meta["labels"],
        "numTraining": num_volumes,
        "numTest": 0,
        "training": training,
        "test": [],
        "seed": seed,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def dataset_cli(argv, module, doc: str, write, num_volumes: int, shape, spacing, what: str) -> int:
    """The command line of a generator module: --out, --num-volumes, --seed, --shape, --spacing."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument("--num-volumes", type=int, default=num_volumes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=list(shape))
    p.add_argument("--spacing", type=float, nargs=3, default=list(spacing))
    a = p.parse_args(argv)
    if min(a.shape) < 1 or min(a.spacing) <= 0:
        p.error(f"--shape {a.shape} --spacing {a.spacing}: every size must be positive")
    out = write(a.out, a.num_volumes, a.seed, tuple(a.shape), tuple(a.spacing))
    print(f"wrote {a.num_volumes} {what} to {out}")
    return 0


def main(argv=None) -> int:
    return dataset_cli(
        argv,
        "safeclick_jax.data.synthetic",
        __doc__,
        write_dataset,
        10,
        (48, 48, 16),
        (2.0, 2.0, 5.0),
        "synthetic volumes",
    )


if __name__ == "__main__":
    sys.exit(main())
