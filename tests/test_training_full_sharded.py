"""The clip task (variant `full`) on several devices, the smoke model, in one subprocess each
(JAX_NUM_CPU_DEVICES=2):

- validation (default suite, a forward per setting): 3 fixed val clips in batches of 2 split over
  the `data` axis of 2 CPU devices, each clip with its objects on one device (the last batch half
  padding), give the 1-device val loss and Dice, with and without FSDP;
- train steps (slow: ~70 s of compilation each on 2 cores): a global batch of 2 clips on 2 devices
  gives the loss of the same batch on 1 device; FSDP (weights split over the devices) gives it
  too; bf16 compute runs and gives a finite loss near it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEPS = r"""
import json
import time

import jax
import numpy as np

from configs import common
from safeclick_jax import parallel
from safeclick_jax.data import clips
from safeclick_jax.training import loop
from safeclick_jax.training.clip_task import ClipTask, _device_inputs, _frame_major
from safeclick_jax.training.task import Data, Env

S, T, K = 64, 2, 2


def host_batch():
    # 2 clips of 2 slices, discs that move; clip 1's second object slot is padding
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    masks = np.zeros((2, T, K, S, S), bool)
    for b in range(2):
        for t in range(T):
            for k in range(K):
                cx, cy = 16 + 26 * k + 3 * t + 2 * b, 20 + 18 * b + 2 * t
                masks[b, t, k] = (xx - cx) ** 2 + (yy - cy) ** 2 < 80
    masks[1, :, 1] = False
    images = rng.normal(0, 1, (2, T, S, S, 3)).astype(np.float32)
    objects = np.array([[True, True], [True, False]])
    return {"images": images, "masks": masks, "objects": objects, "plan_seed": np.array([7, 7])}


def one_step(devices, **train):
    config = common.make("sam2.1_hiera_t", "smoke,full")
    config.compilation_cache_dir = ""
    # clicks, one corrective click drawn from the error in the graph; one conditioning frame
    config.clip.update(num_frames=T, max_objects=K, num_correction_pt_per_frame=1, prob_to_use_pt_input=1.0,
                       num_init_cond_frames=1)
    config.train.update(train)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (parallel.DATA_AXIS,))
    env = Env(None, True, mesh, devices, 1, S, 2, 2)
    task = ClipTask(config, env)
    quiet = lambda *a: None
    task.check(quiet)
    model = task.build(quiet)
    optimizer, schedule = task.optimizer(10, quiet)
    placed = loop._place(config, env, model, optimizer)
    steps = task.steps(model.graphdef, placed, optimizer, schedule, Data(None, 0, 0, None, "clips"))
    batch = host_batch()
    plan = clips.prompt_plan(np.random.default_rng(7), _frame_major(batch), task.config.clip)
    sharded, _ = _device_inputs(batch, plan, mesh)
    shards = sorted((s.device.id, list(s.data.shape)) for s in sharded["masks"].addressable_shards)
    t0 = time.perf_counter()
    _, m = steps.train(placed.state, placed.frozen, batch)
    m = jax.device_get(m)
    print(f"{devices} devices {train}: {time.perf_counter() - t0:.1f} s", flush=True)
    split = parallel.sharded_fraction(placed.state_sharding, placed.state)[0]
    return {"loss": float(m["loss"]), "finite": bool(m["finite"]), "shards": shards, "split": split,
            "plan_corrects": int(plan["correct"].sum())}


out = {
    "one": one_step(1),
    "two": one_step(2),
    "fsdp": one_step(2, fsdp=True, fsdp_min_size=256),
    "bf16": one_step(2, compute_dtype="bfloat16"),
}
print("RESULT " + json.dumps(out))
"""


VALIDATION = r"""
import json
import sys

import jax
import numpy as np

from configs import common
from safeclick_jax import parallel
from safeclick_jax.training import loop
from safeclick_jax.training.clip_task import ClipTask
from safeclick_jax.training.task import Env

root = sys.argv[1]


def validate(devices, **train):
    config = common.make("sam2.1_hiera_t", "smoke,full")
    config.compilation_cache_dir = ""
    config.data.update(roots=(f"{root}/synth",), synthetic_root=f"{root}/synth", cache_dir=f"{root}/cache")
    config.clip.val_clips = 3
    config.train.update(train)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (parallel.DATA_AXIS,))
    env = Env(None, True, mesh, devices, 1, 64, 2, 2)
    task = ClipTask(config, env)
    quiet = lambda *a: None
    task.check(quiet)
    loop.ensure_data(config.data, log=quiet)
    model = task.build(quiet)
    data = task.data(quiet)
    optimizer, schedule = task.optimizer(10, quiet)
    placed = loop._place(config, env, model, optimizer)
    steps = task.steps(model.graphdef, placed, optimizer, schedule, data)
    split = parallel.sharded_fraction(placed.state_sharding, placed.state)[0]
    return {**steps.evaluate(placed.state["params"], placed.frozen), "split": split}


out = {"one": validate(1), "two": validate(2), "fsdp": validate(2, fsdp=True, fsdp_min_size=256)}
print("RESULT " + json.dumps(out))
"""


def _child(code, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def results():
    return _child(STEPS)


@pytest.fixture(scope="module")
def val_results(tmp_path_factory):
    return _child(VALIDATION, str(tmp_path_factory.mktemp("sharded_val")))


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_validation_on_two_devices_with_and_without_fsdp_equals_one_device(val_results):
    one = val_results["one"]
    assert one["val_clips"] == 3 and one["val_objects"] >= 3 and one["split"] == 0
    assert val_results["fsdp"]["split"] >= 10
    for name in ("two", "fsdp"):
        got = val_results[name]
        assert got["val_objects"] == one["val_objects"], name
        assert _rel(got["val_loss"], one["val_loss"]) <= 1e-5, (name, got["val_loss"], one["val_loss"])
        assert abs(got["val_dice"] - one["val_dice"]) <= 1e-6, (name, got["val_dice"], one["val_dice"])


@pytest.mark.slow
def test_two_devices_split_the_clips_and_equal_one_device(results):
    one, two = results["one"], results["two"]
    assert one["plan_corrects"] >= 1  # the step draws corrective clicks from the error in the graph
    # 1 device holds the batch; on 2 each holds one whole clip: [1, T, K, S, S], its K objects together
    assert one["shards"] == [[0, [2, 2, 2, 64, 64]]]
    assert two["shards"] == [[0, [1, 2, 2, 64, 64]], [1, [1, 2, 2, 64, 64]]]
    assert one["finite"] and two["finite"] and one["loss"] > 0
    assert _rel(two["loss"], one["loss"]) <= 1e-5, (two["loss"], one["loss"])


@pytest.mark.slow
def test_fsdp_splits_the_weights_and_equals_one_device(results):
    one, fsdp = results["one"], results["fsdp"]
    assert results["two"]["split"] == 0 and fsdp["split"] >= 10  # arrays of the train state split over 2
    assert fsdp["finite"]
    assert _rel(fsdp["loss"], one["loss"]) <= 1e-5, (fsdp["loss"], one["loss"])


@pytest.mark.slow
def test_bf16_compute_runs_with_a_finite_loss(results):
    one, bf16 = results["one"], results["bf16"]
    assert bf16["finite"]
    assert _rel(bf16["loss"], one["loss"]) <= 0.05, (bf16["loss"], one["loss"])  # bf16 rounding, not another loss
