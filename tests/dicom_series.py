"""DICOM series written with pydicom from a known volume and geometry, for the reader's tests and
the segment / app tests: CT Image Storage, one file per slice, 16-bit signed stored values."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation about x, then y, then z (degrees): an oblique slice plane."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ds(v) -> str:
    """A DS value (at most 16 characters) that reads back as exactly the float the test expects."""
    return f"{v:.10f}".rstrip("0").rstrip(".")[:16]


def series_geometry(row, col, step, spacing_rc, origin):
    """Rounds the geometry to what DICOM's decimal strings hold, so written == expected."""
    rnd = lambda v: np.array([float(_ds(x)) for x in np.atleast_1d(v)])  # noqa: E731
    return rnd(row), rnd(col), np.asarray(step, float), rnd(spacing_rc), rnd(origin)


def expected_volume(stored, slope, intercept, row, col, step, spacing_rc, origin):
    """The known volume in the project's convention: values rescaled, axes (column, row, slice)
    mapped to LPS by the DICOM geometry, LPS -> RAS, then reoriented to RAS like load_nifti."""
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * spacing_rc[1], col * spacing_rc[0], step, origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    data = stored.astype(np.float64) * slope + intercept
    ornt = nib.orientations.io_orientation(affine)
    out_affine = affine @ nib.orientations.inv_ornt_aff(ornt, stored.shape)
    return nib.orientations.apply_orientation(data, ornt), out_affine


def write_series(
    folder,
    stored: np.ndarray,
    row,
    col,
    step,
    spacing_rc,
    origin,
    slope: float = 1.0,
    intercept: float = 0.0,
    seed: int = 0,
    series_uid: str | None = None,
    description: str = "test series",
) -> list[str]:
    """Writes stored[:, :, k] (axes: column, row) as slice k at origin + k * step, under shuffled
    random file names. Returns the file paths in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    ncol, nrow, nslices = stored.shape
    names = [f"{rng.integers(1 << 40):011x}" for _ in range(nslices)]
    paths = []
    for k in range(nslices):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.PatientName, ds.PatientID, ds.Modality = "Test^Phantom", "0", "CT"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.StudyID, ds.AccessionNumber = "1", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.SeriesDescription = "20260101", "120000", description
        ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = 1, 1, int(rng.integers(1, 10_000))
        ds.ImagePositionPatient = [_ds(v) for v in np.asarray(origin) + k * np.asarray(step)]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
        ds.PixelSpacing = [_ds(v) for v in spacing_rc]
        ds.SliceThickness = _ds(float(np.linalg.norm(step)))
        ds.Rows, ds.Columns = nrow, ncol
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<i2").tobytes()
        path = os.path.join(folder, names[k])
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom(shape=(24, 20, 12), seed: int = 0) -> np.ndarray:
    """Stored values with structure along every axis (a ramp plus noise), so any flip shows."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (10 * i + 100 * j + 1000 * k + rng.integers(0, 7, shape)).astype(np.int16)
