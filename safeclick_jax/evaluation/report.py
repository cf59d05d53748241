"""Results of a protocol run as files: results.csv, results.json, per_roi.csv, volumes_3d.csv,
prompts.json and table.md (the paper's Table 2 layout).

Table 2 layout: rows = models; columns = point PP 0 %, IP 25/50/75/100 %, IP Avg., box PP 100 %,
IP 50/75/125/150 %, IP Avg. Dice in %, two decimals. In each column the best model value is
**bold** and the second best <u>underlined</u> (values compared after rounding, so equal printed
values share a rank). With a baseline, an "Improve" row gives candidate minus baseline per column
(the mean over the candidates when there are several, as the paper averages its model sizes); it is
never ranked. The "All datasets" table averages the per-dataset means (every dataset weighs the
same, as the paper's "average performance across 15 datasets").
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from safeclick_jax.evaluation import metrics
from safeclick_jax.evaluation.protocol import CONDITION_NAMES, CONDITIONS, NUM_POINT

POINT_IP = [c for c in range(NUM_POINT) if CONDITIONS[c][1] != 0.0]
BOX_IP = [c for c in range(NUM_POINT, len(CONDITIONS)) if CONDITIONS[c][1] != 1.0]
# Table columns: (header, condition index or 'point_ip_avg' / 'box_ip_avg')
COLUMNS = (
    [(f"{'PP' if c == 0 else 'IP'} {int(CONDITIONS[c][1] * 100)}%", c) for c in range(NUM_POINT)]
    + [("IP Avg.", "point_ip_avg")]
    + [
        (f"{'PP' if CONDITIONS[c][1] == 1.0 else 'IP'} {int(CONDITIONS[c][1] * 100)}%", c)
        for c in range(NUM_POINT, len(CONDITIONS))
    ]
    + [("IP Avg.", "box_ip_avg")]
)
AVERAGE = "All datasets"


def _nanmean(x):
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def summary_rows(result) -> list[dict]:
    """One row per model x dataset x condition (2D Dice over ROIs, 3D Dice over volume-labels)."""
    rois = result.rois
    rows = []
    for m in result.models:
        name = m["name"]
        d2 = result.dice(name)
        d3 = result.dice_3d(name)
        vol_ds = {k: rois.dataset_of_volume[k[0]] for k in d3}
        for ds in rois.datasets:
            sel = rois.dataset == ds
            d3_ds = np.array([d3[k] for k in d3 if vol_ds[k] == ds]).reshape(-1, len(CONDITIONS))
            for c, cname in enumerate(CONDITION_NAMES):
                s2, s3 = metrics.summarize(d2[sel, c]), metrics.summarize(d3_ds[:, c])
                rows.append(
                    {
                        "model": name,
                        "dataset": ds,
                        "condition": cname,
                        "prompt": CONDITIONS[c][0],
                        "param": CONDITIONS[c][1],
                        "dice_mean": s2["mean"],
                        "dice_std": s2["std"],
                        "n_rois": s2["n"],
                        "n_undefined": s2["n_nan"],
                        "n_skipped_empty": rois.skipped[ds]["empty"],
                        "n_skipped_small": rois.skipped[ds]["small"],
                        "dice3d_mean": s3["mean"],
                        "dice3d_std": s3["std"],
                        "n_volume_labels": s3["n"],
                    }
                )
    return rows


def table_values(rows: list[dict], key: str = "dice_mean") -> dict:
    """{dataset (and AVERAGE): {model: [12 column values in %]}} from summary_rows."""
    by = {}
    for r in rows:
        by.setdefault(r["dataset"], {}).setdefault(r["model"], [math.nan] * len(CONDITIONS))
        by[r["dataset"]][r["model"]][CONDITION_NAMES.index(r["condition"])] = r[key] * 100.0
    out = {}
    for ds, models in by.items():
        out[ds] = {m: _columns(v) for m, v in models.items()}
    if by:
        models = list(next(iter(by.values())))
        out[AVERAGE] = {
            m: _columns([_nanmean([by[ds][m][c] for ds in by]) for c in range(len(CONDITIONS))]) for m in models
        }
    return out


def _columns(per_condition: list[float]) -> list[float]:
    vals = []
    for _, col in COLUMNS:
        if col == "point_ip_avg":
            vals.append(_nanmean([per_condition[c] for c in POINT_IP]))
        elif col == "box_ip_avg":
            vals.append(_nanmean([per_condition[c] for c in BOX_IP]))
        else:
            vals.append(per_condition[col])
    return vals


def improve_row(values: dict, baseline: str, candidates: list[str]) -> list[float]:
    """Mean over candidates of (candidate - baseline), per column."""
    diffs = np.array([np.subtract(values[c], values[baseline]) for c in candidates], np.float64)
    return [_nanmean(diffs[:, j]) for j in range(diffs.shape[1])]


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.2f}"


def markdown_table(
    values: dict,
    model_types: dict | None = None,
    baseline: str | None = None,
    candidates: list[str] | None = None,
) -> str:
    """Table 2 for one dataset: values = {model: [12 columns]} in the models' order."""
    model_types = model_types or {}
    names = list(values)
    # Markdown has one header row: the paper's two (Point / Bbox over PP / IP %) are merged.
    groups = ["Point"] * (NUM_POINT + 1) + ["Bbox"] * (len(CONDITIONS) - NUM_POINT + 1)
    head = "| Method | Model type | " + " | ".join(f"{g} {h}" for g, (h, _) in zip(groups, COLUMNS)) + " |"
    sep = "|---|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    # ranks per column on the printed (rounded) values
    marks = {m: [""] * len(COLUMNS) for m in names}
    for j in range(len(COLUMNS)):
        vals = sorted({round(values[m][j], 2) for m in names if np.isfinite(values[m][j])}, reverse=True)
        for m in names:
            v = values[m][j]
            if not np.isfinite(v):
                continue
            if round(v, 2) == vals[0]:
                marks[m][j] = "best"
            elif len(vals) > 1 and round(v, 2) == vals[1]:
                marks[m][j] = "second"
    for m in names:
        cells = []
        for j, v in enumerate(values[m]):
            s = _fmt(v)
            s = {"best": f"**{s}**", "second": f"<u>{s}</u>"}.get(marks[m][j], s)
            cells.append(s)
        lines.append(f"| {m} | {model_types.get(m, '')} | " + " | ".join(cells) + " |")
    if baseline is not None:
        cands = candidates or [m for m in names if m != baseline]
        imp = improve_row(values, baseline, cands)
        label = "Improve" + (f" ({', '.join(cands)} vs {baseline})")
        lines.append(f"| {label} | | " + " | ".join(_fmt(v) for v in imp) + " |")
    return "\n".join(lines) + "\n"


