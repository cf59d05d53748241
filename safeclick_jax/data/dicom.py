"""Reading a DICOM series (a folder of slice files, or a .zip of one) into the project's volume
contract: the same `Volume` as data/nifti.py's `load_nifti`, in RAS order.

Read with pydicom: a pure-Python reader of the DICOM standard with no native converter in between,
so every geometric decision is visible here and is checked (sorting, spacing, missing slices) rather
than repaired silently; it decodes uncompressed data itself and compressed transfer syntaxes through
whichever decoder plugins are installed (pylibjpeg, pyjpegls, GDCM), which it reports by name.
(SimpleITK would add a 50 MB native library; dcm2niix writes files and repairs some geometry on
its own. The tests use dcm2niix as the independent converter the reader must agree with.)

The geometry (DICOM PS3.3 C.7.6.2, Image Plane module):
  voxel (i = column, j = row, k = slice) -> patient LPS mm:
      IPP_0 + i * Δc * row_cosines + j * Δr * column_cosines + k * (IPP_last - IPP_0) / (N - 1)
  with ImageOrientationPatient = (row_cosines, column_cosines), PixelSpacing = (Δr, Δc), slices
  sorted by their position along row_cosines x column_cosines. LPS -> RAS negates x and y, as NIfTI
  converters do; then the volume is reoriented to RAS axes exactly as `load_nifti` does.
Values: stored * RescaleSlope + RescaleIntercept, per slice.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from safeclick_jax.data.nifti import Volume, VolumeError, load_nifti
from safeclick_jax.data.nifti import load_pair as load_nifti_pair

# Slice spacing may vary by this fraction of the median spacing (scanners write positions rounded
# to ~1e-3 mm); beyond it, a gap of about 2x is a missing slice and anything else unequal spacing.
SPACING_TOLERANCE = 0.01
# Every slice's ImageOrientationPatient must agree to this (direction cosines).
ORIENTATION_TOLERANCE = 1e-4
_NOT_SLICES = ("DICOMDIR",)


def is_series(path) -> bool:
    """A .zip file, or a folder holding at least one DICOM file: what `load_dicom` reads."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".zip"
    if not p.is_dir():
        return False
    return any(f.is_file() and _has_dicom_magic(f) for f in p.iterdir())


def _has_dicom_magic(path: Path) -> bool:
    """The DICOM Part 10 file signature: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _sources(path: Path) -> list[tuple[str, object]]:
    """(name, file-like or path) of every candidate file of the series, folder or zip."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [(str(p.relative_to(path)), p) for p in files if p.name.upper() not in _NOT_SLICES]
    try:
        with zipfile.ZipFile(path) as z:
            return [
                (info.filename, io.BytesIO(z.read(info)))
                for info in z.infolist()
                if not info.is_dir()
                and not Path(info.filename).name.startswith(".")
                and Path(info.filename).name.upper() not in _NOT_SLICES
            ]
    except (zipfile.BadZipFile, OSError) as e:
        raise VolumeError(f"{path}: unreadable zip file ({e})") from e


def _read_slices(path: Path) -> list[tuple[str, object]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for name, src in _sources(path):
        try:
            ds = pydicom.dcmread(src)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError):
            continue  # not DICOM (a README, a thumbnail): the series is what remains
        datasets.append((name, ds))
    if not datasets:
        raise VolumeError(f"{path}: no DICOM files found")
    return datasets


def _one_series(path: Path, datasets) -> list:
    by_uid: dict[str, list] = {}
    for name, ds in datasets:
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append((name, ds))
    if len(by_uid) > 1:
        parts = ", ".join(f"{uid} ({len(v)} files, {v[0][1].get('Modality', '?')})" for uid, v in by_uid.items())
        raise VolumeError(f"{path}: {len(by_uid)} series in one folder: {parts}; give one series per folder or zip")
    return next(iter(by_uid.values()))


def _geometry(path: Path, slices) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted slices, row/column cosines, the slice normal and each slice's position along it."""
    required = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for name, ds in slices:
        if "PixelData" not in ds:
            raise VolumeError(f"{path}: {name} has no pixel data (SOP class {ds.get('SOPClassUID', '?')!s})")
        missing = [t for t in required if t not in ds]
        if missing:
            raise VolumeError(f"{path}: {name} lacks {', '.join(missing)}; the slice geometry is unknown")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{path}: {name} is a multi-frame (enhanced) image; one file per slice is read")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(f"{path}: {name} has {ds.SamplesPerPixel} samples per pixel (colour); grey levels needed")
    if len(slices) < 2:
        raise VolumeError(f"{path}: a single slice ({slices[0][0]}); a volume needs at least 2")
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
    bad = np.abs(iop - iop[0]).max(axis=1) > ORIENTATION_TOLERANCE
    if bad.any():
        raise VolumeError(f"{path}: {slices[int(np.argmax(bad))][0]} has another orientation than {slices[0][0]}")
    for tag in ("Rows", "Columns", "PixelSpacing"):
        values = {tuple(np.atleast_1d(np.asarray(ds[tag].value, float))) for _, ds in slices}
        if len(values) > 1:
            raise VolumeError(f"{path}: slices differ in {tag} ({sorted(values)})")
    row, col = iop[0, :3], iop[0, 3:]
    normal = np.cross(row, col)
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices]) @ normal
    order = np.argsort(pos, kind="stable")
    return [slices[i] for i in order], row, col, pos[order]


