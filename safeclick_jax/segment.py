"""Segment structures through a NIfTI volume or a DICOM series from clicks, boxes or an existing
label map.

    python -m safeclick_jax.segment --image IN.nii.gz --checkpoint DIR --out OUT.nii.gz \\
        [--point X,Y,Z[,L][@ID] ...] [--box U0,V0,U1,V1,S[@ID] ...] [--init-labels LABELS.nii.gz] \\
        [--world] [--axis 2] [--label 1]
    python -m safeclick_jax.segment --image SERIES_DIR_OR_ZIP ... --out OUT.nii.gz [--out-seg OUT.dcm]

Coordinates are voxel indices of the input file (0-based integers, as in ITK-SNAP's or nibabel's
array order; 1.5, NaN or Inf is refused), or with `--world` world millimetres (RAS+, as the file's
affine maps voxels; rounded to the nearest voxel; negative values as typed: `--point -95.2,40.1,12`
or `--point=-95.2,40.1,12`). `--point X,Y,Z[,L]`: a click at (X, Y, Z), L = 1 foreground (default)
or 0 background; several points may lie on several slices. `--box U0,V0,U1,V1,S`: a box on slice S of
the slicing axis, U and V being the two other voxel axes in increasing order (for the default
--axis 2: X0,Y0,X1,Y1,Z). A suffix `@ID` names the object (structure) a prompt belongs to, 1..255
(default 1). `--init-labels`: a label map on the same grid (shape and affine) to start from; each
label is an object, prompted with its largest slice as a mask (clicks and boxes then refine it).
SAM 2's memory then propagates every object through the volume (safeclick_jax.inference).

The output has the input's voxel grid, affine and orientation (header copied): one label map,
values = object ids (uint8; where objects overlap, the one with the highest logit). `--label V`
writes V instead of 1 when object 1 is the only one. Any orientation, anisotropic spacing,
integer or float input; a 4D file needs --volume-index. Exit status 2 with a message for
unusable input.

A DICOM series (a folder of one series' files, or a .zip of one; safeclick_jax/data/dicom.py) has
the voxel grid (column, row, slice number with slices in position order), the affine from its
positions and orientation converted to RAS; the output NIfTI is on that grid. `--out-seg` also
writes a DICOM SEG referencing the series (highdicom).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
from collections import defaultdict

import nibabel as nib
import numpy as np

from safeclick_jax import compile_cache
from safeclick_jax.data.nifti import VolumeError
from safeclick_jax.data.preprocess import NORMALIZATIONS
from safeclick_jax.inference.limits import MAX_OBJECT_ID

NUMERIC_OPTIONS = ("--point", "--box", "--ct-window")  # values that may start with a minus sign


def _numbers(text: str, n: tuple[int, ...], what: str) -> tuple[list[float], int]:
    body, _, oid = text.partition("@")
    forms = " or ".join(f"{k} comma-separated numbers" for k in n)
    vals = []
    for v in body.split(","):
        try:
            vals.append(float(v))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} {text!r}: {v.strip()!r} is not a number; expected {forms}, optionally followed by @ID"
            ) from None
        if not math.isfinite(vals[-1]):
            raise argparse.ArgumentTypeError(f"{what} {text!r}: {v.strip()} is not a finite number")
    if len(vals) not in n:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {forms}, optionally followed by @ID")
    obj = 1
    if oid:
        if not oid.isdigit() or not 1 <= int(oid) <= MAX_OBJECT_ID:
            raise argparse.ArgumentTypeError(f"{what} {text!r}: the object id after @ must be in 1..{MAX_OBJECT_ID}")
        obj = int(oid)
    return vals, obj


def parse_point(text: str):
    return _numbers(text, (3, 4), "--point")


def parse_box(text: str):
    return _numbers(text, (5,), "--box")


def attach_negative_values(argv: list[str]) -> list[str]:
    """`--point -95.2,40.1,12` -> `--point=-95.2,40.1,12`: argparse reads a value that starts with
    a minus sign and is not a plain number as an option; world coordinates and CT windows are often
    negative."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in NUMERIC_OPTIONS and i + 1 < len(argv) and re.match(r"-[0-9.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m safeclick_jax.segment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True, help="input NIfTI (.nii / .nii.gz), DICOM series folder or .zip")
    p.add_argument("--checkpoint", required=True, help="model directory (convert.sam2_to_flax or a training export)")
    p.add_argument(
        "--memory-checkpoint",
        default=None,
        help="model directory to take SAM 2's memory path from, when --checkpoint has none",
    )
    p.add_argument("--out", required=True, help="output NIfTI label map")
    p.add_argument("--out-seg", default=None, help="also a DICOM SEG of the label map (DICOM series input only)")
    p.add_argument("--point", type=parse_point, action="append", metavar="X,Y,Z[,L][@ID]")
    p.add_argument("--box", type=parse_box, action="append", metavar="U0,V0,U1,V1,S[@ID]")
    p.add_argument("--init-labels", default=None, help="NIfTI label map on the input's grid to start from")
    p.add_argument("--world", action="store_true", help="--point coordinates are world millimetres (RAS+)")
    p.add_argument("--axis", default="2", help="slicing axis of the input's voxel grid: 0, 1 or 2 (default 2)")
    p.add_argument("--label", type=int, default=None, help="value written for object 1 when it is the only object")
    p.add_argument("--volume-index", type=int, default=None, help="volume of a 4D file to segment")
    p.add_argument(
        "--normalization",
        default="auto",
        choices=NORMALIZATIONS,
        help="intensity mapping to [0,1]: auto (default) = the model's training data's when its model.json "
        "records it, else the CT window for a volume in Hounsfield units and 0.5-99.5 percentile clipping otherwise",
    )
    p.add_argument("--ct-window", default=None, help="level,width in HU for the CT window (default 40,400)")
    p.add_argument(
        "--compilation-cache",
        default=compile_cache.DEFAULT_DIR,
        help="folder of JAX's persistent compilation cache: the next run loads the compiled steps ('' disables)",
    )
    return p


