"""The procedural pretraining data: deterministic, many objects of every kind, smooth along z, fast,
and nothing like the synthetic abdomen the stand-in is fine-tuned and tested on."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

from safeclick_jax.data import prepare, preprocess, procedural, synthetic_abdomen
from safeclick_jax.data.procedural import KINDS, LABELS, SHAPE, kind_of, make_volume

SEEDS = range(6)


@pytest.fixture(scope="module")
def volumes():
    return [make_volume(s) for s in SEEDS]


def test_deterministic_from_seed():
    a, b, c = make_volume(7), make_volume(7), make_volume(8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_labels_name_their_kind():
    assert len(LABELS) == 1 + len(KINDS) * procedural.PER_KIND
    assert [kind_of(LABELS[str(1 + procedural.PER_KIND * k)]) for k in range(len(KINDS))] == list(KINDS)
    assert kind_of("tube_12") == "tube" and kind_of("right_kidney") == "right_kidney" and kind_of("liver") == "liver"


def test_many_objects_of_every_kind(volumes):
    counts, kinds = [], set()
    for image, labels, _ in volumes:
        assert image.shape == labels.shape == SHAPE and image.dtype == np.int16 and labels.dtype == np.uint8
        present = [int(v) for v in np.unique(labels) if v and (labels == v).sum() >= 50]
        counts.append(len(present))
        kinds |= {kind_of(LABELS[str(v)]) for v in present}
    # 15 slots filled with probability 0.75 (mean 11.25), a few occluded below 50 voxels
    assert 7 <= min(counts) and max(counts) <= 15 and 9 <= np.mean(counts) <= 13, counts
    assert kinds == set(KINDS)


def test_objects_change_smoothly_along_z(volumes):
    """Consecutive slices of an object overlap: its track is followable, as in a video."""
    dice, spans = [], []
    for _, labels, _ in volumes:
        for v in np.unique(labels)[1:]:
            m = labels == v
            area = m.sum((0, 1))
            spans.append(np.count_nonzero(area))
            for z in np.flatnonzero((area[:-1] >= 20) & (area[1:] >= 20)):
                a, b = m[..., z], m[..., z + 1]
                dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    dice = np.array(dice)
    assert len(dice) > 1000
    q = np.percentile(dice, [1, 5, 50])
    assert q[2] > 0.9 and q[1] > 0.6 and q[0] > 0.35, q  # the worst: an occluder passing over a small object
    assert np.median(spans) >= 20 and np.percentile(spans, 10) >= 8, np.percentile(spans, [0, 10, 50])


def test_unlike_the_abdomen(volumes):
    """Neither its structures, nor its intensities, nor its grid are the abdomen's."""
    organs = set(synthetic_abdomen.LABELS.values()) - {"background"}
    assert not organs & {kind_of(n) for n in LABELS.values()}
    abdomen, _, _ = synthetic_abdomen.make_volume(0)
    assert preprocess.looks_like_ct(abdomen)
    for image, _, _ in volumes:
        assert not preprocess.looks_like_ct(image) and image.min() >= 0 and image.max() <= 1000
    assert SHAPE != synthetic_abdomen.SHAPE


def test_write_and_prepare_in_seconds(tmp_path):
    t0 = time.perf_counter()
    root = procedural.write_dataset(tmp_path / "proc", num_volumes=10, seed=3, shape=(96, 96, 24))
    seconds = time.perf_counter() - t0
    assert seconds < 10, seconds  # generation is vectorised: far below this bound
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 10 and meta["modality"] == {"0": "procedural"} and meta["labels"] == LABELS
    img = nib.load(str(root / meta["training"][0]["image"]))
    assert img.shape == (96, 96, 24) and np.allclose(img.header.get_zooms(), (1, 1, 1))
    s = prepare.prepare_dataset(root, tmp_path / "cache", progress=False)
    assert s["volumes_ok"] == 10 and not s["failed"]
    assert [len(s["splits"][k]["volumes"]) for k in ("train", "val", "test")] == [7, 1, 2]
    assert s["rois_total"] > 10 * 24 * 3  # several objects on every slice
    vol = json.loads((tmp_path / "cache" / "volumes.json").read_text())[0]
    assert vol["normalization"] == "percentile" and vol["slices_shape"] == [24, 96, 96]  # no resampling