def model_type(info: dict) -> str:
    """'ViT-T' etc. from the SAM 2 config name, as the paper's "Model Types" column."""
    size = info["base"].rsplit("_", 1)[-1]
    return {"t": "ViT-T", "s": "ViT-S", "b+": "ViT-B+", "l": "ViT-L"}.get(size, info["base"])


def default_candidates(models: list[dict], baseline: str) -> list[str]:
    """Improve compares the SafeClick models with the baseline (all others if there is none)."""
    sc = [m["name"] for m in models if m["kind"] == "safeclick" and m["name"] != baseline]
    return sc or [m["name"] for m in models if m["name"] != baseline]


def timing_rows(result, base_timing: dict | None = None) -> list[dict]:
    """Per model: ms per slice (encoder), per prompt (decoder), per ROI (one interactive
    prediction) and, for a SafeClick model, the ratio over its base: a plain SAM 2 model of the
    same configuration in this run if any, else the measured base network (base_timing)."""
    rows = []
    by_base = {}
    for m in result.models:
        if m["kind"] == "sam2":
            by_base.setdefault(m["base"], m)
    for m in result.models:
        t = m["timing"]
        row = {
            "model": m["name"],
            "kind": m["kind"],
            "base": m["base"],
            "encode_ms_per_slice": 1e3 * t["encode_s_per_slice"],
            "decode_ms_per_prompt": 1e3 * t["decode_s_per_prompt"],
            "inference_ms_per_roi": 1e3 * t["inference_s_per_roi"],
            "rois_per_s": t["rois_per_s"],
            "compile_s": t["compile_s"],
            "overhead_ratio": None,
            "overhead_vs": None,
        }
        if m["kind"] == "safeclick":
            ref = by_base.get(m["base"])
            if ref is not None:
                row["overhead_ratio"] = t["inference_s_per_roi"] / ref["timing"]["inference_s_per_roi"]
                row["overhead_vs"] = ref["name"]
            elif base_timing and m["name"] in base_timing:
                row["overhead_ratio"] = base_timing[m["name"]]["ratio"]
                row["overhead_vs"] = "base network (same weights, SafeClick head removed)"
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    return x


