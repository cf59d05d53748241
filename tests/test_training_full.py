"""The variant `full` (task `clips`: the whole model on clips, training/clip_task.py): a smoke run,
its exact resume after SIGKILL, its export opened by the volume engine; bad input stops it in one
line, exit 2, before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmd(workdir, data_dir, *extra):
    return [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/sam2_t.py") + ":smoke,full",
        "--workdir", str(workdir), f"--config.data.roots=('{data_dir / 'synth'}',)",
        f"--config.data.synthetic_root={data_dir / 'synth'}", f"--config.data.cache_dir={data_dir / 'cache'}", *extra,
    ]  # fmt: skip


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    env.pop("XLA_FLAGS", None)
    return env


def _run(workdir, data_dir, *extra, timeout=600):
    return subprocess.run(
        _cmd(workdir, data_dir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(workdir):
    from flax import traverse_util

    from safeclick_jax import checkpoint

    _, params, extra = checkpoint.load(str(workdir))
    return {**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(extra)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("full_data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("full_ref")
    p = _run(wd, data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return wd, p.stdout


def test_smoke_run_trains_the_whole_model(reference):
    wd, out = reference
    losses = _losses(wd)
    assert sorted(losses) == list(range(1, 7))  # 2 epochs x 3 steps, log_every 1
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert "clips: 2 slices (set in the config) x up to 2 objects" in out
    assert "trainable (image_encoder, memory, prompt_encoder, mask_decoder, safeclick)" in out
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["task"] == "clips" and summary["steps"] == 6
    desc = json.loads((wd / "export" / "model.json").read_text())
    assert desc["training"]["task"] == "clips"
    # validation each epoch on the val split's fixed clips; best/ is the best of them
    assert "clips: validation on 8 fixed clips of 1 val volumes" in out
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "val_dice" in r}
    assert sorted(val) == [3, 6] and all(r["val_source"] == "val" and r["val_clips"] == 8 for r in val.values())
    assert all(0 <= r["val_dice"] <= 1 and np.isfinite(r["val_loss"]) for r in val.values())
    best = max(val, key=lambda s: (val[s]["val_dice"], -s))
    assert summary["best_step"] == best and summary["best_val_dice"] == val[best]["val_dice"]
    assert json.loads((wd / "best" / "model.json").read_text())["training"]["step"] == best


def test_export_is_propagated_by_the_volume_engine(reference):
    from safeclick_jax.inference import VolumePredictor

    wd, _ = reference
    p = VolumePredictor.from_checkpoint(str(wd / "export"))
    vol = np.random.default_rng(0).normal(0, 1, (40, 40, 6)).astype(np.float32)
    p.set_volume(vol)
    p.add_prompt(2, points=[[20, 20]], labels=[1])
    labels = p.propagate()
    assert labels.shape == (40, 40, 6) and set(np.unique(labels)) <= {0, 1}
    # the exported memory path is the trained one: most of its tensors moved from where they started
    from flax import traverse_util

    from safeclick_jax import checkpoint
    from safeclick_jax.models.config import SAM2Config
    from safeclick_jax.training.memory_init import MemorySource

    desc, _, extra = checkpoint.load(str(wd / "export"))
    start = MemorySource(None, "", None, None, 0)  # the run's start: random from init.seed 0
    start.check(SAM2Config.from_dict(desc["sam2"]))
    before, after = traverse_util.flatten_dict(start.extra()), traverse_util.flatten_dict(extra)
    assert before.keys() == after.keys()
    moved = [k for k in after if not np.array_equal(after[k], before[k])]
    assert len(moved) > len(after) // 2, (len(moved), len(after))


# two training processes (~1-3 min on 2 cores): exact resume is a promise of the clip task too
def test_resume_after_sigkill_equals_uninterrupted_run(reference, tmp_path, data_dir):
    ref_wd, _ = reference
    wd = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(wd, data_dir, "--config.debug.step_delay_s=1.0"),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 500
    try:
        while time.time() < deadline:  # kill once step 4 is logged and checkpoint 3 is committed
            m = wd / "metrics.jsonl"
            if (wd / "checkpoints" / "3").is_dir() and m.exists() and '"step": 4,' in m.read_text():
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    p = _run(wd, data_dir)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step 3 (best" in p.stdout
    ref, got = _losses(ref_wd), _losses(wd)
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-6)
    a, b = _weights(ref_wd), _weights(wd)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg="/".join(k))


def _one_error_line(p):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_model_directory_without_encoder_weights(tmp_path):
    from safeclick_jax import checkpoint
    from safeclick_jax.models.config import get_config

    cfg = get_config("sam2.1_hiera_t")
    params = {"sam_mask_decoder": {"iou_token": {"embedding": np.zeros((1, 256), np.float32)}}}
    checkpoint.save(str(tmp_path / "no_encoder"), {"kind": "sam2", "sam2": cfg.to_dict()}, params)
    wd = tmp_path / "w"
    line = _one_error_line(_run(wd, tmp_path, f"--config.init.checkpoint={tmp_path / 'no_encoder'}", timeout=120))
    assert "has no image encoder weights" in line and str(tmp_path / "no_encoder") in line
    assert not wd.exists() and not (tmp_path / "synth").exists()


def test_unknown_part(tmp_path):
    wd = tmp_path / "w"
    line = _one_error_line(_run(wd, tmp_path, "--config.train.parts=('image_encoder', 'hiera')", timeout=120))
    assert "train.parts: unknown part 'hiera'" in line
    assert not wd.exists()
