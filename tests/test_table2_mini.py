"""benchmarks/table2_mini.py end to end on a tiny schedule: the plumbing (one random encoder, two
fine-tunes, evaluate.py, table.md / summary.md), not the numbers. Slow: it converts and embeds a
full SAM 2.1 tiny (minutes on 2 busy cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_table2_mini_tiny_schedule(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks/table2_mini.py"), f"--out={out}", f"--workdir={work}"]
    cmd += [f"--root={tmp_path / 'abd'}", f"--cache-dir={tmp_path / 'cache'}", "--num-volumes=10"]
    cmd += ["--epochs=1", "--steps-per-epoch=2", "--eval-max-rois=2", "--max-slices=2", "--seed=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = (out / "table.md").read_text()
    for name in ("Zero-shot SAM 2", "| SAM 2 |", "SafeClick (SAM 2)", "Improve (SafeClick (SAM 2) vs SAM 2)"):
        assert name in table, name
    summary = (out / "summary.md").read_text()
    assert "| PP (point at the centre / tight box) |" in summary and "of 8 imperfect conditions" in summary
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 2 and len(res["dice"]["SAM 2"]) == 12
    # every fine-tuned model started from the one encoder: the stand-in when built, else a converted random one
    from safeclick_jax import standin

    encoder = standin.EXPORT if (ROOT / standin.EXPORT / "model.json").exists() else str(work / "encoder")
    for wd in ("baseline", "safeclick"):
        cfg = json.loads((work / wd / "config.json").read_text())
        assert cfg["init"]["checkpoint"] == encoder
        # --seed reaches everything that differs between seeds: the head's init, the PRNG, the data order
        assert (cfg["init"]["seed"], cfg["train"]["seed"], cfg["data"]["shuffle_seed"]) == (1, 1, 1)
