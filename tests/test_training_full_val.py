"""Validation of the clip task (training/clip_task.py): the fixed prompt plan, the Dice of the final
masks with padding slots left out, and the evaluation of the smoke model over the fixed val clips,
the same on every call."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from safeclick_jax import parallel
from safeclick_jax.data import clips
from safeclick_jax.training import full
from safeclick_jax.training.task import Env


def test_validation_plan_is_one_click_at_the_deepest_point_of_frame_0():
    masks = np.zeros((3, 2, 16, 16), bool)
    masks[:, 0, 2:7, 3:8] = True  # a 5 x 5 square: deepest at its centre, row 4, column 5
    plan = clips.validation_plan(masks)  # object 1: a padding slot (empty)
    np.testing.assert_array_equal(plan["coords"][0, 0, 0], [5, 4])  # (x, y)
    np.testing.assert_array_equal(plan["labels"][0], [[1, -2], [0, -2]])
    np.testing.assert_array_equal(plan["coords"][0, 1, 0], [8, 8])
    assert (plan["labels"][1:] == -2).all() and (plan["coords"][1:] == 0).all()
    np.testing.assert_array_equal(plan["order"], [0, 1, 2])
    np.testing.assert_array_equal(plan["init_cond"], [True, False, False])
    assert not plan["correct"].any() and bool(plan["use_pt"]) and plan["from_gt"].shape == (3, 0)


def test_final_dice_takes_the_last_step_the_chosen_output_and_skips_padding():
    """2 frames x 2 steps x 2 objects (B=1, K=2, the second a padding slot), 8 px masks from 4 px
    logits: on frame 0 only step 0 is valid and multimask picks output 2 (highest IoU of 1..3);
    on frame 1 step 1 is valid and single-mask output 0 counts."""
    size, h = 8, 4
    gt = np.zeros((1, 2, 2, size, size), bool)
    gt[0, :, 0, :4, :] = True  # object 0: the top half on both frames
    logits = np.full((2, 2, 2, 4, h, h), -10.0, np.float32)  # [T, 1+C, N, 4, h, w]
    logits[0, 0, 0, 2, :2, :] = 10.0  # frame 0 step 0 output 2: exact
    logits[0, 0, 0, 1] = 10.0  # output 1 (lower IoU): everything
    logits[1, 1, 0, 0, :, :] = 10.0  # frame 1 step 1 output 0: everything (Dice 2*32/(64+32) = 2/3)
    logits[1, 0, 0, 0, :2, :] = 10.0  # step 0 (not the last) would be exact
    logits[:, :, 1] = 10.0  # the padding slot predicts everything: Dice 0 if it were counted
    iou = np.zeros((2, 2, 2, 4), np.float32)
    iou[0, 0, :, 2] = 0.9
    out = {
        "masks": jnp.asarray(logits),
        "iou": jnp.asarray(iou),
        "multimask": jnp.array([[True, True], [False, False]]),
        "valid": jnp.array([[True, False], [True, True]]),
        "frame": jnp.array([0, 1]),
    }
    total, count = full.final_dice(out, jnp.asarray(gt), jnp.array([[True, False]]))
    assert float(count) == 2.0
    np.testing.assert_allclose(float(total), 1.0 + 2 / 3, rtol=1e-6)
    total, count = full.final_dice(out, jnp.asarray(gt), jnp.array([[True, True]]))
    assert float(count) == 4.0  # counted, the padding slot's Dice would be 0 on both frames
    np.testing.assert_allclose(float(total), 1.0 + 2 / 3, rtol=1e-6)


def _task(tmp_path: Path, val_clips: int, split_ratios=None):
    from safeclick_jax.training import loop
    from safeclick_jax.training.clip_task import ClipTask
    from safeclick_jax.training.task import Data

    config = common.make("sam2.1_hiera_t", "smoke,full")
    data = tmp_path / "data"
    config.data.roots = (str(data / "synth"),)
    config.data.synthetic_root = str(data / "synth")
    config.data.cache_dir = str(data / ("cache" if split_ratios is None else "cache_noval"))
    if split_ratios is not None:
        config.data.split_ratios = split_ratios
    config.clip.val_clips = val_clips
    config.compilation_cache_dir = ""
    mesh = parallel.make_mesh()
    env = Env(tmp_path, True, mesh, 1, 1, config.data.image_size, 2, 2)
    lines = []
    task = ClipTask(config, env)
    task.check(lines.append)
    loop.ensure_data(config.data, log=lines.append)
    model = task.build(lines.append)
    data = task.data(lines.append)
    if data.val_source is None:
        return task, data, None, lines
    optimizer, schedule = task.optimizer(10, lines.append)
    placed = loop._place(config, env, model, optimizer)
    steps = task.steps(model.graphdef, placed, optimizer, schedule, data)
    assert isinstance(data, Data)
    return task, data, (steps, placed), lines


@pytest.fixture(scope="module")
def smoke_task(tmp_path_factory):
    return _task(tmp_path_factory.mktemp("clipval"), val_clips=3)


def test_evaluation_is_fixed_and_counts_real_objects(smoke_task):
    task, data, (steps, placed), lines = smoke_task
    assert data.n_val == 3 and data.val_source == "val"
    assert any("validation on 3 fixed clips of 1 val volumes" in x for x in lines), lines
    first = steps.evaluate(placed.state["params"], placed.frozen)
    again = steps.evaluate(placed.state["params"], placed.frozen)
    assert first == again  # the same clips and prompts every time: bit-equal
    assert set(first) == {"val_dice", "val_loss", "val_clips", "val_objects"}
    assert 0.0 <= first["val_dice"] <= 1.0 and np.isfinite(first["val_loss"]) and first["val_loss"] > 0
    # 3 clips in 2 batches of 2 (the 4th slot all padding): the objects of clips 0..2, as sampled
    cache = task.config.data.cache_dir
    from safeclick_jax.data import pipeline

    c = pipeline.Cache(cache)
    vid = task.val_vids[0]
    image, labels = c.volume_arrays(vid)
    objects = sum(
        int(clips.sample_clip(np.random.default_rng([0, i]), image, labels, 2, 2, 64)["valid"].sum()) for i in range(3)
    )
    assert first["val_clips"] == 3 and first["val_objects"] == objects
    # other weights, other numbers: the evaluation reads the parameters it is given
    moved = jax.tree.map(lambda x: x * 1.5 if x.ndim == 2 else x, placed.state["params"])
    other = steps.evaluate(moved, placed.frozen)
    assert other["val_loss"] != first["val_loss"]


def test_empty_validation_split_is_one_line(tmp_path):
    _, data, _, lines = _task(tmp_path, val_clips=8, split_ratios=(0.8, 0.0, 0.2))
    assert data.val_source is None and data.n_val == 0
    said = [x for x in lines if x.startswith("clips: ") and "validation" in x]
    assert said == [
        "clips: the validation split is empty: training WITHOUT validation, the last checkpoint is kept as the best"
    ]
