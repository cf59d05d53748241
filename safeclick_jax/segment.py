"""Segment structures through a NIfTI volume from clicks, boxes or an existing label map.

    python -m safeclick_jax.segment --image IN.nii.gz --checkpoint DIR --out OUT.nii.gz \\
        [--point X,Y,Z[,L][@ID] ...] [--box U0,V0,U1,V1,S[@ID] ...] [--init-labels LABELS.nii.gz] \\
        [--world] [--axis 2] [--label 1]

Coordinates are voxel indices of the input file (0-based, as in ITK-SNAP's or nibabel's array
order), or with `--world` world millimetres (RAS+, as the file's affine maps voxels; rounded to the
nearest voxel). `--point X,Y,Z[,L]`: a click at (X, Y, Z), L = 1 foreground (default) or 0
background; several points may lie on several slices. `--box U0,V0,U1,V1,S`: a box on slice S of
the slicing axis, U and V being the two other voxel axes in increasing order (for the default
--axis 2: X0,Y0,X1,Y1,Z). A suffix `@ID` names the object (structure) a prompt belongs to, 1..255
(default 1). `--init-labels`: a label map on the same grid (shape and affine) to start from; each
label is an object, prompted with its largest slice as a mask (clicks and boxes then refine it).
SAM 2's memory then propagates every object through the volume (safeclick_jax.volume_predictor).

The output has the input's voxel grid, affine and orientation (header copied): one label map,
values = object ids (uint8; where objects overlap, the one with the highest logit). `--label V`
writes V instead of 1 when object 1 is the only one. Any orientation, anisotropic spacing,
integer or float input; a 4D file needs --volume-index. Exit status 2 with a message for
unusable input.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import nibabel as nib
import numpy as np

from safeclick_jax import compile_cache
from safeclick_jax.data.nifti import VolumeError
from safeclick_jax.data.preprocess import NORMALIZATIONS

MAX_ID = 255


def _numbers(text: str, n: tuple[int, ...], what: str) -> tuple[list[float], int]:
    body, _, oid = text.partition("@")
    try:
        vals = [float(v) for v in body.split(",")]
    except ValueError:
        vals = None
    if vals is None or len(vals) not in n or not np.isfinite(vals).all():
        forms = " or ".join(f"{k} comma-separated numbers" for k in n)
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {forms}, optionally followed by @ID")
    obj = 1
    if oid:
        if not oid.isdigit() or not 1 <= int(oid) <= MAX_ID:
            raise argparse.ArgumentTypeError(f"{what} {text!r}: the object id after @ must be in 1..{MAX_ID}")
        obj = int(oid)
    return vals, obj


def parse_point(text: str):
    return _numbers(text, (3, 4), "--point")


def parse_box(text: str):
    return _numbers(text, (5,), "--box")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m safeclick_jax.segment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True, help="input NIfTI (.nii / .nii.gz)")
    p.add_argument("--checkpoint", required=True, help="model directory (convert.sam2_to_flax or a training export)")
    p.add_argument(
        "--memory-checkpoint",
        default=None,
        help="model directory to take SAM 2's memory path from, when --checkpoint has none",
    )
    p.add_argument("--out", required=True, help="output NIfTI label map")
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


def world_to_voxel(affine, xyz) -> list[float]:
    """World millimetres (RAS+) -> the nearest voxel index of the file."""
    ijk = np.linalg.solve(np.asarray(affine, np.float64), np.append(np.asarray(xyz, np.float64), 1.0))[:3]
    return np.round(ijk).tolist()


def prompts_by_slice(predictor, points=None, boxes=None, axis: int = 2) -> dict:
    """Voxel-space prompts [(values, obj_id), ...] -> {(obj_id, slice): {"points": [...],
    "labels": [...], "box": ...}} on the predictor's slice images."""
    out = defaultdict(lambda: {"points": [], "labels": [], "box": None})
    for pt, obj in points or []:
        if len(pt) == 4 and pt[3] not in (0, 1):
            raise ValueError(f"--point {pt}: the label (4th value) must be 0 or 1")
        s, x, y = predictor.voxel_to_slice(pt[:3])
        out[obj, s]["points"].append((x, y))
        out[obj, s]["labels"].append(int(pt[3]) if len(pt) == 4 else 1)
    for box, obj in boxes or []:
        u0, v0, u1, v1, s = box
        if u1 < u0 or v1 < v0:
            raise ValueError(f"--box {box}: needs U1 >= U0 and V1 >= V0")
        inplane = [a for a in range(3) if a != axis]
        corners = []
        for u, v in ((u0, v0), (u1, v1)):
            ijk = [0.0] * 3
            ijk[axis], ijk[inplane[0]], ijk[inplane[1]] = s, u, v
            corners.append(predictor.voxel_to_slice(ijk))
        (s0, xa, ya), (_, xb, yb) = corners
        if out[obj, s0]["box"] is not None:
            raise ValueError(f"--box {box}: object {obj} has a second box on slice {s0:g}")
        out[obj, s0]["box"] = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
    return dict(out)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    compile_cache.enable(a.compilation_cache)
    try:
        from safeclick_jax.data.preprocess import axis_index

        if not (a.point or a.box or a.init_labels):
            raise ValueError("give --point, --box or --init-labels")
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
        from safeclick_jax.volume_predictor import VolumePredictor, volume_shape

        img, shape = volume_shape(a.image, a.volume_index)  # checks before the model loads
        points = []
        for pt, obj in a.point or []:
            ijk = world_to_voxel(img.affine, pt[:3]) if a.world else pt[:3]
            if any(not 0 <= v <= n - 1 for v, n in zip(ijk, shape)):
                where = f" = voxel {[int(v) for v in ijk]}" if a.world else ""
                raise ValueError(
                    f"--point {','.join(f'{v:g}' for v in pt)}{where} lies outside the volume "
                    f"(voxel indices 0..n-1 of shape {shape})"
                )
            points.append((list(ijk) + pt[3:], obj))
        if a.init_labels:
            lab = nib.load(a.init_labels)
            if tuple(lab.shape[:3]) != shape or any(n != 1 for n in lab.shape[3:]):
                raise ValueError(f"--init-labels {a.init_labels}: shape {lab.shape} differs from the image's {shape}")
            if not np.allclose(lab.affine, img.affine, atol=1e-4):
                raise ValueError(f"--init-labels {a.init_labels}: its affine differs from the image's")
        predictor = VolumePredictor.from_checkpoint(a.checkpoint, memory_checkpoint=a.memory_checkpoint)
        predictor.set_volume(
            a.image, axis=axis, volume_index=a.volume_index, normalization=a.normalization, ct_window=ct_window
        )
        if a.init_labels:
            predictor.set_labels(a.init_labels)
        prompts = prompts_by_slice(predictor, points, a.box, axis)
        for (obj, s), pr in sorted(prompts.items()):
            predictor.add_prompt(s, points=pr["points"] or None, labels=pr["labels"] or None, box=pr["box"], obj_id=obj)
        labels = predictor.propagate(progress=_progress)
    except (VolumeError, ValueError, FileNotFoundError, RuntimeError) as e:
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
    return 0


def _progress(done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"\rpropagating: {done}/{total} slices", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from safeclick_jax.host_memory import use_huge_pages

    use_huge_pages()  # re-executes once with huge-page malloc (safeclick_jax/host_memory.py)
    sys.exit(main())
