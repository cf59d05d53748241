"""Finding (image, label) pairs in a dataset folder.

Two layouts:

* Medical Segmentation Decathlon (MSD): `dataset.json` with a "training" list of
  {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"} and a "modality" dict
  ({"0": "CT"} or {"0": "FLAIR", "1": "T1w", ...}). Multi-modality images are 4D; the config's
  `channel` picks one (default 0). A listed file that is missing becomes a failed case.
* Plain folder (no dataset.json): files are paired by name inside each folder, or across sibling
  `images*/` and `labels*/` folders with equal names. A file is a label when its name (without
  .nii/.nii.gz) is, or ends with `_`/`-`/`.` plus, one of LABEL_TOKENS (`case1_seg.nii.gz`,
  `seg.nii.gz`); it matches the image whose name without an IMAGE_TOKENS suffix is the same
  (`case1.nii.gz`, `case1_ct.nii.gz`; `ct.nii.gz` pairs with `seg.nii.gz`). An image may also be
  a DICOM series, a folder of DICOM files or a `.zip` of one, named as its label without the token
  (`imagesTr/case1/` or `case1.zip` with `labelsTr/case1.nii.gz` / `case1_seg.nii.gz`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from safeclick_jax.data import dicom

LABEL_TOKENS = ("seg", "segmentation", "label", "labels", "mask", "gt")
IMAGE_TOKENS = ("img", "image", "ct", "mr", "mri", "vol", "volume", "0000")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DatasetError(Exception):
    """The dataset as a whole cannot be read (e.g. a malformed dataset.json)."""


@dataclasses.dataclass
class Case:
    image: str | None  # absolute path (None when a label has no image)
    label: str | None  # absolute path (None when an image has no label)
    channel: int | None = None  # channel of a 4D multi-modality image
    modality: str | None = None  # e.g. "CT", from dataset.json or the config
    problem: str | None = None  # set when the case is known to be unusable before loading
    dataset: str = ""  # the root it came from


def nifti_stem(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _strip_token(stem: str, tokens) -> tuple[str, bool]:
    low = stem.lower()
    for tok in tokens:
        if low == tok:
            return "", True
        m = re.match(rf"^(.*)[_.\-]{re.escape(tok)}$", stem, flags=re.IGNORECASE)
        if m:
            return m.group(1), True
    return stem, False


def discover(root, channel: int | None = None, modality: str | None = None) -> list[Case]:
    """Lists the cases of a dataset root, MSD if it has dataset.json, plain folder otherwise."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root is not a directory")
    if (root / "dataset.json").exists():
        cases = discover_msd(root, channel, modality)
    else:
        cases = discover_plain(root, channel, modality)
    for c in cases:
        c.dataset = str(root)
    return cases


def discover_msd(root: Path, channel: int | None = None, modality: str | None = None) -> list[Case]:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot parse ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or "training" not in meta:
        raise DatasetError(f"{path}: missing key 'training' (the list of image/label pairs)")
    entries = meta["training"]
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: key 'training' must be a list, got {type(entries).__name__}")

    modalities = meta.get("modality") or meta.get("channel_names") or {}
    if not isinstance(modalities, dict):
        raise DatasetError(f'{path}: key \'modality\' must be a dict like {{"0": "CT"}}')
    multi = len(modalities) > 1
    if multi:
        chosen = 0 if channel is None else int(channel)
        if str(chosen) not in modalities:
            raise DatasetError(f"{path}: channel {chosen} not in 'modality' {modalities}")
    else:
        # Single-modality: a 4D file is an error, unless the user asked for a channel explicitly.
        chosen = channel
    if modality is None:
        modality = modalities.get(str(chosen if chosen is not None else 0))

    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{path}: training[{i}] must be a dict with keys 'image' and 'label', got {entry!r}")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        case = Case(str(image), str(label), chosen, modality)
        missing = [str(p) for p in (image, label) if not p.exists()]
        if missing:
            case.problem = f"listed in dataset.json but missing: {', '.join(missing)}"
        cases.append(case)
    return cases


def discover_plain(root: Path, channel: int | None = None, modality: str | None = None) -> list[Case]:
    images: dict[tuple[str, str], Path] = {}
    labels: dict[tuple[str, str], Path] = {}
    series = [p for p in sorted(root.rglob("*")) if p.is_dir() and dicom.is_series(p)]
    for p in sorted(root.rglob("*")):
        if p.name.startswith(".") or any(s in p.parents for s in series):
            continue
        is_series = p in series or (p.is_file() and p.suffix.lower() == ".zip")
        if is_series:
            stem = p.stem if p.is_file() else p.name
        elif p.is_file():
            stem = nifti_stem(p.name)
        else:
            continue
        if stem is None:
            continue
        # Group key: the folder, with images*/labels* siblings mapped to one group.
        parent = p.parent
        folder_low = parent.name.lower()
        in_label_dir = folder_low.startswith(("label", "mask", "seg", "gt"))
        in_image_dir = folder_low.startswith(("image", "img", "vol"))
        group = str(parent.parent) if (in_label_dir or in_image_dir) else str(parent)
        key, is_label = _strip_token(stem, LABEL_TOKENS)
        if is_series:  # a DICOM series is an image; its label map is a NIfTI
            key, is_label = stem, False
        elif in_label_dir:
            is_label = True
        elif in_image_dir:
            is_label = False
        if not is_label:
            key, _ = _strip_token(stem, IMAGE_TOKENS)
        table = labels if is_label else images
        if (group, key) in table:
            raise DatasetError(f"{root}: two files match case {key!r} in {group}: {table[(group, key)]} and {p}")
        table[(group, key)] = p

    cases = []
    for k in sorted(set(images) | set(labels)):
        img, lab = images.get(k), labels.get(k)
        case = Case(str(img) if img else None, str(lab) if lab else None, channel, modality)
        if img is None:
            case.problem = f"label {lab} has no matching image"
        elif lab is None:
            case.problem = f"image {img} has no matching label (expected e.g. {k[1] or 'name'}_seg.nii.gz)"
        cases.append(case)
    return cases