def check_comparison(names: list[str], models: list[dict], baseline, candidates):
    """The candidates of the Improve row (None without a baseline); ValueError for unknown names."""
    if baseline is None:
        return candidates
    if baseline not in names:
        raise ValueError(f"--baseline {baseline!r} is not one of the models {names}")
    candidates = candidates or default_candidates(models, baseline)
    bad = [c for c in candidates if c not in names or c == baseline]
    if bad:
        raise ValueError(f"candidates {bad} are not models of this run other than the baseline")
    return candidates


def per_roi_rows(result, names: list[str]) -> list[dict]:
    rois = result.rois
    out = []
    for m in names:
        d = result.dice(m)
        for i, r in enumerate(rois.rows):
            for c, cname in enumerate(CONDITION_NAMES):
                out.append(
                    {
                        "model": m,
                        "dataset": rois.dataset[i],
                        "roi_id": int(r["roi_id"]),
                        "volume_id": int(r["volume_id"]),
                        "slice": int(r["slice"]),
                        "label": int(r["label"]),
                        "area": int(r["area"]),
                        "condition": cname,
                        "dice": d[i, c],
                        "pred_area": int(result.pred_sum[m][i, c]),
                        "iou_pred": float(result.iou_pred[m][i, c]),
                    }
                )
    return out


def volume_rows(result, names: list[str]) -> list[dict]:
    rois = result.rois
    out = []
    for m in names:
        for (v, lab), d in sorted(result.dice_3d(m).items()):
            for c, cname in enumerate(CONDITION_NAMES):
                out.append(
                    {
                        "model": m,
                        "dataset": rois.dataset_of_volume[v],
                        "volume_id": v,
                        "volume": rois.cache.volumes[v]["image"],
                        "label": lab,
                        "condition": cname,
                        "dice3d": d[c],
                    }
                )
    return out


def write_prompts(rois, path: Path):
    path.write_text(
        json.dumps(
            {
                "seed": rois.seed,
                "split": rois.split,
                "coordinates": "raw slice pixels, x = column",
                "prompts": rois.prompt_table(),
            }
        )
    )


def dice_sections(result, t2: dict, t3: dict, types: dict, baseline, candidates) -> list[str]:
    """The markdown's 2D and 3D Dice tables, all datasets first when there are several."""
    rois = result.rois
    md = []
    order = ([AVERAGE] if len(rois.datasets) > 1 else []) + rois.datasets
    for ds in order:
        n = sum(1 for i in range(len(rois)) if ds == AVERAGE or rois.dataset[i] == ds)
        md += [f"## {ds} (2D Dice per ROI, {n} ROIs)", "", markdown_table(t2[ds], types, baseline, candidates)]
    for ds in order:
        md += [
            f"## {ds}: 3D Dice per volume and label (slices put back together)",
            "",
            markdown_table(t3[ds], types, baseline, candidates),
        ]
    return md


def skipped_section(rois) -> list[str]:
    md = [
        "## Skipped ROIs (not evaluated, not averaged)",
        "",
        "| dataset | empty mask | area below --min_area |",
        "|---|---:|---:|",
    ]
    return md + [f"| {ds} | {s['empty']} | {s['small']} |" for ds, s in rois.skipped.items()]


