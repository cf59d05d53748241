"""Segment a structure through a NIfTI volume from a click or a box on one slice.

    python -m safeclick_jax.segment --image IN.nii.gz --checkpoint DIR --out OUT.nii.gz \\
        (--point X,Y,Z [--point X,Y,Z,0 ...] | --box X0,Y0,X1,Y1,Z) [--axis 2] [--label 1]

Coordinates are voxel indices of the input file (0-based, as in ITK-SNAP's or nibabel's array
order). `--point X,Y,Z[,L]`: a click at voxel (X, Y, Z), L = 1 foreground (default) or 0
background; several points may lie on several slices. `--box U0,V0,U1,V1,S`: a box on slice S
of the slicing axis, U and V being the two other voxel axes in increasing order (for the
default --axis 2: X0,Y0,X1,Y1,Z). SAM 2's memory then propagates the mask through the volume
(safeclick_jax.volume_predictor).

The output has the input's voxel grid, affine and orientation (header copied), uint8 0/1, or
the value of --label. Any orientation, anisotropic spacing, integer or float input; a 4D file
needs --volume-index. Exit status 2 with a message for unusable input.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import nibabel as nib
import numpy as np

from safeclick_jax.data.nifti import VolumeError


def _numbers(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = None
    if vals is None or len(vals) not in n:
        forms = " or ".join(f"{k} comma-separated numbers" for k in n)
        raise argparse.ArgumentTypeError(f"{what} {text!r}: expected {forms}")
    return vals


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
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--point", type=parse_point, action="append", metavar="X,Y,Z[,L]")
    g.add_argument("--box", type=parse_box, metavar="U0,V0,U1,V1,S")
    p.add_argument("--axis", default="2", help="slicing axis of the input's voxel grid: 0, 1 or 2 (default 2)")
    p.add_argument("--label", type=int, default=1, help="value written for the structure (default 1)")
    p.add_argument("--volume-index", type=int, default=None, help="volume of a 4D file to segment")
    p.add_argument(
        "--normalization",
        default="percentile",
        choices=["percentile", "ct_window"],
        help="intensity normalisation to [0,1] (default: 0.5-99.5 percentile clipping)",
    )
    p.add_argument("--ct-window", default="40,400", help="level,width in HU for --normalization ct_window")
    return p


def prompts_by_slice(predictor, points=None, box=None, axis: int = 2) -> dict:
    """Voxel-space prompts -> {slice: {"points": [...], "labels": [...], "box": ...}} on the
    predictor's slice images."""
    out = defaultdict(lambda: {"points": [], "labels": [], "box": None})
    for pt in points or []:
        if len(pt) == 4 and pt[3] not in (0, 1):
            raise ValueError(f"--point {pt}: the label (4th value) must be 0 or 1")
        s, x, y = predictor.voxel_to_slice(pt[:3])
        out[s]["points"].append((x, y))
        out[s]["labels"].append(int(pt[3]) if len(pt) == 4 else 1)
    if box is not None:
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
        out[s0]["box"] = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
    return dict(out)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        from safeclick_jax.data.preprocess import axis_index

        axis = axis_index(a.axis)
        if not 0 < a.label <= 65535:
            raise ValueError(f"--label {a.label}: must be in 1..65535")
        ct_window = tuple(float(v) for v in a.ct_window.split(","))
        if len(ct_window) != 2:
            raise ValueError(f"--ct-window {a.ct_window!r}: expected level,width")
        from safeclick_jax.volume_predictor import VolumePredictor, volume_shape

        img, shape = volume_shape(a.image, a.volume_index)  # checks before the model loads
        for pt in a.point or []:
            if any(not 0 <= v <= n - 1 for v, n in zip(pt[:3], shape)):
                raise ValueError(
                    f"--point {','.join(f'{v:g}' for v in pt)} lies outside the volume "
                    f"(voxel indices 0..n-1 of shape {shape})"
                )
        predictor = VolumePredictor.from_checkpoint(a.checkpoint, memory_checkpoint=a.memory_checkpoint)
        predictor.set_volume(
            a.image, axis=axis, volume_index=a.volume_index, normalization=a.normalization, ct_window=ct_window
        )
        prompts = prompts_by_slice(predictor, a.point, a.box, axis)
        for s, pr in sorted(prompts.items()):
            predictor.add_prompt(s, points=pr["points"] or None, labels=pr["labels"] or None, box=pr["box"])
        labels = predictor.propagate(progress=_progress)
    except (VolumeError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    dtype = np.uint8 if a.label <= 255 else np.uint16
    out = (labels * a.label).astype(dtype)
    header = img.header.copy()
    header.set_data_dtype(dtype)
    result = type(img)(out, img.affine, header=header)
    result.header.set_slope_inter(1, 0)
    result.header.set_xyzt_units(*img.header.get_xyzt_units())
    nib.save(result, a.out)
    print(f"\nwrote {a.out}: {int(labels.sum())} voxels labelled {a.label}, shape {out.shape}")
    return 0


def _progress(done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"\rpropagating: {done}/{total} slices", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from safeclick_jax.host_memory import use_huge_pages

    use_huge_pages()  # re-executes once with huge-page malloc (safeclick_jax/host_memory.py)
    sys.exit(main())
