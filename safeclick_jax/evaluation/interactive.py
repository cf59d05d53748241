"""The CVPR 2025 interactive 3D protocol: a 3D box, then five corrective clicks, all labels of a
volume together; Dice and NSD after every step.

    cases = load_cases(cache_dir, "test")
    rows, notes = run(models, cases, seed=0, use_box=True)   # models: InteractiveModel

Volumes: the prepared test-split volumes of the slice cache (safeclick_jax/data, docs/data.md),
i.e. RAS, resampled to the cache's isotropic spacing, as [slices, rows, cols] in the training
slices' orientation, intensities as the model was trained on. Voxels below are (slice, row, col);
the spacing is permuted to that order.

A model is an `InteractiveModel`: a name and a session factory, `factory(case, labels) -> Session`.
A session takes `add_box(label, Box3D)` and `add_click(label, voxel, positive)` and returns the
current label map from `predict()`. The protocol knows nothing else about the model, so tests
plug in an oracle or an empty model without JAX (volume_session.py wraps the volume engine).

Steps (step numbers as in the challenge's description):
1. the box of every label: the z range of its labelled slices and the 2D bounding box on its middle
   labelled slice, each edge moved outwards by a random 0-5 px x (image size / 256) (seeded by
   (seed, case, label)), clipped to the slice. Without boxes (`use_box=False`) step 1 is a click,
   placed by the same rule as the corrections (on an empty prediction: the centre of the largest
   component of the label).
2-6. one corrective click per label (clicks.corrective_click_3d, ties seeded by (seed, case, label,
   step)); labels that are already exact get none; then one predict() for all labels.
Metrics are scored as the challenge's CVPR25_iter_eval.py scores them, per case: after each step
the case's DSC is the mean over its labels of their Dice, and its NSD (2 mm, with the voxel spacing;
surface_dice) the mean over its labels of their NSD, counted only where the case's DSC exceeds 0.2
(0 otherwise, even for a label that is right on its own); DSC_AUC / NSD_AUC are the trapezoids of
the case's values over the five click steps, and the figures of a dataset are means over its
cases. The rows keep each label's own Dice and (ungated) NSD beside them. `seconds` = the model's
time in that step (the session's calls) divided by the case's labels.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from safeclick_jax.evaluation import clicks, surface_dice

NUM_CLICKS = 5
STEPS = NUM_CLICKS + 1
TOLERANCE_MM = 2.0
NSD_MIN_DICE = 0.2
BOX_JITTER_PX = 5  # at 256 px; scaled by image size / 256


@dataclasses.dataclass
class Case:
    name: str
    dataset: str
    image: np.ndarray  # uint8 [slices, rows, cols]
    labels: np.ndarray  # integer [slices, rows, cols]
    spacing: tuple  # mm per (slice, row, col)
    axis: int = 2  # slicing axis of the RAS volume (for the engine)


@dataclasses.dataclass(frozen=True)
class Box3D:
    z0: int
    z1: int
    z_mid: int
    box: tuple  # (x0, y0, x1, y1) on slice z_mid, x = column


class Session(Protocol):
    def add_box(self, label: int, box: Box3D) -> None: ...

    def add_click(self, label: int, voxel: tuple, positive: bool) -> None: ...

    def predict(self) -> np.ndarray: ...


@dataclasses.dataclass
class InteractiveModel:
    name: str
    factory: Callable[[Case, list], Session]


# ---------------------------------------------------------------------------------------------
# Cases


def load_cases(cache_dir, split: str = "test", max_cases: int | None = None) -> tuple[list[Case], dict]:
    """The cache's volumes of `split`; returns (cases, notes) where notes counts per dataset the
    volumes whose spacing was missing (pixdim 0: 1 mm assumed)."""
    from safeclick_jax.data import pipeline

    cache = pipeline.Cache(cache_dir)
    cases, notes = [], {}
    for v in cache.volumes:
        if v.get("split") != split:
            continue
        image, labels = cache.volume_arrays(int(v["id"]))
        axis = int(cache_axis(cache))
        ds = Path(v["dataset"]).name or v["dataset"]
        spacing, ok = slice_spacing(v.get("spacing"), axis)
        if not ok:
            count(notes, ds, "missing_spacing")
        name = Path(v["image"]).name.replace(".nii.gz", "").replace(".nii", "")
        cases.append(Case(name, ds, np.asarray(image), np.asarray(labels), spacing, axis))
        if max_cases is not None and len(cases) >= max_cases:
            break
    return cases, notes


def cache_axis(cache) -> int:
    summary = cache.cache_dir / "summary.json"
    if summary.exists():
        import json

        return int(json.loads(summary.read_text()).get("config", {}).get("axis", 2))
    return 2


def slice_spacing(ras_spacing, axis: int) -> tuple[tuple, bool]:
    """RAS spacing -> (slice, row, col) spacing (preprocess.to_slices: rows = the second remaining
    axis, cols = the first); (1, 1, 1) and False when it is missing, zero or not finite."""
    sp = np.asarray(ras_spacing if ras_spacing is not None else [0, 0, 0], np.float64).reshape(-1)
    if sp.shape != (3,) or not (np.isfinite(sp).all() and (sp > 0).all()):
        return (1.0, 1.0, 1.0), False
    p, q = [a for a in range(3) if a != axis]
    return (float(sp[axis]), float(sp[q]), float(sp[p])), True


def count(notes: dict, dataset: str, key: str, n: int = 1):
    notes.setdefault(dataset, {}).setdefault(key, 0)
    notes[dataset][key] += n


# ---------------------------------------------------------------------------------------------
# Prompts


def case_seed(seed: int, case: Case, *more: int) -> list[int]:
    """A generator seed from the run seed, the case's name (stable across runs) and more integers."""
    return [int(seed), zlib.crc32(f"{case.dataset}/{case.name}".encode()), *[int(m) for m in more]]


