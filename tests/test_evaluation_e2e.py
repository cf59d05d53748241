"""evaluate.py end to end on the real CT (tests/data/ct_small, TotalSegmentator's test case).

The default test uses a deliberately small SAM 2 configuration (4 Hiera blocks, 128 px) with
random weights plus a SafeClick model on top of it, sharded over 2 CPU devices; compilation
dominates its run time. The slow tests use the real Hiera-T converted from a torch checkpoint
and check evaluate's per-ROI Dice against ImagePredictor, an independent inference path.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.evaluation_fixtures import CT_SMALL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct_cache(tmp_path_factory):
    from safeclick_jax.data import prepare

    cache = tmp_path_factory.mktemp("ct") / "cache"
    prepare.prepare_dataset([CT_SMALL], cache, progress=False)
    return cache


def _small_models(tmp: Path):
    from safeclick_jax import checkpoint
    from safeclick_jax.models.config import HieraConfig, get_config
    from tests.evaluation_fixtures import random_params, write_safeclick_dir

    cfg = get_config("sam2.1_hiera_t").replace(
        image_size=128,
        hiera=HieraConfig(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,)),
        transformer_mlp_dim=256,
    )
    desc = {"kind": "sam2", "sam2": cfg.to_dict()}
    checkpoint.save(str(tmp / "sam2_small"), desc, random_params(desc, 0))
    write_safeclick_dir(tmp / "safeclick_small", tmp / "sam2_small")
    return tmp / "sam2_small", tmp / "safeclick_small"


def _evaluate(args, devices: int = 1, timeout: int = 900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_evaluate_end_to_end_on_ct_small(ct_cache, tmp_path):
    sam2_dir, sc_dir = _small_models(tmp_path)
    out = tmp_path / "eval"
    proc = _evaluate(
        [
            "--checkpoint",
            sam2_dir,
            "--name",
            "SAM 2",
            "--checkpoint",
            sc_dir,
            "--name",
            "SafeClick",
            "--baseline",
            "SAM 2",
            "--workdir",
            out,
            "--cache_dir",
            ct_cache,
            "--split",
            "train",
            "--image_size",
            128,
            "--batch_size",
            2,
            "--max_slices",
            2,
            "--rois_per_call",
            8,
            "--num_overlays",
            2,
        ],
        devices=2,
    )
    assert "[evaluate] batch 1/1" in proc.stderr  # progress output
    assert "on 2 device(s)" in proc.stderr  # sharded over the data mesh
    for name in (
        "results.csv",
        "results.json",
        "table.md",
        "per_roi.csv",
        "volumes_3d.csv",
        "prompts.json",
        "fig3_ct_small.png",
        "overlays_box_50.png",
        "overlays_point_50.png",
    ):
        assert (out / name).stat().st_size > 0, name

    rows = _read_csv(out / "results.csv")
    assert len(rows) == 2 * 10  # models x datasets x conditions
    assert {r["model"] for r in rows} == {"SAM 2", "SafeClick"}
    per_roi = _read_csv(out / "per_roi.csv")
    n_rois = int(rows[0]["n_rois"])
    assert n_rois > 10 and len(per_roi) == n_rois * 10 * 2
    assert all(int(r["n_rois"]) == n_rois for r in rows)  # every ROI got every condition
    # results.csv summarises per_roi.csv; per-ROI Dice is consistent with its pixel counts
    for r in rows:
        d = [float(p["dice"]) for p in per_roi if p["model"] == r["model"] and p["condition"] == r["condition"]]
        assert float(r["dice_mean"]) == pytest.approx(np.mean(d))
        assert float(r["dice_std"]) == pytest.approx(np.std(d))
    for p in per_roi[:50]:
        assert p["area"] != "0"
    summary = json.loads((out / "results.json").read_text())
    assert summary["run"]["devices"] == 2 and summary["split"] == "train"
    timing = {t["model"]: t for t in summary["timing"]}
    assert timing["SafeClick"]["overhead_vs"] == "SAM 2"
    assert timing["SafeClick"]["overhead_ratio"] == pytest.approx(
        timing["SafeClick"]["inference_ms_per_roi"] / timing["SAM 2"]["inference_ms_per_roi"]
    )
    assert all(t["inference_ms_per_roi"] > 0 for t in timing.values())
    # 3D Dice per volume and label: one volume, every label that has an ROI on the two slices
    vol = _read_csv(out / "volumes_3d.csv")
    labels = {int(p["label"]) for p in per_roi}
    assert {int(v["label"]) for v in vol} == labels and len(vol) == len(labels) * 10 * 2
    assert all(0.0 <= float(v["dice3d"]) <= 1.0 for v in vol)
    table = (out / "table.md").read_text()
    assert "| Improve (SafeClick vs SAM 2) |" in table
    assert table.count("**") >= 2 * 12  # a best value in every column
    # prompts are a pure function of (seed, ROI): the file matches the data pipeline's
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["seed"] == 0 and len(prompts["prompts"]) == n_rois * 10


@pytest.mark.slow
def test_evaluate_matches_image_predictor_and_is_device_count_invariant(ct_cache, tmp_path, sam2_tiny_dir):
    """Real Hiera-T (converted from a perturbed torch SAM 2.1) at 256 px: evaluate's per-ROI Dice
    equals Dice of ImagePredictor's masks (its own jax resize, prompt building and
    postprocessing), and 1 vs 2 devices give the same numbers."""
    from safeclick_jax import checkpoint
    from safeclick_jax.data import pipeline
    from safeclick_jax.evaluation import metrics
    from safeclick_jax.models.registry import build
    from safeclick_jax.predictor import ImagePredictor

    args = [
        "--checkpoint",
        sam2_tiny_dir,
        "--name",
        "tiny",
        "--cache_dir",
        ct_cache,
        "--split",
        "train",
        "--image_size",
        256,
        "--batch_size",
        2,
        "--max_slices",
        2,
        "--rois_per_call",
        4,
        "--num_overlays",
        0,
        "--overlay_conditions",
        "",
    ]
    _evaluate([*args, "--workdir", tmp_path / "d1"], devices=1)
    _evaluate([*args, "--workdir", tmp_path / "d2"], devices=2)
    r1, r2 = _read_csv(tmp_path / "d1" / "per_roi.csv"), _read_csv(tmp_path / "d2" / "per_roi.csv")
    key = lambda r: (r["roi_id"], r["condition"])
    d1 = {key(r): float(r["dice"]) for r in r1}
    d2 = {key(r): float(r["dice"]) for r in r2}
    assert d1.keys() == d2.keys()
    np.testing.assert_allclose([d1[k] for k in d1], [d2[k] for k in d1], atol=2e-3)

    desc, params, _ = checkpoint.load(sam2_tiny_dir)
    desc["sam2"]["image_size"] = 256
    model = build(desc, abstract=True)
    checkpoint.assign_params(model, params)
    pred = ImagePredictor(model, desc)
    prompts = json.loads((tmp_path / "d1" / "prompts.json").read_text())["prompts"]
    by = {(str(p["roi_id"]), p["condition"]): p for p in prompts}
    cache = pipeline.Cache(ct_cache)
    rows = {int(r["roi_id"]): r for r in cache.rois}
    checked = 0
    for roi_id in sorted({int(r["roi_id"]) for r in r1})[:3]:
        sample = cache.roi(rows[roi_id])
        pred.set_image(np.repeat(sample["image"][..., None], 3, axis=-1))
        for cond in ("point_50", "box_75"):
            p = by[(str(roi_id), cond)]
            if "point" in p:
                masks, iou, _ = pred.predict(point_coords=[p["point"]], point_labels=[1], multimask_output=True)
                mask = masks[int(np.argmax(iou))]
            else:
                masks, _, _ = pred.predict(box=p["box"], multimask_output=False)
                mask = masks[0]
            ours = d1[(str(roi_id), cond)]
            ref = metrics.dice(mask, sample["mask"])
            # the image resize differs in float rounding only (numpy vs jax, 2e-5): allow a few pixels
            assert ours == pytest.approx(ref, abs=0.02), (roi_id, cond)
            checked += 1
    assert checked == 6


@pytest.mark.slow
def test_evaluate_a_smoke_training_run(tmp_path):
    """train.py's smoke run (a SafeClick model on its synthetic data), evaluated from its workdir
    with the same config: the test split of the config's cache, the workdir resolved to export/,
    and the overhead ratio measured against the base network (no plain SAM 2 in the run)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    config = f"{ROOT / 'configs' / 'sam2_t.py'}:smoke"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", config, "--workdir", "w"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--config",
            config,
            "--checkpoint",
            "w",
            "--name",
            "smoke",
            "--workdir",
            "eval",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert summary["split"] == "test" and summary["models"][0]["kind"] == "safeclick"
    assert summary["models"][0]["directory"].endswith("export")
    assert summary["timing"][0]["overhead_ratio"] > 0
    assert all(r["n_rois"] > 0 for r in summary["results"])
