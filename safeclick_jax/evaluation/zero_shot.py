"""Zero-shot quality of a model on volumes it never saw: one click per object, then propagation.

  python -m safeclick_jax.evaluation.zero_shot --checkpoint workdir/standin/export --data abdomen
  python -m safeclick_jax.evaluation.zero_shot --checkpoint DIR --data procedural --out eval/zs

The protocol, per volume: each labelled object gets one positive click on its largest slice (the
slice with the most voxels of it; ties: the first), at its deepest point (the maximum of the 2D
Euclidean distance transform of its mask on that slice, the image border counting as boundary;
ties: the first in row-major order). All objects of the volume are objects of one session of the
volume engine (safeclick_jax/evaluation/volume_session.py), which propagates them through the
volume. Scores per object: the Dice of the clicked slice (2D) and of the whole volume (3D); the
table averages them per object kind (a label's name, or for the procedural data the shape kind
of `tube_2` etc., procedural.kind_of).

Data (`--data`):
  abdomen     the synthetic abdomen of `make train` (seed 0, 15 volumes), its test split;
  procedural  the pretraining generator at a seed pretraining does not use (seed 1, 8 volumes),
              every volume.
Both are generated and prepared when absent; `--root` / `--cache-dir` take another dataset.
Writes `zero_shot.csv` (one row per object: its click, its voxels and slices, the predicted voxels
and slices, both Dice) and `zero_shot.md` (the table) into --out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from safeclick_jax.data.clips import deepest_point
from safeclick_jax.data.procedural import kind_of
from safeclick_jax.evaluation import interactive


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: str
    cache_dir: str
    kind: str  # the generator: a key of safeclick_jax.data.SYNTHETIC_KINDS
    seed: int
    num_volumes: int
    split: str  # a split of the cache, or "all"


DATASETS = {
    "abdomen": Dataset("data/abdomen", "data/cache/abdomen", "abdomen", 0, 15, "test"),
    "procedural": Dataset("data/procedural_heldout", "data/cache/procedural_heldout", "procedural", 1, 8, "all"),
}
FIELDS = [
    "dataset",
    "case",
    "label",
    "name",
    "kind",
    "slice",
    "row",
    "col",
    "voxels",
    "pred_voxels",
    "slices",
    "pred_slices",
    "dice_2d",
    "dice_3d",
]


def ensure(ds: Dataset, log=print) -> None:
    """Generates (when the root is missing) and prepares (when the cache is missing) the dataset."""
    from safeclick_jax.data import default_data_config, prepare, write_synthetic

    if (Path(ds.cache_dir) / "rois.npy").exists():
        return
    if not Path(ds.root).exists():
        log(f"[zero-shot] generating the {ds.kind} data ({ds.num_volumes} volumes, seed {ds.seed}) in {ds.root}")
        write_synthetic(ds.kind, ds.root, ds.num_volumes, ds.seed)
    log(f"[zero-shot] preparing {ds.root} -> {ds.cache_dir}")
    prepare.prepare_dataset([ds.root], ds.cache_dir, default_data_config(), progress=False)


def load_cases(ds: Dataset, max_cases: int | None = None) -> list[interactive.Case]:
    splits = ("train", "val", "test") if ds.split == "all" else (ds.split,)
    cases = [c for s in splits for c in interactive.load_cases(ds.cache_dir, s)[0]]
    return cases[:max_cases] if max_cases else cases


def label_names(root) -> dict[int, str]:
    """Label value -> name from the dataset's dataset.json (MSD); {} for a plain folder."""
    meta = Path(root) / "dataset.json"
    if not meta.exists():
        return {}
    return {int(k): str(v) for k, v in json.loads(meta.read_text())["labels"].items()}


def deepest_click(mask: np.ndarray) -> tuple[int, int, int]:
    """(slice, row, col) of the click: the deepest point of the object's largest slice."""
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    col, row = deepest_point(mask[z])
    return z, int(row), int(col)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def run_case(model: interactive.InteractiveModel, case: interactive.Case, names: dict) -> list[dict]:
    """One session: a click on every object, one propagation; a row per object."""
    labels = interactive.present_labels(case)
    if not labels:
        return []
    session = model.factory(case, labels)
    clicks = {lab: deepest_click(case.labels == lab) for lab in labels}
    for lab, voxel in clicks.items():
        session.add_click(lab, voxel, True)
    pred = interactive.check_prediction(session.predict(), case)
    rows = []
    for lab, (z, row, col) in clicks.items():
        gt, got = case.labels == lab, pred == lab
        name = names.get(lab, str(lab))
        rows.append(
            {
                "dataset": case.dataset,
                "case": case.name,
                "label": lab,
                "name": name,
                "kind": kind_of(name),
                "slice": z,
                "row": row,
                "col": col,
                "voxels": int(gt.sum()),
                "pred_voxels": int(got.sum()),
                "slices": int(gt.any(axis=(1, 2)).sum()),
                "pred_slices": int(got.any(axis=(1, 2)).sum()),
                "dice_2d": dice(got[z], gt[z]),
                "dice_3d": dice(got, gt),
            }
        )
    return rows


