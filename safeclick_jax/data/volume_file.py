"""The one reader of volume files for the engine, the CLI and the web app: `read_volume(path)`
chooses the reader from the path (a NIfTI file: safeclick_jax/data/nifti.py, whose checks and size
limits it applies; a DICOM series folder or a .zip of one: safeclick_jax/data/dicom.py),
`read_label_map` reads a label map on a volume's grid, and `check_array` applies the same checks
to an array given directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from safeclick_jax.data import dicom, nifti
from safeclick_jax.data.nifti import MAX_BYTES, MAX_VOXELS, Volume, VolumeError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SERIES_SUFFIX = ".zip"  # an uploaded DICOM series
__all__ = [
    "MAX_BYTES",
    "MAX_VOXELS",
    "Volume",
    "VolumeError",
    "read_label_map",
    "read_volume",
    "volume_stem",
    "volume_suffix",
]


def volume_suffix(name: str) -> str:
    """The suffix that names a volume file's format; VolumeError for any other file."""
    low = str(name).lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return suffix
    raise VolumeError(f"{name!r}: only .nii and .nii.gz files are accepted")


def volume_stem(path: str | os.PathLike) -> str:
    """A volume's name without its format's suffix: `ct` for ct.nii.gz, ct.zip or a series folder ct/."""
    name = Path(path).name
    if Path(path).is_dir() or name.lower().endswith(SERIES_SUFFIX):
        return name[: -len(SERIES_SUFFIX)] if name.lower().endswith(SERIES_SUFFIX) else name
    return name[: -len(volume_suffix(name))]


def read_volume(
    path: str | os.PathLike,
    volume_index: int | None = None,
    max_voxels: int = MAX_VOXELS,
    max_bytes: int = MAX_BYTES,
) -> Volume:
    """A volume file -> Volume (RAS data, orientation of the file's axes, the file's image and
    header). A 4D file needs `volume_index`; every axis needs at least two voxels. The size the
    header declares is checked against `max_voxels` / `max_bytes` before any voxel is read. A DICOM
    series (a folder or a .zip) reads on its own grid (column, row, slice in position order)."""
    if dicom.is_series(path):
        if volume_index is not None:
            raise VolumeError(f"{path}: a DICOM series is one 3D volume; volume index {volume_index} does not apply")
        vol = dicom.load_dicom(path, max_voxels)
    else:
        volume_suffix(Path(path).name)
        vol = nifti.load_nifti(path, volume_index, max_voxels=max_voxels, max_bytes=max_bytes)
    if min(vol.input_shape) < 2:  # one voxel thick: an image, not a volume to propagate through
        raise VolumeError(f"{path}: a 3D volume is needed, the file has shape {vol.input_shape}")
    return vol


def read_label_map(path: str | os.PathLike, like: Volume, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """An integer label map on the grid of the volume `like` (same shape and affine) -> int64 array
    on that input grid (not reoriented). VolumeError naming what differs otherwise."""
    volume_suffix(Path(path).name)
    img = nifti.read_header(path, max_voxels)
    shape = nifti.volume_shape(img, path)
    if shape != like.input_shape:
        raise VolumeError(f"{path}: shape {shape} differs from the image's {like.input_shape}")
    if like.image is not None and not np.allclose(img.affine, like.image.affine, atol=1e-4):
        diff = float(np.abs(np.asarray(img.affine) - np.asarray(like.image.affine)).max())
        raise VolumeError(f"{path}: its affine differs from the image's (max difference {diff:.4g})")
    try:
        lab = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as e:
        raise VolumeError(f"{path}: cannot read voxel data, truncated or corrupt file ({type(e).__name__}: {e})") from e
    return integer_labels(lab, str(path))


def integer_labels(lab: np.ndarray, where: str) -> np.ndarray:
    """A label map's values as int64; ValueError naming the first value that is not an integer."""
    lab = np.asarray(lab)
    if lab.dtype.kind == "f":
        bad = ~np.isfinite(lab) | (lab != np.round(np.nan_to_num(lab)))
        if bad.any():
            raise VolumeError(f"{where} has non-integer values (e.g. {lab[bad][:3].tolist()})")
    elif lab.dtype.kind not in "biu":
        raise VolumeError(f"{where} has dtype {lab.dtype}; an integer label map is needed")
    return lab.astype(np.int64)


def check_array(data, what: str = "volume") -> np.ndarray:
    """A 3D numeric array without NaN or Inf, at least one voxel along each axis."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise VolumeError(f"{what} must be 3D, got shape {data.shape}")
    if data.dtype.kind not in "biuf":
        raise VolumeError(f"{what} has unsupported dtype {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise VolumeError(f"{what} has NaN or Inf values")
    if min(data.shape) < 1:
        raise VolumeError(f"{what} is empty: shape {data.shape}")
    return data
