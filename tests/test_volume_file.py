"""The one volume reader (safeclick_jax.data.volume_file): the size a header declares is refused
before any voxel is read, label maps are checked against their volume, arrays get the same checks.
No model: milliseconds."""

from __future__ import annotations

import gzip
import resource

import nibabel as nib
import numpy as np
import pytest

from safeclick_jax.data.volume_file import VolumeError, check_array, read_label_map, read_volume, volume_suffix


def bomb(path, shape, dtype=np.int16, payload=b"\0" * 4096):
    """A NIfTI file whose header declares `shape` but holds only `payload` (gzip when .gz)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + payload
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    "name,shape,dtype,words",
    [
        ("huge.nii", (30000, 30000, 30000), np.int16, "27000000000000 voxels, above the limit of"),
        ("zeros.nii.gz", (1500, 1500, 1500), np.int16, "3375000000 voxels, above the limit of"),
        ("wide.nii.gz", (1000, 1000, 1000), np.float64, "7.45 GiB of voxel data (decompressed), above the limit"),
    ],
)
def test_declared_size_refused_before_reading(tmp_path, name, shape, dtype, words):
    before = peak_rss_mb()
    with pytest.raises(VolumeError) as e:
        read_volume(bomb(tmp_path / name, shape, dtype))
    msg = str(e.value)
    assert words in msg and ("max_voxels" in msg or "max_bytes" in msg) and "\n" not in msg, msg
    assert peak_rss_mb() - before < 50  # nothing of the declared size was allocated


def test_limits_are_parameters(tmp_path):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), np.eye(4)), str(path))
    assert read_volume(path).data.shape == (10, 10, 10)
    with pytest.raises(VolumeError, match="1000 voxels, above the limit of 999 voxels"):
        read_volume(path, max_voxels=999)
    with pytest.raises(VolumeError, match="above the limit of 0.00 GiB"):
        read_volume(path, max_bytes=1999)


def test_file_checks_name_the_problem(tmp_path):
    (tmp_path / "fake.nii.gz").write_bytes(b"not gzip at all")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii"))
    cases = [
        (tmp_path / "missing.nii", "does not exist"),
        (tmp_path / "fake.nii.gz", "named .gz but not gzip-compressed"),
        (tmp_path / "4d.nii", "holds 2 volumes; a 3D volume is needed"),
        (tmp_path / "x.mha", "only .nii and .nii.gz"),
    ]
    for path, words in cases:
        with pytest.raises(VolumeError, match=words):
            read_volume(path)
    assert read_volume(tmp_path / "4d.nii", volume_index=1).input_shape == (4, 5, 6)
    with pytest.raises(VolumeError, match="channel 2 requested but the file has 2 channels"):
        read_volume(tmp_path / "4d.nii", volume_index=2)
    assert volume_suffix("A.NII.GZ") == ".nii.gz"
    for bad, words in ((np.zeros((3, 3)), "must be 3D"), (np.full((2, 2, 2), np.inf), "NaN or Inf")):
        with pytest.raises(VolumeError, match=words):
            check_array(bad)


def test_label_map_on_the_volume_grid(tmp_path):
    affine = np.array([[-0.7, 0, 0, 10], [0, 0, 2.5, -5], [0, 0.9, 0, 3], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine), str(tmp_path / "v.nii.gz"))
    vol = read_volume(tmp_path / "v.nii.gz")
    assert vol.input_shape == (6, 5, 4) and vol.data.shape != vol.input_shape  # reoriented to RAS
    lab = np.zeros((6, 5, 4), np.float32)
    lab[1, 2, 3] = 7
    nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "l.nii.gz"))
    got = read_label_map(tmp_path / "l.nii.gz", vol)
    assert got.dtype == np.int64 and got[1, 2, 3] == 7 and got.sum() == 7  # the file's grid, not RAS
    lab[0, 0, 0] = 1.5
    nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "frac.nii.gz"))
    nib.save(nib.Nifti1Image(lab[:, :, :3], affine), str(tmp_path / "shape.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "aff.nii.gz"))
    for name, words in (
        ("frac", r"non-integer values \(e.g. \[1.5\]\)"),
        ("shape", r"shape \(6, 5, 3\) differs from the image's \(6, 5, 4\)"),
        ("aff", "its affine differs from the image's"),
    ):
        with pytest.raises(VolumeError, match=words):
            read_label_map(tmp_path / f"{name}.nii.gz", vol)