def _check_spacing(path: Path, slices, pos: np.ndarray) -> None:
    gaps = np.diff(pos)
    dup = np.flatnonzero(gaps <= 1e-3)
    if dup.size:
        i = int(dup[0])
        raise VolumeError(
            f"{path}: duplicate slice at position {pos[i]:.3f} mm ({slices[i][0]} and {slices[i + 1][0]})"
        )
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > SPACING_TOLERANCE * step
    if not off.any():
        return
    i = int(np.flatnonzero(off)[0])
    missing = np.round(gaps / step) - 1
    if np.all(np.abs(gaps - (missing + 1) * step) <= SPACING_TOLERANCE * step):
        raise VolumeError(
            f"{path}: {int(missing.sum())} missing slice(s): a gap of {gaps[i]:.3f} mm after position {pos[i]:.3f} "
            f"mm ({slices[i][0]}), where slices are {step:.3f} mm apart"
        )
    raise VolumeError(
        f"{path}: unequal slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm, tolerance "
        f"{SPACING_TOLERANCE:.0%} of {step:.3f} mm)"
    )


def _pixels(path: Path, name: str, ds) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as e:  # no decoder for a compressed syntax, or corrupt data
        ts = ds.file_meta.get("TransferSyntaxUID")
        if ts is not None and ts.is_compressed:
            raise VolumeError(
                f"{path}: {name} is compressed as {ts.name} ({ts}) and no installed decoder reads it "
                "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm)"
            ) from e
        raise VolumeError(f"{path}: {name}: unreadable pixel data ({type(e).__name__}: {e})") from e
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1 and intercept == int(intercept):
        return arr.astype(np.int32) + int(intercept)
    return arr.astype(np.float64) * slope + intercept


def read_series(path) -> tuple[list, np.ndarray, np.ndarray]:
    """(pydicom datasets in slice order, rescaled values on the (column, row, slice) grid, that
    grid's voxel -> RAS affine) of a DICOM series folder or zip; `VolumeError` names the cause."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: does not exist")
    slices = _one_series(path, _read_slices(path))
    slices, row, col, pos = _geometry(path, slices)
    _check_spacing(path, slices, pos)
    first = slices[0][1]
    dr, dc = (float(v) for v in first.PixelSpacing)
    p0 = np.array([float(v) for v in first.ImagePositionPatient])
    p1 = np.array([float(v) for v in slices[-1][1].ImagePositionPatient])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dc, col * dr, (p1 - p0) / (len(slices) - 1), p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    # pixel_array is [row, column]; the volume's axes are (column, row, slice)
    data = np.stack([_pixels(path, name, ds).T for name, ds in slices], axis=-1)
    data = data.astype(np.float32) if data.dtype.kind == "f" else _narrow(data)
    return [ds for _, ds in slices], data, affine


def load_dicom(path) -> Volume:
    """A DICOM series (folder or .zip, one series) as a RAS `Volume`; `VolumeError` names the cause."""
    _, data, affine = read_series(path)
    ornt = nib.orientations.io_orientation(affine)
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    data = nib.orientations.apply_orientation(data, ornt)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(np.ascontiguousarray(data), affine, spacing, str(path))


def _narrow(data: np.ndarray) -> np.ndarray:
    for dt in (np.int16, np.int32):
        if data.min() >= np.iinfo(dt).min and data.max() <= np.iinfo(dt).max:
            return data.astype(dt)
    return data


def load_volume(path, channel: int | None = None) -> Volume:
    """An image volume from a NIfTI file, a DICOM series folder or a .zip of one."""
    return load_dicom(path) if is_series(path) else load_nifti(path, channel)


def load_pair(image_path, label_path, channel: int | None = None, affine_atol: float = 1e-3):
    """`nifti.load_pair` for an image that is a NIfTI file or a DICOM series; the label map is a NIfTI
    on the image's grid (shape and RAS affine within `affine_atol` mm)."""
    if not is_series(image_path):
        return load_nifti_pair(image_path, label_path, channel, affine_atol)
    image = load_dicom(image_path)
    label = load_nifti(label_path, is_label=True)
    if image.data.shape != label.data.shape:
        raise VolumeError(
            f"image/label shape mismatch: {image_path} {image.data.shape}, {label_path} {label.data.shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=affine_atol):
        raise VolumeError(
            f"image/label affine mismatch: {image_path} vs {label_path} (max difference "
            f"{np.abs(image.affine - label.affine).max():.4g} mm)"
        )
    return image, label
