"""The DICOM series reader: series written here with pydicom from a known volume and geometry
(axial, sagittal, oblique; shuffled file names; non-unit rescale slope) must read back as the known
volume and as what dcm2niix, an independent converter, makes of the same files."""

import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from safeclick_jax.data import dicom
from safeclick_jax.data.nifti import VolumeError, load_nifti
from tests.dicom_series import expected_volume, phantom, pydicom, rotation, series_geometry, write_series

GEOMETRIES = {
    # name: (row cosines, column cosines, slice step (mm), PixelSpacing (row, column), origin, slope, intercept)
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 2.5), (0.7, 0.8), (-90.0, -120.5, 33.0), 1.0, -1024.0),
    # slices written from right to left: the reader sorts by position, not by write order
    "sagittal": ((0, 1, 0), (0, 0, -1), (1.5, 0, 0), (1.1, 0.9), (10.0, -80.0, 60.0), 1.0, 0.0),
    "oblique": (
        tuple(rotation(20, -12, 31)[:, 0]),
        tuple(rotation(20, -12, 31)[:, 1]),
        tuple(2.0 * rotation(20, -12, 31)[:, 2]),
        (0.75, 0.6),
        (-40.25, 17.5, -3.0),
        0.5,
        -100.0,
    ),
}


def _write(folder, name, **kw):
    row, col, step, spacing, origin, slope, intercept = GEOMETRIES[name]
    geometry = series_geometry(row, col, step, spacing, origin)
    stored = phantom()
    paths = write_series(folder, stored, *geometry, slope=slope, intercept=intercept, **kw)
    return paths, expected_volume(stored, slope, intercept, *geometry)


