"""Builds the slice cache of one or more NIfTI datasets.

  python -m safeclick_jax.data.prepare --root DATASET_DIR [--root ...] --out CACHE_DIR [--strict]

Writes (so an epoch never decodes NIfTI again):
  CACHE_DIR/volumes/NNNNN_image.npy  uint8  [num_slices, H, W]  [0, 1] intensities x 255
  CACHE_DIR/volumes/NNNNN_label.npy  uint8/uint16 [num_slices, H, W]  label values
  CACHE_DIR/volumes.json             one entry per usable volume (paths, split, shapes, spacing)
  CACHE_DIR/rois.npy                 structured array, roi_index.ROI_DTYPE, one row per ROI
  CACHE_DIR/summary.json             volumes_ok, failed, splits, rois_total, config, timing

Exit codes: 0 done (failed volumes are listed in summary.json); 1 `--strict` and some volume
failed; 2 no usable volume (or no ROI at all), or the dataset itself is unreadable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from safeclick_jax.data import default_data_config, dicom, layouts, nifti, preprocess, roi_index

CACHE_FILES = ("volumes.json", "rois.npy", "summary.json")
SUMMARY_VERSION = 1


def _options(cfg) -> dict:
    """The preprocessing settings that define a cache (stored in summary.json)."""
    spacing = cfg.target_spacing
    if spacing not in (None, "none", "min"):
        spacing = float(spacing)
    return {
        "axis": preprocess.axis_index(cfg.axis),
        "min_roi_area": int(cfg.min_roi_area),
        "normalization": str(cfg.normalization),
        "percentiles": [float(p) for p in cfg.percentiles],
        "ct_window": [float(v) for v in cfg.ct_window],
        "target_spacing": spacing,
        "channel": cfg.channel,
        "modality": cfg.modality,
        "split_seed": int(cfg.split_seed),
        "split_ratios": [float(r) for r in cfg.split_ratios],
    }


def process_case(case: layouts.Case, index: int, out_dir: str, opts: dict) -> dict:
    """Loads, checks, preprocesses and writes one volume. Never raises for a bad volume:
    returns {'ok': False, 'reason': ...} instead, so one bad file cannot stop the run."""
    t0 = time.perf_counter()
    base = {"image": case.image, "label": case.label, "dataset": case.dataset, "index": index}
    if case.problem:
        return {**base, "ok": False, "reason": case.problem}
    try:
        image, label = dicom.load_pair(case.image, case.label, case.channel)
        mode = preprocess.resolve_mode(opts["normalization"], case.modality, image.data)
        img01 = preprocess.normalize_intensity(image.data, mode, opts["percentiles"], opts["ct_window"])
        target = preprocess.target_spacing_for(image.spacing, opts["target_spacing"])
        img01 = preprocess.resample(img01, image.spacing, target, order=1)
        lab = preprocess.resample(label.data, image.spacing, target, order=0)
        axis = opts["axis"]
        img_slices = preprocess.to_slices(preprocess.to_uint8(img01), axis)
        lab_slices = preprocess.to_slices(lab, axis)
        rois = roi_index.find_rois(lab_slices, opts["min_roi_area"])
    except nifti.VolumeError as e:
        return {**base, "ok": False, "reason": str(e)}
    except Exception as e:  # an unexpected failure is still one volume's failure, with its cause
        return {**base, "ok": False, "reason": f"{case.image}: {type(e).__name__}: {e}"}

    vol_dir = Path(out_dir) / "volumes"
    image_file = f"volumes/{index:05d}_image.npy"
    label_file = f"volumes/{index:05d}_label.npy"
    np.save(vol_dir / f"{index:05d}_image.npy", img_slices)
    np.save(vol_dir / f"{index:05d}_label.npy", lab_slices)
    spacing = (target,) * 3 if target is not None else image.spacing
    return {
        **base,
        "ok": True,
        "image_file": image_file,
        "label_file": label_file,
        "orig_shape": list(image.data.shape),
        "orig_spacing": list(image.spacing),
        "spacing": [float(s) for s in spacing],
        "slices_shape": list(img_slices.shape),
        "normalization": mode,
        "modality": case.modality,
        "affine_ras": image.affine.tolist(),
        "rois": rois,
        "seconds": time.perf_counter() - t0,
    }


def _clear_cache(out: Path):
    """Removes a previous cache's files (only ours) so stale volumes cannot leak into a new index."""
    if (out / "volumes").is_dir():
        shutil.rmtree(out / "volumes")
    for name in CACHE_FILES:
        if (out / name).exists():
            (out / name).unlink()


