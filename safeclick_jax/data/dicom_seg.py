"""A label map as a DICOM Segmentation (SEG) that references its source series, written with
highdicom (optional: `pip install highdicom`).

The label map is on the series' own grid, (column, row, slice in position order): the input grid
of `dicom.load_dicom(series)`, on which `segment` writes its NIfTI. One frame per source slice,
each object id one segment ("object <id>").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safeclick_jax.data import dicom
from safeclick_jax.data.nifti import VolumeError


def write_seg(labels: np.ndarray, series, out, software_version: str = "safeclick-jax") -> int:
    """Writes `out` (a DICOM SEG file) for `series` (folder or zip); returns the number of segments."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as e:
        raise VolumeError(f"{out}: writing DICOM SEG needs highdicom (pip install highdicom): {e}") from None
    datasets, data, _ = dicom.read_series(series)
    labels = np.asarray(labels)
    if labels.shape != data.shape:
        raise VolumeError(f"{out}: label map of shape {labels.shape} is not on the grid {data.shape} of {series}")
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
