"""PNG figures of a protocol run.

* `robustness_figure`: like the paper's Fig. 3, one per dataset: Dice vs perturbation, one line
  per model, box prompts (scale 50-150 %) on the left, point prompts (displacement 0-100 %) on
  the right.
* `overlay_figure`: like Fig. 4, a few ROIs (rows): image, ground truth, then each model's
  prediction, the prompt drawn on every panel (red star = click, yellow rectangle = box).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from safeclick_jax.evaluation import metrics  # noqa: E402
from safeclick_jax.evaluation.protocol import CONDITION_NAMES, CONDITIONS, NUM_POINT  # noqa: E402


def robustness_figure(rows: list[dict], dataset: str, path, key: str = "dice_mean") -> Path:
    """rows: report.summary_rows(...) (or results.csv rows); plots one dataset."""
    rows = [r for r in rows if r["dataset"] == dataset]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (
        ("box", "box scale (% of the tight box)", axes[0], 100),
        ("point", "click displacement (% of the equivalent radius)", axes[1], 0),
    )
    for kind, xlabel, ax, perfect in panels:
        ax.axvline(perfect, color="gray", linestyle="--", linewidth=1, label="perfect prompt")
        for m in models:
            pts = sorted(
                (float(r["param"]) * 100, float(r[key]) * 100) for r in rows if r["model"] == m and r["prompt"] == kind
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{dataset}: {kind} prompts")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (%)")
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _draw_prompt(ax, condition: int, point, box):
    if condition < NUM_POINT:
        ax.plot(
            [point[0]],
            [point[1]],
            marker="*",
            color="red",
            markersize=14,
            markeredgecolor="white",
            markeredgewidth=0.8,
        )
    else:
        x0, y0, x1, y1 = box
        ax.add_patch(
            plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="yellow", linewidth=1.5)
        )


def _show(ax, image, mask=None, color=(0.1, 0.9, 0.2)):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    if mask is not None:
        rgba = np.zeros(mask.shape + (4,), np.float32)
        rgba[mask] = (*color, 0.45)
        ax.imshow(rgba, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_figure(result, condition: int, path, roi_indices=None) -> Path | None:
    """ROIs with captured logits (result.overlays) under one condition; None if none captured."""
    names = [m["name"] for m in result.models]
    rois = result.rois
    if roi_indices is None:
        roi_indices = sorted({i for (_, i) in result.overlays})
    roi_indices = [i for i in roi_indices if all((m, i) in result.overlays for m in names)]
    if not roi_indices:
        return None
    ncol = 2 + len(names)
    fig, axes = plt.subplots(len(roi_indices), ncol, figsize=(2.6 * ncol, 2.6 * len(roi_indices)), squeeze=False)
    cname = CONDITION_NAMES[condition]
    for row, i in enumerate(roi_indices):
        r = rois.rows[i]
        sample = rois.cache.roi(r)
        image, gt = sample["image"], sample["mask"].astype(bool)
        point = rois.points[i, condition] if condition < NUM_POINT else None
        box = rois.boxes[i, condition - NUM_POINT] if condition >= NUM_POINT else None
        _show(axes[row, 0], image)
        axes[row, 0].set_ylabel(f"vol {int(r['volume_id'])} sl {int(r['slice'])}\nlabel {int(r['label'])}", fontsize=8)
        _show(axes[row, 1], image, gt, color=(0.2, 0.5, 1.0))
        _draw_prompt(axes[row, 1], condition, point, box)
        for j, m in enumerate(names):
            pred = metrics.predict_mask(result.overlays[(m, i)][condition], gt.shape)
            ax = axes[row, 2 + j]
            _show(ax, image, pred)
            _draw_prompt(ax, condition, point, box)
            ax.set_xlabel(f"Dice {100 * metrics.dice(pred, gt):.1f}", fontsize=8)
        if row == 0:
            for j, title in enumerate(["image", "GT"] + names):
                axes[0, j].set_title(title, fontsize=9)
    fig.suptitle(f"{cname} ({CONDITIONS[condition][0]} prompt)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
