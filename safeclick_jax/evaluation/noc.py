"""NoC@85 / NoC@90 on 2D ROIs: the number of clicks until IoU >= 85 / 90 %, at most 20.

    rows = run(models, rois, seed=0)          # models: ClickModel, rois: load_rois(cache_dir)

Clicks: clicks.corrective_click_2d (RITM's rule: the distance-transform maximum of the false
negatives or the false positives, whichever lies deeper inside its region), starting from an empty
prediction, so the first click is the deepest point of the ROI. An ROI that never reaches a
threshold within 20 clicks counts as 20 and is reported as ">= 20" (and counted as a failure).

A model is a `ClickModel`: a name and `factory(image uint8 [H, W]) -> session`, where
`session.click((row, col), positive) -> bool mask [H, W]` adds a click to the ROI's earlier ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from safeclick_jax.evaluation import clicks

MAX_CLICKS = 20
THRESHOLDS = (0.85, 0.90)


@dataclasses.dataclass
class ClickModel:
    name: str
    factory: Callable


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def load_rois(cache_dir, split: str = "test", max_rois: int | None = None) -> list[dict]:
    """The split's ROIs (empty masks left out) as dicts: dataset, roi_id, image, mask;
    `max_rois` keeps an evenly spaced subset."""
    from safeclick_jax.data import pipeline

    cache = pipeline.Cache(cache_dir)
    rows = cache.split_rois(split)
    if max_rois is not None and max_rois < len(rows):
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, max_rois).round().astype(int))]
    out = []
    for r in rows:
        roi = cache.roi(r)
        if not roi["mask"].any():
            continue
        v = cache.volumes[int(r["volume_id"])]
        out.append(
            {
                "dataset": Path(v["dataset"]).name or v["dataset"],
                "roi_id": int(r["roi_id"]),
                "image": np.asarray(roi["image"]),
                "mask": np.asarray(roi["mask"], bool),
            }
        )
    return out


def noc_roi(model: ClickModel, image: np.ndarray, gt: np.ndarray, rng, max_clicks: int = MAX_CLICKS) -> dict:
    """{'noc_85', 'noc_90' (max_clicks when not reached), 'reached_85', 'reached_90', 'ious'}."""
    session = model.factory(image)
    pred = np.zeros(gt.shape, bool)
    reached = {t: None for t in THRESHOLDS}
    ious = []
    for k in range(1, max_clicks + 1):
        click = clicks.corrective_click_2d(pred, gt, rng)
        if click is None:  # exact already: every later click count is k - 1
            for t in THRESHOLDS:
                reached[t] = reached[t] or k - 1
            break
        pred = np.asarray(session.click(*click), bool)
        ious.append(iou(pred, gt))
        for t in THRESHOLDS:
            if reached[t] is None and ious[-1] >= t:
                reached[t] = k
        if all(v is not None for v in reached.values()):
            break
    out = {"ious": ious}
    for t in THRESHOLDS:
        key = f"{round(t * 100)}"
        out[f"noc_{key}"] = reached[t] if reached[t] is not None else max_clicks
        out[f"reached_{key}"] = reached[t] is not None
    return out


def run(models: list[ClickModel], rois: list[dict], seed: int = 0, max_clicks: int = MAX_CLICKS) -> list[dict]:
    """One row per model and ROI (noc.csv)."""
    rows = []
    for m in models:
        for r in rois:
            res = noc_roi(m, r["image"], r["mask"], np.random.default_rng([seed, r["roi_id"]]), max_clicks)
            rows.append(
                {
                    "model": m.name,
                    "dataset": r["dataset"],
                    "roi_id": r["roi_id"],
                    "noc_85": res["noc_85"],
                    "reached_85": res["reached_85"],
                    "noc_90": res["noc_90"],
                    "reached_90": res["reached_90"],
                    "clicks": len(res["ious"]),
                    "final_iou": res["ious"][-1] if res["ious"] else 1.0,
                }
            )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, dataset): mean NoC@85 / @90 and failures (ROIs that never reached them)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    out = []
    for (m, ds), sel in groups.items():
        out.append(
            {
                "model": m,
                "dataset": ds,
                "rois": len(sel),
                "noc_85": float(np.mean([r["noc_85"] for r in sel])),
                "fail_85": sum(not r["reached_85"] for r in sel),
                "noc_90": float(np.mean([r["noc_90"] for r in sel])),
                "fail_90": sum(not r["reached_90"] for r in sel),
            }
        )
    return out