def by_kind(rows: list[dict]) -> list[dict]:
    """Per object kind (in order of first appearance), then 'all': objects, mean 2D and 3D Dice."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["kind"], []).append(r)
    groups["all"] = rows
    return [
        {
            "kind": k,
            "objects": len(sel),
            "dice_2d": float(np.mean([r["dice_2d"] for r in sel])),
            "dice_3d": float(np.mean([r["dice_3d"] for r in sel])),
        }
        for k, sel in groups.items()
        if sel
    ]


def write(out, rows: list[dict], title: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "zero_shot.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    md = [
        f"# {title}",
        "",
        "One positive click per object at the deepest point of its largest slice, all objects of a volume in "
        "one session, then propagation through the volume. Dice per object, averaged per kind.",
        "",
        "| kind | objects | 2D Dice (clicked slice) | 3D Dice |",
        "|---|---:|---:|---:|",
    ]
    md += [f"| {s['kind']} | {s['objects']} | {s['dice_2d']:.3f} | {s['dice_3d']:.3f} |" for s in by_kind(rows)]
    (out / "zero_shot.md").write_text("\n".join(md) + "\n")
    return out / "zero_shot.md"


def evaluate(checkpoint: str, ds: Dataset, out, image_size=None, max_cases=None, log=print) -> list[dict]:
    """The protocol on `ds` for the model directory `checkpoint`; writes the files, returns the rows."""
    from safeclick_jax.evaluation import volume_session

    ensure(ds, log)
    cases = load_cases(ds, max_cases)
    if not cases:
        raise ValueError(f"{ds.cache_dir}: no volume in split {ds.split!r}")
    names = label_names(ds.root)
    model = volume_session.volume_model(Path(checkpoint).name, checkpoint, image_size)
    rows, t0 = [], time.perf_counter()
    for i, case in enumerate(cases):
        rows += run_case(model, case, names)
        log(f"[zero-shot] {i + 1}/{len(cases)} {case.name}: {time.perf_counter() - t0:.0f} s")
    title = f"Zero-shot: {checkpoint} on {ds.root} ({ds.split}, {len(cases)} volumes)"
    write(out, rows, title)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m safeclick_jax.evaluation.zero_shot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="model directory (or a training workdir: its export/)")
    p.add_argument("--data", choices=sorted(DATASETS), default="abdomen")
    p.add_argument("--root", default=None, help="another dataset folder (MSD layout or plain)")
    p.add_argument("--cache-dir", default=None, help="its slice cache (prepared when absent)")
    p.add_argument("--split", default=None, help="train, val, test or all (default: the dataset's)")
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/../zero_shot_<data>)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's)")
    p.add_argument("--max-cases", type=int, default=None, help="at most this many volumes (smoke runs)")
    a = p.parse_args(argv)
    if (a.root is None) != (a.cache_dir is None):
        p.error("--root and --cache-dir go together")
    ds = DATASETS[a.data]
    if a.root is not None:
        ds = dataclasses.replace(ds, root=a.root, cache_dir=a.cache_dir)
        if not Path(a.root).exists():
            p.error(f"--root {a.root}: no such folder")
    if a.split is not None:
        if a.split not in ("train", "val", "test", "all"):
            p.error(f"--split {a.split!r}: choose train, val, test or all")
        ds = dataclasses.replace(ds, split=a.split)
    if not (Path(a.checkpoint) / "model.json").exists() and not (Path(a.checkpoint) / "export").exists():
        p.error(f"--checkpoint {a.checkpoint}: no model.json (a model directory) and no export/ (a training workdir)")
    out = a.out or str(Path(a.checkpoint).resolve().parent / f"zero_shot_{a.data if a.root is None else 'data'}")
    from safeclick_jax import checkpoint

    try:
        evaluate(a.checkpoint, ds, out, a.image_size, a.max_cases)
    except checkpoint.ModelDirError as e:
        checkpoint.exit_on_model_error(e)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(out) / "zero_shot.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
