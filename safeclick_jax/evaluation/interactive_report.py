"""Files of `evaluate.py --protocol interactive`: interactive.csv (per label), interactive_cases.csv
(per case, the challenge's scores), noc.csv, interactive.md and interactive_curve.png (see
interactive.py and noc.py for the definitions)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from safeclick_jax.evaluation import interactive, noc  # noqa: E402

NOTE_NAMES = {
    "cases_without_labels": "cases whose labels are all empty (skipped)",
    "one_slice_labels": "labels present on one slice only (run)",
    "one_slice_volumes": "volumes of one slice (run)",
    "missing_spacing": "volumes without spacing (pixdim 0: 1 mm assumed)",
}


def write_csv(path: Path, rows: list[dict], fields: list[str]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _f(x, digits=4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def interactive_section(rows: list[dict], use_box: bool, seed: int) -> list[str]:
    first = "3D box" if use_box else "click"
    md = [
        "## Interactive 3D protocol (CVPR 2025 challenge)",
        "",
        f"Step 1: {first} per label; steps 2-6: one corrective click per label (largest 26-connected error "
        f"component, farthest voxel from its boundary), seed {seed}. Scored per case as CVPR25_iter_eval.py: "
        "DSC = mean over the case's labels, NSD (2 mm) counted only where that DSC > 0.2; DSC_AUC / NSD_AUC: "
        "trapezoid over the five click steps (maximum 4); means over cases. Label final DSC: the mean over "
        "labels of each label's own Dice. Seconds: the model's time per label for the six steps.",
        "",
        "| model | dataset | cases | labels | DSC_AUC | NSD_AUC | final DSC | final NSD | label final DSC "
        "| s / label | step-1 DSC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in interactive.summarize(rows):
        md.append(
            f"| {s['model']} | {s['dataset']} | {s['cases']} | {s['labels']} | {_f(s['dsc_auc'])} | "
            f"{_f(s['nsd_auc'])} | {_f(s['final_dsc'])} | {_f(s['final_nsd'])} | {_f(s['label_final_dsc'])} | "
            f"{_f(s['seconds'], 2)} | {_f(s['box_dsc'])} |"
        )
    return md + [""]


def notes_section(notes: dict) -> list[str]:
    md = ["### Unusual cases (handled and counted)", "", "| dataset | case | count |", "|---|---|---:|"]
    lines = [
        f"| {ds} | {NOTE_NAMES.get(k, k)} | {n} |" for ds, d in sorted(notes.items()) for k, n in sorted(d.items())
    ]
    return md + (lines or ["| all | none | 0 |"]) + [""]


def noc_section(rows: list[dict], max_clicks: int) -> list[str]:
    md = [
        "## NoC@85 / NoC@90 on 2D ROIs",
        "",
        f"Clicks until IoU >= 85 / 90 %, at most {max_clicks} (RITM's click rule); an ROI that never gets there "
        f"counts as {max_clicks} and is listed under '>= {max_clicks}'.",
        "",
        f"| model | dataset | ROIs | NoC@85 | >= {max_clicks} @85 | NoC@90 | >= {max_clicks} @90 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in noc.summarize(rows):
        md.append(
            f"| {s['model']} | {s['dataset']} | {s['rois']} | {s['noc_85']:.2f} | {s['fail_85']} | "
            f"{s['noc_90']:.2f} | {s['fail_90']} |"
        )
    return md + [""]


def curve_figure(rows: list[dict], path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    steps = np.arange(1, interactive.STEPS + 1)
    for m, (dsc, nsd) in interactive.curve(rows).items():
        axes[0].plot(steps, dsc, marker="o", label=m)
        axes[1].plot(steps, nsd, marker="o", label=m)
    for ax, name in zip(axes, ("DSC", "NSD (2 mm)")):
        ax.set_xlabel("step (1: box, 2-6: clicks)")
        ax.set_ylabel(name)
        ax.set_xticks(steps)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write(workdir, rows, notes, noc_rows=None, use_box=True, seed=0, max_clicks=noc.MAX_CLICKS, run_line="") -> Path:
    """Writes the five files; returns the markdown's path."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "interactive.csv", rows, ["model", "dataset", "case", "label", "step", "dsc", "nsd", "seconds"])
    cases = interactive.case_steps(rows)
    fields = ["model", "dataset", "case", "step", "labels", "dsc", "nsd", "seconds"]
    write_csv(out / "interactive_cases.csv", cases, fields)
    md = ["# Interactive segmentation", ""] + ([run_line, ""] if run_line else [])
    md += interactive_section(rows, use_box, seed) + notes_section(notes)
    if noc_rows is not None:
        write_csv(out / "noc.csv", noc_rows, list(noc_rows[0]) if noc_rows else ["model", "dataset", "roi_id"])
        md += noc_section(noc_rows, max_clicks)
    (out / "interactive.md").write_text("\n".join(md))
    if rows:
        curve_figure(rows, out / "interactive_curve.png")
    return out / "interactive.md"