def timing_section(timings: list[dict]) -> list[str]:
    md = [
        "",
        "## Inference time",
        "",
        "Encoder per slice + decoder per prompt = one interactive prediction (one ROI, one "
        "prompt); the ratio is SafeClick over its base (the paper reports 1.18).",
        "",
        "| model | kind | encoder ms/slice | decoder ms/prompt | ms per ROI | protocol ROIs/s "
        "(x10 conditions) | ratio vs base |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for t in timings:
        ratio = "" if t["overhead_ratio"] is None else f"{t['overhead_ratio']:.3f} (vs {t['overhead_vs']})"
        md.append(
            f"| {t['model']} | {t['kind']} | {t['encode_ms_per_slice']:.2f} | "
            f"{t['decode_ms_per_prompt']:.3f} | {t['inference_ms_per_roi']:.2f} | "
            f"{t['rois_per_s']:.2f} | {ratio} |"
        )
    return md + [""]


def markdown_report(result, t2, t3, timings, baseline, candidates) -> str:
    rois = result.rois
    types = {m["name"]: model_type(m) for m in result.models}
    md = [
        "# Dice (%) under perfect (PP) and imperfect (IP) prompts",
        "",
        f"Split `{rois.split}`, prompt seed {rois.seed}, image size {result.image_size}. "
        "Point: displacement of the click from the centre of mass, in % of the object's "
        "equivalent radius; Bbox: scale of the tight box. **Bold**: best, <u>underlined</u>: "
        "second best. Point prompts: best of SAM 2's three masks by predicted IoU; box "
        "prompts: single mask.",
        "",
    ]
    md += dice_sections(result, t2, t3, types, baseline, candidates)
    md += skipped_section(rois) + timing_section(timings)
    return "\n".join(md)


def summary_json(result, rows, t2, t3, timings, baseline, candidates, run_info) -> dict:
    rois = result.rois
    names = [m["name"] for m in result.models]
    summary = {
        "run": run_info or {},
        "split": rois.split,
        "seed": rois.seed,
        "image_size": result.image_size,
        "conditions": list(CONDITION_NAMES),
        "mask_selection": {
            "point": "multimask_output=True, highest predicted IoU",
            "box": "multimask_output=False (SAM 2 stability fallback)",
        },
        "dice_definition": "2|P&G|/(|P|+|G|) at the cached slice resolution; undefined (NaN, "
        "excluded and counted) when both are empty; empty-GT ROIs skipped",
        "models": result.models,
        "datasets": {
            ds: {"rois": int((rois.dataset == ds).sum()), "skipped": rois.skipped[ds]} for ds in rois.datasets
        },
        "results": rows,
        "table": {"dice": t2, "dice3d": t3},
        "baseline": baseline,
        "candidates": candidates,
        "improve": (
            {ds: dict(zip([h for h, _ in COLUMNS], improve_row(t2[ds], baseline, candidates))) for ds in t2}
            if baseline is not None
            else None
        ),
        "timing": timings,
        "elapsed_s": result.elapsed_s,
        "rois_per_s": len(rois) * len(names) / result.elapsed_s if result.elapsed_s else None,
    }
    return _json_safe(summary)


def write(
    result,
    workdir,
    baseline: str | None = None,
    candidates: list[str] | None = None,
    base_timing: dict | None = None,
    run_info: dict | None = None,
) -> dict:
    """Writes every output file into workdir; returns the results.json content."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    names = [m["name"] for m in result.models]
    candidates = check_comparison(names, result.models, baseline, candidates)
    rows = summary_rows(result)
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "per_roi.csv", per_roi_rows(result, names))
    _write_csv(out / "volumes_3d.csv", volume_rows(result, names))
    write_prompts(result.rois, out / "prompts.json")
    t2 = table_values(rows, "dice_mean")
    t3 = table_values(rows, "dice3d_mean")
    timings = timing_rows(result, base_timing)
    (out / "table.md").write_text(markdown_report(result, t2, t3, timings, baseline, candidates))
    summary = summary_json(result, rows, t2, t3, timings, baseline, candidates, run_info)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    return summary
