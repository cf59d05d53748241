"""Loading NIfTI volumes (NIfTI-1 and -2, .nii / .nii.gz) into canonical RAS orientation: the one
reader of the data preparation, the volume engine, the CLI and the web app.

Every check here raises `VolumeError` with a message that names the file and the problem, so
`prepare` can list the volume under `failed` and go on with the next one, and the CLI and the app
answer with that sentence. The size the header declares is checked against `max_voxels` and
`max_bytes` before any voxel is read: a header claiming 30000^3 voxels, or a small .nii.gz that
would decompress to gigabytes, is refused without allocating (nibabel decompresses exactly the
declared data, so bounding the declaration bounds the decompression).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np

MAX_VOXELS = 1 << 30  # default voxels per volume (1024^3; a 512 x 512 x 2000 CT is half of it)
MAX_BYTES = 1 << 32  # default limit on the declared (decompressed) voxel data


class VolumeError(ValueError):
    """A volume that cannot be used; the message names the file and the reason."""


@dataclasses.dataclass
class Volume:
    data: np.ndarray  # 3D array in RAS order: axis 0 -> Right, 1 -> Anterior, 2 -> Superior
    affine: np.ndarray  # 4x4 voxel -> world affine of `data` (after reorientation)
    spacing: tuple  # voxel size in mm along each axis of `data`, from the header
    path: str
    ornt: np.ndarray | None = None  # orientation of the file's voxel axes to RAS (nibabel io_orientation)
    image: nib.spatialimages.SpatialImage | None = None  # the file's image: its own affine and header

    @property
    def input_shape(self) -> tuple:
        """The file's 3D voxel grid (before reorientation)."""
        return tuple(self.data.shape[int(o)] for o in self.ornt[:, 0])


def _squeeze_trailing(shape: tuple) -> tuple:
    # Many writers store 3D volumes as (X, Y, Z, 1): a trailing singleton is not a 4th dimension.
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_header(path, max_voxels: int = MAX_VOXELS, max_bytes: int = MAX_BYTES) -> nib.spatialimages.SpatialImage:
    """Opens a NIfTI file (header only; data is read lazily) and checks the size it declares."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: file does not exist")
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise VolumeError(f"{path}: unreadable NIfTI file, named .gz but not gzip-compressed")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for bad files (ImageFileError, EOFError, ...)
        raise VolumeError(
            f"{path}: unreadable NIfTI file, not a readable NIfTI-1/2 header ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: not a NIfTI-1/2 image (got {type(img).__name__})")
    voxels = 1
    for n in img.shape:  # Python ints: a NIfTI-2 header may declare more than 2^63 voxels
        voxels *= int(n)
    if voxels > max_voxels:
        raise VolumeError(
            f"{path}: the header declares {' x '.join(str(int(n)) for n in img.shape)} = {voxels} voxels, "
            f"above the limit of {max_voxels} voxels (max_voxels)"
        )
    nbytes = voxels * img.header.get_data_dtype().itemsize
    if nbytes > max_bytes:
        raise VolumeError(
            f"{path}: the header declares {nbytes / 2**30:.2f} GiB of voxel data (decompressed), "
            f"above the limit of {max_bytes / 2**30:.2f} GiB (max_bytes)"
        )
    return img


def volume_shape(img, path, channel: int | None = None) -> tuple:
    """The 3D shape of a file's volume (`channel`: the volume of a 4D file); VolumeError for a file
    that holds no 3D volume, or a 4D file without (or with an impossible) `channel`."""
    shape = _squeeze_trailing(img.shape)
    if len(shape) < 3 or len(shape) > 4:
        raise VolumeError(f"{path}: {len(shape)}D file of shape {tuple(img.shape)}; a 3D volume is needed")
    if len(shape) == 4 and channel is None:
        raise VolumeError(
            f"{path}: 4D file of shape {tuple(img.shape)} holds {shape[3]} volumes; a 3D volume is needed: "
            "choose one (CLI: --volume-index, Python: volume_index=, training config: data.channel)"
        )
    if len(shape) == 4 and not 0 <= channel < shape[3]:
        raise VolumeError(
            f"{path}: channel {channel} requested but the file has {shape[3]} channels (0..{shape[3] - 1})"
        )
    if len(shape) == 3 and channel not in (None, 0):
        raise VolumeError(f"{path}: channel {channel} requested but the file is 3D {tuple(shape)}")
    if min(shape[:3]) < 1:
        raise VolumeError(f"{path}: empty volume of shape {tuple(shape)}")
    return tuple(shape[:3])


def load_nifti(
    path,
    channel: int | None = None,
    *,
    is_label: bool = False,
    max_voxels: int = MAX_VOXELS,
    max_bytes: int = MAX_BYTES,
) -> Volume:
    """Loads a 3D volume, reorients it to RAS and returns data, affine and spacing.

    channel: for a 4D multi-modality file (X, Y, Z, C) the channel (volume) to keep. A 4D file with
      more than one channel and no `channel` is an error, as is any 2D or 5D+ file.
    is_label: labels keep their integer values: non-finite or non-integer values are an error.
    max_voxels, max_bytes: limits on the size the header declares, checked before reading.
    """
    img = read_header(path, max_voxels, max_bytes)
    volume_shape(img, path, channel)
    shape = _squeeze_trailing(img.shape)

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
    return Volume(np.ascontiguousarray(data), affine, tuple(spacing), str(path), np.asarray(ornt), img)


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