def world_to_voxel(affine, xyz) -> list[int]:
    """World millimetres (RAS+) -> the nearest voxel index of the file."""
    ijk = np.linalg.solve(np.asarray(affine, np.float64), np.append(np.asarray(xyz, np.float64), 1.0))[:3]
    return [int(v) for v in np.round(ijk)]


def _show(vals) -> str:
    return ",".join(f"{v:g}" for v in vals)


def prompts_by_slice(geometry, points=None, boxes=None) -> dict:
    """Voxel-space prompts [(values, obj_id), ...] -> {(obj_id, slice): {"points": [...],
    "labels": [...], "box": ...}} on the slice images of `geometry` (inference.SliceGeometry)."""
    from safeclick_jax.inference.geometry import voxel_index

    out = defaultdict(lambda: {"points": [], "labels": [], "box": None})
    for pt, obj in points or []:
        if len(pt) == 4 and pt[3] not in (0, 1):
            raise ValueError(f"--point {_show(pt)}: the label (4th value) must be 0 or 1")
        ijk = voxel_index(pt[:3], geometry.input_shape, f"--point {_show(pt)}: voxel")
        s, x, y = geometry.voxel_to_slice(ijk)
        out[obj, s]["points"].append((x, y))
        out[obj, s]["labels"].append(int(pt[3]) if len(pt) == 4 else 1)
    for box, obj in boxes or []:
        u0, v0, u1, v1, s = box
        if u1 < u0 or v1 < v0:
            raise ValueError(f"--box {_show(box)}: needs U1 >= U0 and V1 >= V0")
        if s != round(s):
            raise ValueError(f"--box {_show(box)}: slice {s:g} is not an integer voxel index")
        try:
            s0, xy = geometry.box_to_slice([u0, v0, u1, v1], int(s))
        except ValueError as e:
            raise ValueError(f"--box {_show(box)}: {e}") from None
        if out[obj, s0]["box"] is not None:
            raise ValueError(f"--box {_show(box)}: object {obj} has a second box on slice {s0}")
        out[obj, s0]["box"] = tuple(xy)
    return dict(out)


