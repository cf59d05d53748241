"""NIfTI loading, preprocessing, the prepare CLI: counts, splits, failures, exit codes."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from safeclick_jax.data import layouts, nifti, prepare, preprocess, roi_index, synthetic
from tests.data_fixtures import CT_SMALL, good_volume, write_msd, write_pair


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.write_dataset(root, num_volumes=10, seed=0)
    cache = tmp_path_factory.mktemp("synth_cache")
    assert prepare.main(["--root", str(root), "--out", str(cache), "--quiet"]) == 0
    return root, cache, json.loads((cache / "summary.json").read_text())


def test_load_reorients_to_ras(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    lps = np.diag([-1.0, -2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, lps), str(tmp_path / "x.nii.gz"))
    vol = nifti.load_nifti(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(vol.data, data[::-1, ::-1, :])
    assert vol.spacing == (1.0, 2.0, 3.0)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")


def test_load_permuted_axes_spacing(tmp_path):
    # voxel axes stored as (S, R, A): spacing must follow the axes to RAS order
    aff = np.array([[0, 2.0, 0, 0], [0, 0, 3.0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti2Image(np.zeros((4, 5, 6), np.float32), aff), str(tmp_path / "p.nii"))
    vol = nifti.load_nifti(tmp_path / "p.nii")
    assert vol.data.shape == (5, 6, 4) and vol.spacing == (2.0, 3.0, 1.5)


def test_normalisation_and_resampling():
    x = np.linspace(-2000, 2000, 1000).reshape(10, 10, 10)
    ct = preprocess.normalize_intensity(x, "ct_window", ct_window=(40, 400))
    assert ct.min() == 0 and ct.max() == 1
    np.testing.assert_allclose(preprocess.normalize_intensity(np.array([40.0]), "ct_window"), 0.5)
    pc = preprocess.normalize_intensity(x, "percentile", percentiles=(1, 99))
    assert pc.min() == 0 and pc.max() == 1 and 0.005 < (pc == 0).mean() < 0.02
    assert preprocess.resolve_mode("auto", "CT") == "ct_window"
    assert preprocess.resolve_mode("auto", "MRI") == "percentile"
    lab = np.zeros((8, 8, 4), np.uint8)
    lab[2:6, 2:6, 1:3] = 7
    out = preprocess.resample(lab, (1.0, 1.0, 2.0), 1.0, order=0)
    assert out.shape == (8, 8, 8) and set(np.unique(out)) == {0, 7}
    img = preprocess.resample(np.random.rand(8, 8, 4).astype(np.float32), (1, 1, 2), 1.0, order=1)
    assert img.shape == (8, 8, 8) and 0 <= img.min() and img.max() <= 1


def test_slices_roundtrip():
    v = np.random.rand(3, 4, 5)
    for axis in range(3):
        np.testing.assert_array_equal(preprocess.from_slices(preprocess.to_slices(v, axis), axis), v)


def test_split_counts_and_determinism():
    assert roi_index.split_counts(10) == (7, 1, 2)
    assert roi_index.split_counts(1) == (1, 0, 0)
    keys = [f"v{i}" for i in range(20)]
    a = roi_index.split_volumes(keys, seed=3)
    assert a == roi_index.split_volumes(list(reversed(keys)), seed=3)
    assert a != roi_index.split_volumes(keys, seed=4)
    assert sorted(a.values()).count("train") == 14


def test_rois_min_area():
    lab = np.zeros((2, 10, 10), np.uint8)
    lab[0, :5, :5] = 3  # 25 px
    lab[0, 9, 9] = 4  # 1 px sliver
    lab[1, :2, :2] = 3  # 4 px
    assert roi_index.find_rois(lab, 4) == [(0, 3, 25), (1, 3, 4)]
    assert roi_index.find_rois(lab, 1) == [(0, 3, 25), (0, 4, 1), (1, 3, 4)]


def test_synthetic_counts_and_splits(synth):
    root, cache, s = synth
    assert s["volumes_ok"] == 10 and s["failed"] == []
    vols = {k: set(v["volumes"]) for k, v in s["splits"].items()}
    assert [len(vols[k]) for k in ("train", "val", "test")] == [7, 1, 2]
    assert not (vols["train"] & vols["val"] or vols["train"] & vols["test"] or vols["val"] & vols["test"])
    rois = np.load(cache / "rois.npy")
    assert len(rois) == s["rois_total"] == sum(v["rois"] for v in s["splits"].values())
    assert (rois["area"] >= s["config"]["min_roi_area"]).all()
    assert set(np.unique(rois["label"])) == {1, 2, 3, 4, 5}
    volumes = json.loads((cache / "volumes.json").read_text())
    # Every ROI's split is its volume's split; ROI counts match a recount from the cached labels.
    for v in volumes:
        mine = rois[rois["volume_id"] == v["id"]]
        assert (mine["split"] == roi_index.SPLIT_CODE[v["split"]]).all()
        labels = np.load(cache / v["label_file"])
        assert len(mine) == len(roi_index.find_rois(labels, s["config"]["min_roi_area"]))
        assert v["spacing"] == [2.0, 2.0, 2.0] and v["orig_spacing"] == [2.0, 2.0, 5.0]
        assert labels.shape == (40, 48, 48)  # 16 slices x 5 mm resampled to 2 mm


def test_prepare_is_deterministic(synth, tmp_path):
    root, cache, s = synth
    assert prepare.main(["--root", str(root), "--out", str(tmp_path), "--quiet"]) == 0
    s2 = json.loads((tmp_path / "summary.json").read_text())
    assert s2["splits"] == s["splits"]
    np.testing.assert_array_equal(np.load(tmp_path / "rois.npy"), np.load(cache / "rois.npy"))


def _bad_dataset(root):
    """One good volume plus one volume for every bad-input case of the issue."""
    img, lab = good_volume()
    entries = [write_pair(root, "good.nii.gz", img, lab)]
    # unreadable: not a NIfTI file at all
    e = write_pair(root, "garbage.nii.gz", img, lab)
    (root / "imagesTr" / "garbage.nii.gz").write_bytes(b"this is not a nifti file" * 10)
    entries.append(e)
    # truncated .nii.gz
    e = write_pair(
        root,
        "trunc.nii.gz",
        np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32),
        np.zeros((24, 24, 24), np.uint8),
    )
    raw = (root / "imagesTr" / "trunc.nii.gz").read_bytes()
    (root / "imagesTr" / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    entries.append(e)
    entries.append(write_pair(root, "shape.nii.gz", img, lab[:, :, :5]))
    entries.append(write_pair(root, "affine.nii.gz", img, lab, label_affine=np.diag([2.0, 2.0, 4.0, 1.0])))
    nan = img.astype(np.float32)
    nan[3, 3, 3] = np.nan
    nan[4, 4, 4] = np.inf
    entries.append(write_pair(root, "nan.nii.gz", nan, lab))
    entries.append(write_pair(root, "flat.nii.gz", img[:, :, 0], lab[:, :, 0]))
    entries.append(write_pair(root, "fourd.nii.gz", np.stack([img, img], -1), lab))
    entries.append(write_pair(root, "float_label.nii.gz", img, lab.astype(np.float32) * 0.5))
    entries.append({"image": "./imagesTr/missing.nii.gz", "label": "./labelsTr/missing.nii.gz"})
    write_msd(root, entries)


EXPECTED_REASONS = {
    "garbage": r"unreadable",
    "trunc": r"truncated or corrupt",
    "shape": r"shape mismatch",
    "affine": r"affine mismatch",
    "nan": r"NaN or Inf",
    "flat": r"2D file .* 3D volume is needed",
    "fourd": r"4D file .* 3D volume is needed",
    "float_label": r"non-integer values",
    "missing": r"listed in dataset.json but missing",
}


def test_every_bad_input_is_reported(tmp_path):
    root, out = tmp_path / "bad", tmp_path / "cache"
    root.mkdir()
    _bad_dataset(root)
    assert prepare.main(["--root", str(root), "--out", str(out), "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["volumes_ok"] == 1 and s["volumes_total"] == 10
    by_name = {f["image"].split("/")[-1].split(".")[0]: f for f in s["failed"]}
    assert set(by_name) == set(EXPECTED_REASONS)
    import re

    for name, pattern in EXPECTED_REASONS.items():
        f = by_name[name]
        assert re.search(pattern, f["reason"]), (name, f["reason"])
        assert f"{name}.nii.gz" in f["reason"], f["reason"]  # the reason names the file
        assert f["label"].endswith(f"labelsTr/{name}.nii.gz")
    # --strict turns failures into a non-zero exit
    assert prepare.main(["--root", str(root), "--out", str(out), "--quiet", "--strict"]) == 1


def test_no_usable_volume_exits_nonzero(tmp_path, capsys):
    root = tmp_path / "allbad"
    root.mkdir()
    img, lab = good_volume()
    write_msd(
        root,
        [
            write_pair(root, "a.nii.gz", img, lab[:, :, :3]),
            {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"},
        ],
    )
    assert prepare.main(["--root", str(root), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "no usable volume" in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["volumes_ok"] == 0


def test_malformed_dataset_json(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    assert prepare.main(["--root", str(tmp_path), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "missing key 'training'" in capsys.readouterr().err


def test_multimodality_channel(tmp_path):
    img, lab = good_volume()
    two = np.stack([img, -img], -1)
    write_msd(tmp_path, [write_pair(tmp_path, "mm.nii.gz", two, lab)], modality={"0": "FLAIR", "1": "T1w"})
    cases = layouts.discover(tmp_path, channel=1)
    assert cases[0].channel == 1 and cases[0].modality == "T1w"
    image, _ = nifti.load_pair(cases[0].image, cases[0].label, cases[0].channel)
    np.testing.assert_array_equal(image.data, -img)
    with pytest.raises(layouts.DatasetError, match="channel 5"):
        layouts.discover(tmp_path, channel=5)


def test_plain_layout_pairs_by_name(tmp_path):
    img, lab = good_volume()
    aff = np.eye(4)
    for name in (
        "case1.nii.gz",
        "case1_seg.nii.gz",
        "b/ct.nii.gz",
        "b/seg.nii.gz",
        "images/x_0000.nii.gz",
        "labels/x.nii.gz",
        "lonely_ct.nii.gz",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab if "seg" in name or "labels" in name else img, aff), str(tmp_path / name))
    cases = layouts.discover(tmp_path)
    pairs = {(c.image and c.image.split(str(tmp_path))[1], c.label and c.label.split(str(tmp_path))[1]) for c in cases}
    assert ("/case1.nii.gz", "/case1_seg.nii.gz") in pairs
    assert ("/b/ct.nii.gz", "/b/seg.nii.gz") in pairs
    assert ("/images/x_0000.nii.gz", "/labels/x.nii.gz") in pairs
    lonely = [c for c in cases if c.image and c.image.endswith("lonely_ct.nii.gz")][0]
    assert "no matching label" in lonely.problem


def test_cli_subprocess(tmp_path):
    """The documented command line, run as a module."""
    root = tmp_path / "syn"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeclick_jax.data.synthetic",
            "--out",
            str(root),
            "--num-volumes",
            "3",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeclick_jax.data.prepare",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "c"),
            "--strict",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "prepare" in r.stderr and "3 volumes ok" in r.stdout  # progress bar + summary line


def test_real_ct(tmp_path):
    vol = nifti.load_nifti(CT_SMALL / "ct.nii.gz")
    assert vol.data.shape == (122, 101, 30) and vol.spacing == (3.0, 3.0, 3.0)
    assert vol.data.min() >= -1100 and vol.data.max() <= 1207
    s = prepare.prepare_dataset(CT_SMALL, tmp_path, progress=False)
    assert s["volumes_ok"] == 1 and s["failed"] == []
    # the plain layout pairs ct.nii.gz with seg.nii.gz; one volume -> train only
    assert s["splits"]["train"]["volumes"] == [str(CT_SMALL / "ct.nii.gz")]
    rois = np.load(tmp_path / "rois.npy")
    seg = nib.load(str(CT_SMALL / "seg.nii.gz"))
    seg = np.asarray(nib.as_closest_canonical(seg).dataobj)
    # ROI count recomputed independently from the NIfTI (no resampling: already isotropic).
    expected = sum(
        int(((seg[:, :, k] == v).sum()) >= 20) for k in range(seg.shape[2]) for v in np.unique(seg[:, :, k]) if v
    )
    assert len(rois) == s["rois_total"] == expected
    # label 13 has a single voxel: never an ROI at min area 20, but an ROI at min area 1
    assert 13 not in rois["label"]
    cfg = prepare.default_data_config()
    cfg.min_roi_area = 1
    s1 = prepare.prepare_dataset(CT_SMALL, tmp_path / "a1", cfg, progress=False)
    assert "13" in s1["rois_per_label"] and s1["rois_per_label"]["13"] == 1


def test_auto_normalization_rule():
    """'auto' without a modality: the CT window for Hounsfield units (air at -1000), percentile
    clipping for an MR-like volume; a modality, when known, decides; a bad name is refused."""
    from safeclick_jax.data.synthetic_abdomen import make_volume

    ct, _, _ = make_volume(0)
    mr = np.random.default_rng(0).gamma(2.0, 150.0, (32, 32, 8)).astype(np.float32)  # >= 0, long tail
    assert preprocess.looks_like_ct(ct) and not preprocess.looks_like_ct(mr)
    assert not preprocess.looks_like_ct(mr - 300.0)  # zero-centred MR: negative, but not air
    assert preprocess.resolve_mode("auto", data=ct) == "ct_window"
    assert preprocess.resolve_mode("auto", data=mr) == "percentile"
    assert preprocess.resolve_mode("auto", "MRI", data=ct) == "percentile"
    assert preprocess.resolve_mode("percentile", data=ct) == "percentile"
    with pytest.raises(ValueError, match="'window'"):
        preprocess.resolve_mode("window")