def _dcm2niix(folder, out) -> str:
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix, in the test extra)")
    os.makedirs(out, exist_ok=True)
    r = subprocess.run([exe, "-z", "n", "-f", "vol", "-o", str(out), str(folder)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return os.path.join(out, "vol.nii")


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_reader_equals_known_volume_and_dcm2niix(name, tmp_path):
    folder = tmp_path / name
    _, (want, want_affine) = _write(folder, name)
    vol = dicom.load_dicom(folder)
    assert vol.data.shape == want.shape
    assert np.array_equal(vol.data.astype(np.float64), want)
    np.testing.assert_allclose(vol.affine, want_affine, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(want_affine[:3, :3], axis=0), atol=1e-6)
    slope = GEOMETRIES[name][5]
    assert vol.data.dtype == (np.float32 if slope != 1 else np.int16)
    # dcm2niix's NIfTI of the same files, through the project's NIfTI loader: same voxels, same affine
    ref = load_nifti(_dcm2niix(folder, tmp_path / "dcm2niix"))
    assert ref.data.shape == vol.data.shape
    assert np.array_equal(np.asarray(ref.data, np.float64), vol.data.astype(np.float64))
    np.testing.assert_allclose(ref.affine, vol.affine, atol=1e-3)  # NIfTI stores the affine in float32


def test_zip_and_dispatch(tmp_path):
    folder = tmp_path / "series"
    paths, (want, _) = _write(folder, "axial")
    (folder / "README.txt").write_text("not DICOM: skipped")
    z = tmp_path / "series.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in paths:
            f.write(p, os.path.join("export", os.path.basename(p)))
    assert dicom.is_series(folder) and dicom.is_series(z) and not dicom.is_series(tmp_path / "none")
    from_zip = dicom.load_volume(z)
    assert np.array_equal(from_zip.data, dicom.load_volume(folder).data) and np.array_equal(from_zip.data, want)


def _refusal(folder) -> str:
    with pytest.raises(VolumeError) as e:
        dicom.load_dicom(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    return msg


def test_mixed_series_refused(tmp_path):
    folder = tmp_path / "mixed"
    _write(folder, "axial", seed=0)
    _write(folder, "axial", seed=1)
    assert "2 series in one folder" in _refusal(folder)


def test_missing_and_duplicate_slices_refused(tmp_path):
    folder = tmp_path / "missing"
    paths, _ = _write(folder, "axial")
    os.remove(paths[5])
    assert "1 missing slice(s)" in _refusal(folder)
    folder = tmp_path / "duplicate"
    paths, _ = _write(folder, "axial")
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(str(folder / "copy"))
    msg = _refusal(folder)
    assert "duplicate slice at position" in msg and "copy" in msg


def test_unequal_spacing_refused(tmp_path):
    folder = tmp_path / "unequal"
    paths, _ = _write(folder, "axial")
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.8  # 2.5 mm slices: 3.3 then 1.7
    ds.save_as(paths[4])
    assert "unequal slice spacing (1.700 to 3.300 mm" in _refusal(folder)


def test_no_pixel_data_refused(tmp_path):
    folder = tmp_path / "nopixels"
    paths, _ = _write(folder, "axial")
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.PixelData
        ds.save_as(p)
    assert "has no pixel data" in _refusal(folder)


def test_undecodable_compression_refused(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    folder = tmp_path / "j2k"
    paths, _ = _write(folder, "axial")
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.save_as(p)
    msg = _refusal(folder)
    assert "JPEG 2000" in msg and "no installed decoder reads it" in msg


def test_not_a_series(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert "no DICOM files found" in _refusal(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    assert "unreadable zip file" in _refusal(tmp_path / "bad.zip")


def test_prepare_reads_dicom_series(tmp_path):
    """Data preparation: a series folder and a zipped series, each with its NIfTI label map on the
    series' grid, are prepared like NIfTI volumes; a label on another grid fails with its cause."""
    import json

    import nibabel as nib

    from safeclick_jax.data import layouts, prepare

    root = tmp_path / "data"
    _, (want, affine) = _write(root / "imagesTr" / "case1", "oblique")
    label = np.zeros(want.shape, np.uint8)
    label[4:12, 5:14, 3:9] = 1
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / "case1.nii.gz"))
    paths, _ = _write(tmp_path / "case2", "axial")
    with zipfile.ZipFile(root / "imagesTr" / "case2.zip", "w") as f:
        for p in paths:
            f.write(p, os.path.basename(p))
    nib.save(nib.Nifti1Image(label, np.diag([0.8, 0.7, 2.5, 1.0])), str(root / "labelsTr" / "case2.nii.gz"))
    cases = {os.path.basename(c.image): c for c in layouts.discover(root)}
    assert set(cases) == {"case1", "case2.zip"} and all(c.label and not c.problem for c in cases.values())
    assert prepare.main(["--root", str(root), "--out", str(tmp_path / "cache"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["volumes_ok"] == 1 and summary["splits"]["train"]["volumes"] == [str(root / "imagesTr" / "case1")]
    (ok,) = json.loads((tmp_path / "cache" / "volumes.json").read_text())
    assert ok["orig_shape"] == list(want.shape) and ok["num_rois"] > 0
    np.testing.assert_allclose(ok["affine_ras"], affine, atol=1e-6)
    (bad,) = summary["failed"]
    assert "image/label affine mismatch" in bad["reason"] and "case2.zip" in bad["reason"]


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_dicom_seg_references_the_series(name, tmp_path):
    """A RAS label map written as DICOM SEG: it references every source slice of the series, and its
    frames, read back by highdicom, are the label map on the series' own grid."""
    hd = pytest.importorskip("highdicom")
    from safeclick_jax.data.dicom_seg import write_seg

    folder = tmp_path / "series"
    paths, (want, _) = _write(folder, name)
    labels = np.zeros(want.shape, np.uint8)
    labels[3:10, 4:12, 2:7] = 2
    labels[12:20, 2:6, 5:11] = 5
    out = tmp_path / "seg.dcm"
    assert write_seg(labels, folder, out) == 2
    seg = hd.seg.segread(str(out))
    sources = [pydicom.dcmread(p) for p in paths]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["object 2", "object 5"]
    # frames by source instance, in the order the files were written (slice k at origin + k * step)
    uids = [ds.SOPInstanceUID for ds in sources]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True)  # (slice, row, column)
    native = frames.transpose(2, 1, 0)
    vol = dicom.load_dicom(folder)
    from safeclick_jax.data.dicom_seg import to_series_grid

    _, _, affine = dicom.read_series(folder)
    expected = to_series_grid(np.where(labels == 5, 2, np.where(labels == 2, 1, 0)), affine)
    # read_series sorts by position; the files were written in position order for these geometries
    assert vol.data.shape == labels.shape and np.array_equal(native, expected)
    assert int((native > 0).sum()) == int((labels > 0).sum())