def prepare_dataset(roots, out, cfg=None, workers: int = 1, progress: bool = True) -> dict:
    """Builds the cache in `out` and returns the summary dict (also written to summary.json).

    Raises layouts.DatasetError when a root itself cannot be read.
    """
    cfg = cfg or default_data_config()
    opts = _options(cfg)
    roots = [str(Path(r).resolve()) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    t0 = time.perf_counter()

    cases = []
    for root in roots:
        cases += layouts.discover(root, cfg.channel, cfg.modality)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_cache(out)
    (out / "volumes").mkdir()

    results = []
    bar = _progress_bar(len(cases), progress)
    if workers <= 1:
        for i, case in enumerate(cases):
            results.append(process_case(case, i, str(out), opts))
            _report(bar, results[-1])
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(process_case, c, i, str(out), opts) for i, c in enumerate(cases)]
            for f in concurrent.futures.as_completed(futures):
                results.append(f.result())
                _report(bar, results[-1])
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r["index"])

    ok = [r for r in results if r["ok"]]
    failed = [{"image": r["image"], "label": r["label"], "reason": r["reason"]} for r in results if not r["ok"]]

    # Split per dataset root (the paper splits each dataset 7:1:2), by volume.
    split_of = {}
    for root in roots:
        keys = [r["image"] for r in ok if r["dataset"] == root]
        split_of.update(roi_index.split_volumes(keys, opts["split_seed"], opts["split_ratios"]))

    volumes, rows = [], []
    splits = {name: {"volumes": [], "rois": 0} for name in roi_index.SPLITS}
    for vid, r in enumerate(ok):
        split = split_of[r["image"]]
        entry = {
            k: r[k]
            for k in (
                "image",
                "label",
                "dataset",
                "image_file",
                "label_file",
                "orig_shape",
                "orig_spacing",
                "spacing",
                "slices_shape",
                "normalization",
                "modality",
                "affine_ras",
            )
        }
        entry.update(id=vid, split=split, num_rois=len(r["rois"]))
        volumes.append(entry)
        splits[split]["volumes"].append(r["image"])
        splits[split]["rois"] += len(r["rois"])
        for slice_idx, value, area in r["rois"]:
            rows.append((len(rows), vid, slice_idx, value, area, roi_index.SPLIT_CODE[split]))
    rois = np.array(rows, dtype=roi_index.ROI_DTYPE)
    np.save(out / "rois.npy", rois)
    (out / "volumes.json").write_text(json.dumps(volumes, indent=1))

    elapsed = time.perf_counter() - t0
    summary = {
        "version": SUMMARY_VERSION,
        "roots": roots,
        "volumes_total": len(cases),
        "volumes_ok": len(ok),
        "failed": failed,
        "splits": splits,
        "rois_total": int(len(rois)),
        "volumes_without_rois": [r["image"] for r in ok if not r["rois"]],
        "rois_per_label": (
            {str(int(v)): int(n) for v, n in zip(*np.unique(rois["label"], return_counts=True))} if len(rois) else {}
        ),
        "config": opts,
        "elapsed_s": round(elapsed, 3),
        "rois_per_s": round(len(rois) / elapsed, 2) if elapsed > 0 else None,
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    return summary


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="prepare", unit="vol", file=sys.stderr)


def _report(bar, result: dict):
    if bar is None:
        return
    if not result["ok"]:
        bar.write(f"FAILED {result['image'] or result['label']}: {result['reason']}", file=sys.stderr)
    bar.update(1)


def _spacing_arg(text: str):
    return text if text in ("min", "none") else float(text)


def main(argv=None) -> int:
    d = default_data_config()
    p = argparse.ArgumentParser(
        prog="python -m safeclick_jax.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--root",
        action="append",
        required=True,
        help="dataset folder (MSD layout with dataset.json, or plain image/label pairs); repeatable",
    )
    p.add_argument("--out", required=True, help="cache folder to (re)build")
    p.add_argument("--strict", action="store_true", help="exit 1 when any volume failed")
    p.add_argument("--axis", default=str(d.axis), help="0/sagittal, 1/coronal, 2/axial (RAS axes)")
    p.add_argument("--min-roi-area", type=int, default=d.min_roi_area)
    p.add_argument("--normalization", choices=["auto", "percentile", "ct_window"], default=d.normalization)
    p.add_argument("--percentiles", type=float, nargs=2, default=list(d.percentiles), metavar=("LO", "HI"))
    p.add_argument("--ct-window", type=float, nargs=2, default=list(d.ct_window), metavar=("LEVEL", "WIDTH"))
    p.add_argument(
        "--target-spacing",
        type=_spacing_arg,
        default=d.target_spacing,
        help="isotropic spacing in mm, 'min' (finest spacing of each volume) or 'none'",
    )
    p.add_argument("--channel", type=int, default=None, help="channel of 4D multi-modality images")
    p.add_argument("--modality", default=None, help="e.g. CT (overrides dataset.json's modality)")
    p.add_argument("--seed", type=int, default=d.split_seed, help="split seed")
    p.add_argument("--workers", type=int, default=1, help="processes (one volume each)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    cfg = default_data_config()
    cfg.axis = a.axis
    cfg.min_roi_area = a.min_roi_area
    cfg.normalization = a.normalization
    cfg.percentiles = tuple(a.percentiles)
    cfg.ct_window = tuple(a.ct_window)
    cfg.target_spacing = a.target_spacing
    cfg.channel = a.channel
    cfg.modality = a.modality
    cfg.split_seed = a.seed
    try:
        preprocess.axis_index(cfg.axis)
        summary = prepare_dataset(a.root, a.out, cfg, workers=a.workers, progress=not a.quiet)
    except (layouts.DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    n_fail = len(summary["failed"])
    print(
        f"{summary['volumes_ok']} volumes ok, {n_fail} failed, {summary['rois_total']} ROIs "
        + ", ".join(f"{k} {v['rois']}" for k, v in summary["splits"].items())
        + f"; {summary['elapsed_s']:.1f} s; summary: {Path(a.out) / 'summary.json'}"
    )
    for f in summary["failed"]:
        print(f"  failed: {f['image'] or f['label']}: {f['reason']}", file=sys.stderr)
    if summary["volumes_ok"] == 0:
        print(
            f"error: no usable volume in {', '.join(a.root)} ({n_fail} failed, see {Path(a.out) / 'summary.json'})",
            file=sys.stderr,
        )
        return 2
    if summary["rois_total"] == 0:
        print(f"error: no ROI of at least {cfg.min_roi_area} pixels in {', '.join(a.root)}", file=sys.stderr)
        return 2
    if a.strict and n_fail:
        print(f"error: --strict and {n_fail} volume(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
