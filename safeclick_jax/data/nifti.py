"""Loading NIfTI volumes (NIfTI-1 and -2, .nii / .nii.gz) into canonical RAS orientation.

Every check here raises `VolumeError` with a message that names the file and the problem, so
`prepare` can list the volume under `failed` and go on with the next one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np


class VolumeError(Exception):
    """A volume that cannot be used; the message names the file and the reason."""


@dataclasses.dataclass
class Volume:
    data: np.ndarray  # 3D array in RAS order: axis 0 -> Right, 1 -> Anterior, 2 -> Superior
    affine: np.ndarray  # 4x4 voxel -> world affine of `data` (after reorientation)
    spacing: tuple  # voxel size in mm along each axis of `data`, from the header
    path: str


def _squeeze_trailing(shape: tuple) -> tuple:
    # Many writers store 3D volumes as (X, Y, Z, 1): a trailing singleton is not a 4th dimension.
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_header(path) -> nib.spatialimages.SpatialImage:
    """Opens a NIfTI file (header only; data is read lazily)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for bad files (ImageFileError, EOFError, ...)
        raise VolumeError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: not a NIfTI-1/2 image (got {type(img).__name__})")
    return img


def load_nifti(path, channel: int | None = None, *, is_label: bool = False) -> Volume:
    """Loads a 3D volume, reorients it to RAS and returns data, affine and spacing.

    channel: for a 4D multi-modality file (X, Y, Z, C) the channel to keep. A 4D file with more
      than one channel and no `channel` is an error, as is any 2D or 5D+ file.
    is_label: labels keep their integer values: non-finite or non-integer values are an error.
    """
    img = read_header(path)
    shape = _squeeze_trailing(img.shape)
    if len(shape) < 3:
        raise VolumeError(f"{path}: {len(img.shape)}D file of shape {img.shape}; a 3D volume is needed")
    if len(shape) == 4 and channel is None:
        raise VolumeError(
            f"{path}: 4D file of shape {img.shape}; a 3D volume is needed "
            "(for a multi-modality file choose a channel in the config)"
        )
    if len(shape) > 4:
        raise VolumeError(f"{path}: {len(shape)}D file of shape {img.shape}; a 3D volume is needed")
    if len(shape) == 4 and not 0 <= channel < shape[3]:
        raise VolumeError(f"{path}: channel {channel} requested but the file has {shape[3]} channels")

    try:
        # asanyarray(dataobj) applies scl_slope/scl_inter and keeps integer dtypes when there is no
        # scaling; a truncated .nii.gz fails here (EOFError / zlib.error / ValueError).
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise VolumeError(f"{path}: cannot read voxel data, truncated or corrupt file ({type(e).__name__}: {e})") from e
    data = data.reshape(shape)
    if data.ndim == 4:
        data = data[..., channel]
    if data.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: unsupported voxel dtype {data.dtype}")

    if is_label:
        data = _check_labels(data, path)
    else:
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise VolumeError(f"{path}: {bad} voxels are NaN or Inf")

    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise VolumeError(f"{path}: invalid voxel spacing {zooms} in header")

    # Reorient to RAS. io_orientation finds, for each input axis, the output axis and its flip.
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape[:3])
    spacing = [0.0] * 3
    for in_axis, (out_axis, _) in enumerate(ornt):
        spacing[int(out_axis)] = zooms[in_axis]
    return Volume(np.ascontiguousarray(data), affine, tuple(spacing), str(path))


def _check_labels(data: np.ndarray, path) -> np.ndarray:
    """Label maps must hold non-negative integers; returns them as the smallest unsigned dtype."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise VolumeError(f"{path}: label map has NaN or Inf values")
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            raise VolumeError(f"{path}: label map has non-integer values (e.g. {example!r}); labels must be integers")
    if data.size and data.min() < 0:
        raise VolumeError(f"{path}: label map has negative values (min {data.min()})")
    top = int(data.max()) if data.size else 0
    if top > np.iinfo(np.uint16).max:
        raise VolumeError(f"{path}: label value {top} too large (max 65535)")
    return data.astype(np.uint8 if top <= 255 else np.uint16)


def load_pair(image_path, label_path, channel: int | None = None, affine_atol: float = 1e-3) -> tuple[Volume, Volume]:
    """Loads an image and its label map and checks that they share one voxel grid."""
    image_header = read_header(image_path)
    label_header = read_header(label_path)
    ishape = _squeeze_trailing(image_header.shape)[:3]
    lshape = _squeeze_trailing(label_header.shape)[:3]
    if len(ishape) == 3 and len(lshape) == 3 and ishape != lshape:
        raise VolumeError(
            f"image/label shape mismatch: {image_path} has {tuple(ishape)}, {label_path} has {tuple(lshape)}"
        )
    # Compare the affines scaled to the voxel size: a tolerance in mm, not relative.
    if not np.allclose(image_header.affine, label_header.affine, atol=affine_atol):
        raise VolumeError(
            f"image/label affine mismatch: {image_path} vs {label_path} (max difference "
            f"{np.abs(image_header.affine - label_header.affine).max():.4g} mm)"
        )
    image = load_nifti(image_path, channel)
    label = load_nifti(label_path, is_label=True)
    if image.data.shape != label.data.shape:
        raise VolumeError(
            f"image/label shape mismatch after loading: {image_path} "
            f"{image.data.shape}, {label_path} {label.data.shape}"
        )
    return image, label
