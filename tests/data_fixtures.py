"""Shared helpers for the data tests (synthetic datasets, bad files, the real CT path)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

CT_SMALL = Path(__file__).resolve().parent / "data" / "ct_small"


def write_pair(folder: Path, name: str, image: np.ndarray, label: np.ndarray, affine=None, label_affine=None):
    affine = np.diag([2.0, 2.0, 5.0, 1.0]) if affine is None else affine
    label_affine = affine if label_affine is None else label_affine
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / name))
    nib.save(nib.Nifti1Image(label, label_affine), str(folder / "labelsTr" / name))
    return {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}


def good_volume(seed=0, shape=(24, 24, 6)):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 10, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[6:14, 6:16, 1:5] = 1
    label[16:22, 4:10, 2:4] = 2
    image[label == 1] += 100
    return image, label


def write_msd(folder: Path, entries: list, modality=None):
    meta = {"name": "t", "modality": modality or {"0": "CT"}, "labels": {"0": "bg"}, "training": entries}
    (folder / "dataset.json").write_text(json.dumps(meta))