def box_3d(gt: np.ndarray, rng: np.random.Generator) -> Box3D:
    """The challenge's 3D box of one label mask [slices, rows, cols] (see the module docstring)."""
    zs = np.flatnonzero(gt.any(axis=(1, 2)))
    z_mid = int(zs[len(zs) // 2])
    rows = np.flatnonzero(gt[z_mid].any(axis=1))
    cols = np.flatnonzero(gt[z_mid].any(axis=0))
    h, w = gt.shape[1:]
    scale = max(h, w) / 256.0
    j = rng.integers(0, BOX_JITTER_PX + 1, size=4) * scale
    box = (
        float(max(cols[0] - j[0], 0)),
        float(max(rows[0] - j[1], 0)),
        float(min(cols[-1] + j[2], w - 1)),
        float(min(rows[-1] + j[3], h - 1)),
    )
    return Box3D(int(zs[0]), int(zs[-1]), z_mid, box)


# ---------------------------------------------------------------------------------------------
# Metrics


def step_metrics(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """(Dice, NSD at 2 mm) of one label, NSD not gated (the gate is the case's: case_steps)."""
    return surface_dice.dice(pred, gt), surface_dice.surface_dice(pred, gt, spacing, TOLERANCE_MM)


def case_steps(rows: list[dict]) -> list[dict]:
    """The challenge's per-case scores from per-label rows: for each (model, dataset, case, step),
    dsc = the mean of its labels' Dice, nsd = the mean of their NSD where dsc > 0.2, else 0;
    labels = how many, seconds = the step's model time per label."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"], r["case"], r["step"]), []).append(r)
    out = []
    for (m, ds, case, step), sel in groups.items():
        dsc = float(np.mean([r["dsc"] for r in sel]))
        nsd = float(np.mean([r["nsd"] for r in sel])) if dsc > NSD_MIN_DICE else 0.0
        out.append(
            {
                "model": m,
                "dataset": ds,
                "case": case,
                "step": step,
                "labels": len(sel),
                "dsc": dsc,
                "nsd": nsd,
                "seconds": float(np.mean([r["seconds"] for r in sel])),
            }
        )
    return out


def trapezoid(values) -> float:
    """Area under values at x = 0, 1, 2, ... (unit spacing)."""
    v = np.asarray(values, np.float64)
    return float(((v[1:] + v[:-1]) / 2.0).sum())


def label_summary(steps: list[dict]) -> dict:
    """Scores of one case (or one label) from its rows of steps 1..6: DSC_AUC / NSD_AUC over the
    five click steps (x = 0..4, maximum 4), final DSC / NSD after the fifth click, box-step DSC,
    seconds in all."""
    steps = sorted(steps, key=lambda r: r["step"])
    dsc = [r["dsc"] for r in steps]
    nsd = [r["nsd"] for r in steps]
    return {
        "dsc_auc": trapezoid(dsc[1:]),
        "nsd_auc": trapezoid(nsd[1:]),
        "final_dsc": dsc[-1],
        "final_nsd": nsd[-1],
        "box_dsc": dsc[0],
        "seconds": float(sum(r["seconds"] for r in steps)),
    }


# ---------------------------------------------------------------------------------------------
# The protocol


def present_labels(case: Case) -> list[int]:
    return [int(v) for v in np.unique(case.labels) if v != 0]


def check_case(case: Case, labels: list[int], notes: dict):
    """Counts the unusual cases the protocol still runs (reported in interactive.md)."""
    if case.labels.shape[0] == 1:
        count(notes, case.dataset, "one_slice_volumes")
    for lab in labels:
        if np.count_nonzero((case.labels == lab).any(axis=(1, 2))) == 1:
            count(notes, case.dataset, "one_slice_labels")


class _Timed:
    """The session's calls, timed (the protocol's own work is not the model's time)."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def run_case(model: InteractiveModel, case: Case, seed: int = 0, use_box: bool = True, notes=None) -> list[dict]:
    """Rows (model, dataset, case, label, step, dsc, nsd, seconds) of one case, steps 1..6."""
    notes = {} if notes is None else notes
    labels = present_labels(case)
    if not labels:
        count(notes, case.dataset, "cases_without_labels")
        return []
    check_case(case, labels, notes)
    gts = {lab: case.labels == lab for lab in labels}
    timed = _Timed()
    session = timed(model.factory, case, labels)
    for lab in labels:
        rng = np.random.default_rng(case_seed(seed, case, lab, 1))
        if use_box:
            timed(session.add_box, lab, box_3d(gts[lab], rng))
        else:
            voxel, positive = clicks.corrective_click_3d(np.zeros_like(gts[lab]), gts[lab], rng)
            timed(session.add_click, lab, voxel, positive)
    pred = check_prediction(timed(session.predict), case)
    rows = []
    for step in range(1, STEPS + 1):
        if step > 1:
            timed.seconds = 0.0
            clicked = False
            for lab in labels:
                rng = np.random.default_rng(case_seed(seed, case, lab, step))
                click = clicks.corrective_click_3d(pred == lab, gts[lab], rng)
                if click is not None:
                    timed(session.add_click, lab, *click)
                    clicked = True
            if clicked:
                pred = check_prediction(timed(session.predict), case)
        for lab in labels:
            d, nsd = step_metrics(pred == lab, gts[lab], case.spacing)
            rows.append(
                {
                    "model": model.name,
                    "dataset": case.dataset,
                    "case": case.name,
                    "label": lab,
                    "step": step,
                    "dsc": d,
                    "nsd": nsd,
                    "seconds": timed.seconds / len(labels),
                }
            )
    return rows


def check_prediction(pred, case: Case) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.shape != case.labels.shape:
        raise ValueError(
            f"{case.name}: the model returned a label map of shape {pred.shape}, expected {case.labels.shape}"
        )
    return pred


def run(
    models: list[InteractiveModel], cases: list[Case], seed: int = 0, use_box: bool = True, notes=None, log=None
) -> tuple[list[dict], dict]:
    """Every model on every case; returns (rows, notes)."""
    notes = {} if notes is None else notes
    rows = []
    for m in models:
        for i, case in enumerate(cases):
            case_notes = notes if m is models[0] else {}  # count each case once
            rows += run_case(m, case, seed, use_box, case_notes)
            if log is not None:
                log(f"[interactive] {m.name}: case {i + 1}/{len(cases)} ({case.dataset}/{case.name})")
    return rows, notes


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, dataset): means over cases of their challenge scores (case_steps, label_summary),
    with the number of cases and labels, and beside them the mean over labels of each label's own
    final Dice (`label_final_dsc`)."""
    by_case: dict = {}
    for r in case_steps(rows):
        by_case.setdefault((r["model"], r["dataset"], r["case"]), []).append(r)
    groups: dict = {}
    for (m, ds, _), steps in by_case.items():
        groups.setdefault((m, ds), []).append((label_summary(steps), steps[0]["labels"]))
    final = max(r["step"] for r in rows) if rows else STEPS
    out = []
    for (m, ds), sums in groups.items():
        row = {"model": m, "dataset": ds, "cases": len(sums), "labels": sum(n for _, n in sums)}
        for k in sums[0][0]:
            row[k] = float(np.nanmean([s[k] for s, _ in sums]))
        row["label_final_dsc"] = float(
            np.mean([r["dsc"] for r in rows if (r["model"], r["dataset"], r["step"]) == (m, ds, final)])
        )
        out.append(row)
    return out


def curve(rows: list[dict]) -> dict:
    """{model: (mean DSC per step [6], mean NSD per step [6])} over the cases (challenge scores)."""
    cases = case_steps(rows)
    out = {}
    for m in dict.fromkeys(r["model"] for r in cases):
        sel = [r for r in cases if r["model"] == m]
        dsc = [float(np.nanmean([r["dsc"] for r in sel if r["step"] == s])) for s in range(1, STEPS + 1)]
        nsd = [float(np.nanmean([r["nsd"] for r in sel if r["step"] == s])) for s in range(1, STEPS + 1)]
        out[m] = (dsc, nsd)
    return out
