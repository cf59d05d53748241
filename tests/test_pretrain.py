"""`make pretrain` end to end at smoke size: procedural data generated, the decoder phase (slice
task, encoder frozen), the image phase started from its export, the clip phase started from the
image phase's export, the stand-in's export opened by the volume engine
for the zero-shot protocol, the summary; then a rerun that skips the finished phases. The pipeline,
not the quality (the quality numbers come from `make pretrain` itself, benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("safeclick_jax.training.clip_task") is None,
    reason="needs the clip training task (issue 23)",
)


def test_smoke_pretraining_end_to_end(tmp_path):
    work = tmp_path / "standin"
    cmd = [sys.executable, "pretrain.py", "--smoke", f"--workdir={work}", "--max-cases=1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    decoder_cfg = json.loads((work / "decoder" / "config.json").read_text())
    image_cfg = json.loads((work / "image" / "config.json").read_text())
    clip_cfg = json.loads((work / "clip" / "config.json").read_text())
    assert decoder_cfg["init"]["checkpoint"] is None and decoder_cfg["task"]["name"] == "slices"
    assert decoder_cfg["train"]["parts"] == ["prompt_encoder", "mask_decoder"]
    assert image_cfg["init"]["checkpoint"] == str(work / "decoder" / "export")
    assert clip_cfg["init"]["checkpoint"] == str(work / "image" / "export")
    assert image_cfg["clip"]["num_frames"] == 1 and clip_cfg["clip"]["num_frames"] > 1
    assert clip_cfg["train"]["parts"] == ["memory"]
    desc = json.loads((work / "export" / "model.json").read_text())
    assert desc["kind"] == "sam2"
    for data in ("abdomen", "procedural"):
        rows = (work / f"zero_shot_{data}" / "zero_shot.csv").read_text().splitlines()
        assert len(rows) > 2
    summary = (work / "summary.md").read_text()
    assert all(f"| {phase} |" in summary for phase in ("decoder", "image", "clip"))
    assert "## Zero-shot on abdomen" in summary
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count("phase: done") == 3, again.stdout[-2000:]
