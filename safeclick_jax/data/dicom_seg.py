"""A label map as a DICOM Segmentation (SEG) that references its source series, written with
highdicom (optional: `pip install highdicom`).

The label map is on the RAS grid of `dicom.load_dicom(series)` (what `segment` writes as NIfTI);
it is put back on the series' (column, row, slice) grid, one frame per source slice, each object id
one segment ("object <id>").
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from safeclick_jax.data import dicom
from safeclick_jax.data.nifti import VolumeError


def to_series_grid(labels_ras: np.ndarray, series_affine: np.ndarray) -> np.ndarray:
    """Inverse of load_dicom's reorientation: a RAS-ordered array back to (column, row, slice)."""
    ornt = nib.orientations.io_orientation(series_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return nib.orientations.apply_orientation(labels_ras, back)


def write_seg(labels_ras: np.ndarray, series, out, software_version: str = "safeclick-jax") -> int:
    """Writes `out` (a DICOM SEG file) for `series` (folder or zip); returns the number of segments."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as e:
        raise VolumeError(f"{out}: writing DICOM SEG needs highdicom (pip install highdicom): {e}") from None
    datasets, data, affine = dicom.read_series(series)
    labels = to_series_grid(np.asarray(labels_ras), affine)
    if labels.shape != data.shape:
        raise VolumeError(f"{out}: label map of shape {labels_ras.shape} is not on the grid of {series}")
    ids = [int(i) for i in np.unique(labels) if i > 0]
    if not ids:
        raise VolumeError(f"{out}: the label map is empty; a DICOM SEG needs at least one segment")
    # highdicom numbers segments 1..n: object ids map onto them in increasing order
    relabel = np.zeros(int(labels.max()) + 1, np.uint8)
    relabel[ids] = np.arange(1, len(ids) + 1)
    frames = relabel[labels.astype(np.int64)].transpose(2, 1, 0)  # (slice, row, column)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="safeclick-jax", version=software_version, family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"object {i}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, i in enumerate(ids, start=1)
    ]
    try:
        seg = _segmentation(hd, datasets, frames, segments, software_version)
    except (AttributeError, ValueError, TypeError) as e:  # e.g. a source without a required attribute
        raise VolumeError(f"{out}: highdicom cannot write a SEG for {series}: {e}") from None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return len(ids)


def _segmentation(hd, datasets, frames, segments, software_version):
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="safeclick-jax",
        manufacturer_model_name="SAM 2 + SafeClick",
        software_versions=software_version,
        device_serial_number="0",
        omit_empty_frames=False,
    )
