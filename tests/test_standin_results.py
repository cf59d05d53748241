"""benchmarks/standin_results.py (`make standin-results`): the numbers it derives from each run's
files, and the command end to end with --quick (tiny schedules on a smoke-sized model). The
pipeline, not the quality: the quality numbers come from the command on the real stand-in."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import standin_results as sr  # noqa: E402


def test_table2_numbers_drop_gain_and_consensus_path():
    # the 12 columns of report.COLUMNS: point PP, 4 point IP, point IP avg, box PP, 4 box IP, box IP avg
    base = [70.0, 68.0, 60.0, 55.0, 52.0, 58.75, 80.0, 50.0, 70.0, 75.0, 60.0, 63.75]
    cand = [71.0, 70.0, 66.0, 60.0, 58.0, 63.5, 81.0, 60.0, 72.0, 77.0, 66.0, 68.75]
    cp = {"SafeClick (SAM 2)": {"f_conv_max_abs": 0.02, "f_conv_frobenius": 0.5, "alpha": 0.99}}
    res = {"dice": {"SAM 2": base, "SafeClick (SAM 2)": cand}, "consensus_path": cp, "steps": 10}
    out = sr.table2_numbers({**res, "rois": 9, "image_size": 128})
    assert out["sam2_drop"] == {"point": 18.0, "box": 30.0}
    assert out["gain_ip"] == pytest.approx({"point": 4.75, "box": 5.0})
    assert out["models"]["SAM 2"] == {"point_pp": 70.0, "point_ip": 58.75, "box_pp": 80.0, "box_ip": 63.75}
    assert out["consensus_path"] == cp


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def protocol_files(out: Path, gated_nsd: float) -> None:
    """Two labels of one case over the six steps: mean Dice 0.1 at step 1 (gated), 0.6 after."""
    rows, cases, noc = [], [], []
    for step in range(1, 7):
        d = 0.1 if step == 1 else 0.6
        for label in (1, 2):
            rows.append(dict(model="M", dataset="abd", case="c0", label=label, step=step, dsc=d, nsd=0.5, seconds=1.0))
        nsd = gated_nsd if step == 1 else 0.5
        cases.append(dict(model="M", dataset="abd", case="c0", step=step, labels=2, dsc=d, nsd=nsd, seconds=1.0))
    for roi in range(2):
        noc.append(dict(model="M", dataset="abd", roi_id=roi, noc_85=3 + roi, reached_85=True, noc_90=20, reached_90=0))
    write_csv(out / "interactive.csv", rows)
    write_csv(out / "interactive_cases.csv", cases)
    write_csv(out / "noc.csv", noc)


def test_protocol_numbers_and_the_nsd_gate_check(tmp_path):
    protocol_files(tmp_path, gated_nsd=0.0)
    res = sr.protocol_numbers(tmp_path)
    m = res["models"]["M"]
    # steps 2-6 score DSC 0.6 / NSD 0.5: trapezoids over the five click steps are 4 x 0.6, 4 x 0.5
    assert m["dsc_auc"] == pytest.approx(2.4) and m["nsd_auc"] == pytest.approx(2.0)
    assert m["final_dsc"] == pytest.approx(0.6) and m["cases"] == 1 and m["labels"] == 2
    assert m["noc_85"] == pytest.approx(3.5) and m["fail_90"] == 2
    assert res["nsd_gate"] == {"case_steps": 6, "at_or_below_0.2": 1, "their_nsd_all_zero": True}
    protocol_files(tmp_path, gated_nsd=0.4)  # a per-label gate would leave NSD here
    assert sr.protocol_numbers(tmp_path)["nsd_gate"]["their_nsd_all_zero"] is False


def test_summary_refuses_a_nan():
    with pytest.raises(SystemExit, match=r"summary.demo.dice_3d = nan"):
        sr.check_finite({"demo": {"dice_3d": float("nan"), "memory": "x"}})


def check_summary(out: Path, parts: tuple[str, ...]) -> dict:
    s = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    for key in parts:
        assert key in s, key
    if "demo" in parts:
        d = s["demo"]
        assert d["shape"][2] >= 40 and 0 <= d["click_voxel"][2] < d["shape"][2]
        for k in ("dice_2d", "dice_3d", "slice_dice_min", "slice_dice_median"):
            assert 0.0 <= d[k] <= 1.0, k
        assert d["memory"] == "the model directory's own"  # make train's export carries the stand-in's
        assert "## The demo" in md and "| 3D Dice |" in md
    if "table2" in parts:
        r = s["table2"]["seed0"]
        assert set(r["models"]) == {
            "Zero-shot SAM 2",
            "SAM 2",
            "SafeClick (SAM 2)",
            "SafeClick w/o E1",
            "SafeClick w/o E2",
            "SafeClick w/o CRL",
        }
        for v in r["models"].values():
            assert all(0.0 <= x <= 100.0 for x in v.values())
        assert all(-100.0 <= x <= 100.0 for x in [*r["sam2_drop"].values(), *r["gain_ip"].values()])
        assert r["consensus_path"]["SafeClick w/o E1"]["alpha"] is None
        cp = r["consensus_path"]["SafeClick (SAM 2)"]
        assert 0.0 < cp["f_conv_max_abs"] < 1.0 and math.isfinite(cp["alpha"])
        assert "| seed0 | SafeClick (SAM 2) |" in md
    if "protocol" in parts:
        p = s["protocol"]
        assert set(p["models"]) == set(sr.NAMES.values())
        for v in p["models"].values():
            assert 0.0 <= v["dsc_auc"] <= 4.0 and 0.0 <= v["nsd_auc"] <= 4.0
            assert 0.0 <= v["final_dsc"] <= 1.0 and 0.0 <= v["final_nsd"] <= 1.0
            assert 1.0 <= v["noc_85"] <= 20.0 and 1.0 <= v["noc_90"] <= 20.0
        assert p["nsd_gate"]["case_steps"] == 4 * 6 and p["nsd_gate"]["their_nsd_all_zero"] is True
    assert all(v > 0 for v in s["times_s"].values())
    return s


def run_quick(tmp_path, standin, *extra):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "benchmarks/standin_results.py", f"--standin={standin}", "--quick"]
    cmd += [f"--out={out}", f"--workdir={work}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_quick_demo_on_a_smoke_model(tmp_path):
    """The demo part on a smoke-sized SAM 2 with a memory path (one training step): make train's
    model on it, the click and the propagation with the app's engine, the summary."""
    model = tmp_path / "model"
    cmd = [sys.executable, "train.py", "--config=configs/sam2_t.py:smoke,baseline", f"--workdir={model}"]
    cmd += ["--config.train.total_steps=1", "--config.plot=False"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = run_quick(tmp_path, model / "export", "--parts=demo")
    s = check_summary(out, ("demo",))
    assert set(s["times_s"]) == {"demo"} and "## Table 2" not in (out / "summary.md").read_text()


@pytest.mark.slow
def test_quick_every_part_on_a_smoke_standin(tmp_path):
    """`python pretrain.py --smoke`, then every part with --quick: the demo, table2's seed 0 with
    the ablations, the full fine-tune and the interactive protocol with four models."""
    work = tmp_path / "standin"
    cmd = [sys.executable, "pretrain.py", "--smoke", f"--workdir={work}", "--max-cases=1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = run_quick(tmp_path, work / "export", "--ablations")
    check_summary(out, ("demo", "table2", "protocol"))
    # a rerun reuses the trained models and reports the time they took to train
    first = json.loads((out / "table2/seed0/results.json").read_text())["times_s"]
    out = run_quick(tmp_path, work / "export", "--ablations", "--parts=table2")
    again = json.loads((out / "table2/seed0/results.json").read_text())["times_s"]
    assert again["train SAM 2 (reused)"] == first["train SAM 2"]
    assert again["total with the reused training"] > first["train SAM 2"] + again["total"]
    assert check_summary(out, ("demo", "table2", "protocol"))["times_s"]["table2 seed0"] > first["train SAM 2"]
