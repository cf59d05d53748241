"""The synthetic abdomen (make train's default data): deterministic, the documented grid, every
label present, and the properties that make prompts fail: touching organs, thin vessels, lesions
inside the liver, intensities that overlap between neighbours."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from safeclick_jax.data import prepare, synthetic_abdomen
from safeclick_jax.data.synthetic_abdomen import LABELS, SHAPE, SPACING, make_volume

NAME = {v: int(k) for k, v in LABELS.items()}


@pytest.fixture(scope="module")
def volume():
    return make_volume(0)


def test_deterministic_from_seed():
    a, b, c = make_volume(3), make_volume(3), make_volume(4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[1], c[1])


def test_grid_spacing_and_labels(volume):
    image, labels, affine = volume
    assert image.shape == labels.shape == SHAPE and image.dtype == np.int16 and labels.dtype == np.uint8
    assert np.allclose(np.abs(np.diag(affine)[:3]), SPACING)
    assert 96 <= SHAPE[0] <= 160 and 96 <= SHAPE[1] <= 160
    assert set(np.unique(labels)) == set(range(len(LABELS)))
    assert image.min() <= -900 and 300 < image.max() < 3072  # air outside, bone inside


def _touch(labels, a, b):
    """Voxels of label a with a 4-neighbour (in-plane) of label b."""
    grown = ndimage.binary_dilation(labels == b, structure=ndimage.generate_binary_structure(3, 1)[..., 1:2])
    return int((grown & (labels == a)).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_touching_organs_with_similar_intensity(seed):
    image, labels, _ = make_volume(seed)
    for a, b in [("stomach", "liver"), ("stomach", "spleen"), ("bowel", "stomach")]:
        assert _touch(labels, NAME[a], NAME[b]) > 20, (seed, a, b)
    # Neighbours' mean intensities are closer than three noise standard deviations apart.
    means = {n: float(image[labels == NAME[n]].mean()) for n in ("liver", "spleen", "stomach", "bowel")}
    assert max(means.values()) - min(means.values()) < 40, means


def test_thin_vessels_and_lesions(volume):
    _, labels, _ = volume
    for name in ("aorta", "splenic_portal_vein"):
        m = labels == NAME[name]
        # thin: eroding twice in-plane removes (nearly) all of it
        eroded = ndimage.binary_erosion(m, structure=np.ones((3, 3, 1)), iterations=3)
        assert m.sum() > 50 and eroded.sum() < 0.1 * m.sum(), name
    vein = labels == NAME["splenic_portal_vein"]
    z = int(np.argmax(vein.sum((0, 1))))
    ys, xs = np.nonzero(vein[..., z])
    assert np.ptp(ys) > 4 * max(np.ptp(xs), 1) or np.ptp(xs) > 4 * max(np.ptp(ys), 1)  # elongated in-plane
    lesion = ndimage.binary_dilation(labels == NAME["liver_lesion"], iterations=1)
    assert (labels[lesion & (labels != NAME["liver_lesion"])] == NAME["liver"]).mean() > 0.5  # inside the liver


def test_write_and_prepare_split(tmp_path):
    root = synthetic_abdomen.write_dataset(tmp_path / "abd", num_volumes=10, seed=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 10 and meta["modality"] == {"0": "CT"} and meta["labels"] == LABELS
    img = nib.load(str(root / meta["training"][0]["image"]))
    assert img.shape == SHAPE
    s = prepare.prepare_dataset(root, tmp_path / "cache", progress=False)
    assert s["volumes_ok"] == 10 and not s["failed"]
    assert [len(s["splits"][k]["volumes"]) for k in ("train", "val", "test")] == [7, 1, 2]
    assert s["splits"]["test"]["rois"] > 50


def test_training_generates_the_chosen_kind(tmp_path):
    """loop.ensure_data writes the dataset data.synthetic_kind names; an unknown kind is refused by name."""
    import ml_collections

    from safeclick_jax.data import default_data_config
    from safeclick_jax.training import loop

    dc = default_data_config()
    dc.roots, dc.cache_dir = [str(tmp_path / "abd")], str(tmp_path / "cache")
    dc.synthetic_root, dc.synthetic_volumes = str(tmp_path / "abd"), 10
    dc = ml_collections.ConfigDict(dict(dc.to_dict(), synthetic_kind="abdomen"), type_safe=False)
    loop.ensure_data(dc, log=lambda m: None)
    assert json.loads((tmp_path / "abd" / "dataset.json").read_text())["labels"] == LABELS
    assert (tmp_path / "cache" / "rois.npy").exists()
    bad = ml_collections.ConfigDict(
        dict(dc.to_dict(), synthetic_kind="liver", roots=[str(tmp_path / "x")], cache_dir=str(tmp_path / "c2")),
        type_safe=False,
    )
    bad.synthetic_root = str(tmp_path / "x")
    with pytest.raises(ValueError, match="synthetic_kind: 'liver'"):
        loop.ensure_data(bad, log=lambda m: None)
    assert not (tmp_path / "x").exists()