def main(argv=None) -> int:
    a = build_parser().parse_args(attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    compile_cache.enable(a.compilation_cache)
    try:
        from safeclick_jax.data.preprocess import axis_index

        if not (a.point or a.box or a.init_labels):
            raise ValueError("give --point, --box or --init-labels")
        if a.out_seg is not None:
            from safeclick_jax.data import dicom

            if not dicom.is_series(a.image):
                raise ValueError(f"--out-seg: a DICOM SEG references a DICOM series; --image {a.image} is not one")
            if importlib.util.find_spec("highdicom") is None:
                raise ValueError("--out-seg needs highdicom (pip install highdicom)")
        axis = axis_index(a.axis)
        ids = {obj for _, obj in (a.point or []) + (a.box or [])}
        if a.label is not None:
            if not 0 < a.label <= 65535:
                raise ValueError(f"--label {a.label}: must be in 1..65535")
            if ids - {1} or a.init_labels:
                raise ValueError(f"--label {a.label}: applies to a single object 1; with several, the ids are written")
        ct_window = None
        if a.ct_window is not None:
            try:
                ct_window = tuple(float(v) for v in a.ct_window.split(","))
            except ValueError:
                ct_window = ()
            if len(ct_window) != 2 or not ct_window[1] > 0:
                raise ValueError(f"--ct-window {a.ct_window!r}: expected level,width with width > 0")
        from safeclick_jax.data.volume_file import read_label_map, read_volume
        from safeclick_jax.inference import SliceGeometry, VolumePredictor

        vol = read_volume(a.image, a.volume_index)  # every check of the input before the model loads
        img, shape = vol.image, vol.input_shape
        points = []
        for pt, obj in a.point or []:
            if a.world:
                ijk = world_to_voxel(img.affine, pt[:3])
                if any(not 0 <= v <= n - 1 for v, n in zip(ijk, shape)):
                    raise ValueError(
                        f"--point {_show(pt)} = voxel {ijk} lies outside the volume "
                        f"(voxel indices 0..n-1 of shape {shape})"
                    )
                pt = ijk + pt[3:]
            points.append((pt, obj))
        init = None
        if a.init_labels:
            try:
                init = read_label_map(a.init_labels, vol)
            except VolumeError as e:
                raise ValueError(f"--init-labels {e}") from None
        prompts = prompts_by_slice(SliceGeometry(vol.ornt, vol.data.shape, axis), points, a.box)
        predictor = VolumePredictor.from_checkpoint(a.checkpoint, memory_checkpoint=a.memory_checkpoint)
        predictor.set_volume(vol, axis=axis, normalization=a.normalization, ct_window=ct_window)
        if init is not None:
            predictor.set_labels(init)
        for (obj, s), pr in sorted(prompts.items()):
            predictor.add_prompt(s, points=pr["points"] or None, labels=pr["labels"] or None, box=pr["box"], obj_id=obj)
        labels = predictor.propagate(progress=_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    value = a.label or 1
    dtype = np.uint8 if value <= 255 else np.uint16
    out = labels.astype(dtype) * (dtype(value) if a.label else dtype(1))
    header = img.header.copy()
    header.set_data_dtype(dtype)
    result = type(img)(out, img.affine, header=header)
    result.header.set_slope_inter(1, 0)
    result.header.set_xyzt_units(*img.header.get_xyzt_units())
    nib.save(result, a.out)
    counts = ", ".join(f"{int(k)}: {int((labels == k).sum())}" for k in np.unique(labels) if k)
    print(f"\nwrote {a.out}: shape {out.shape}, voxels per object {{{counts or 'none'}}}")
    if a.out_seg is not None:
        from safeclick_jax.data.dicom_seg import write_seg

        try:
            n = write_seg(labels, a.image, a.out_seg)
        except VolumeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {a.out_seg}: DICOM SEG with {n} segment(s), referencing {a.image}")
    return 0


def _progress(done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"\rpropagating: {done}/{total} slices", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # re-executes once with the host allocator (safeclick_jax/host_memory.py)
    sys.exit(main())
