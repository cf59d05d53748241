"""The interactive engine without torch: several objects, the overlap rule, mask prompts, a
label map to start from, undo / redo, the feature cache, bounded re-propagation, and refused
calls that leave the session as it was. A randomly initialised tiny SAM 2 at 128 px (values
are not meaningful; what is checked is the engine's bookkeeping, exactly)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from safeclick_jax.inference import VolumePredictor
from safeclick_jax.models.config import get_config
from safeclick_jax.models.memory import MemoryConfig, SAM2Memory
from safeclick_jax.models.sam2 import SAM2Image

SIZE = 128
SHAPE = (30, 26, 6)  # the volume: 6 slices of 26 x 30 (rows x columns) along axis 2


@pytest.fixture(scope="module")
def predictor():
    cfg = get_config("sam2.1_hiera_t").replace(image_size=SIZE)
    model = SAM2Image(cfg, nnx.Rngs(0))
    # random weights give random object scores; the object is made present so masks carry values
    bias = model.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    bias[...] = bias[...] + 20.0
    return VolumePredictor(model, SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(1)))


def volume():
    return np.random.default_rng(0).integers(0, 400, SHAPE).astype(np.int16)


def square(hw, r0, r1, c0, c1):
    m = np.zeros(hw, bool)
    m[r0:r1, c0:c1] = True
    return m


def session(p):
    """Two mask objects and a click object, propagated."""
    p.set_volume(volume(), axis=2)
    p.add_mask(2, square(p.slice_hw, 3, 15, 4, 16), obj_id=1)
    p.add_mask(3, square(p.slice_hw, 8, 22, 10, 26), obj_id=2)
    p.add_prompt(4, points=[[12, 9]], labels=[1], obj_id=3)
    return p.propagate()


def snapshot(p):
    return (
        p.label_map(),
        {k: p.slice_logits(k) for k in p.object_ids},
        {k: p.history(k) for k in p.object_ids},
    )


def assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[2] == b[2]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])


def test_label_map_is_the_overlap_rule(predictor):
    p = predictor
    labels = session(p)
    assert p.object_ids == [1, 2, 3] and labels.shape == SHAPE and labels.dtype == np.uint8
    logits = np.stack([p.slice_logits(k) for k in p.object_ids])
    # SAM 2's _apply_non_overlapping_constraints: the highest logit keeps the voxel
    expect = np.where(logits.max(0) > 0, np.array([1, 2, 3], np.uint8)[logits.argmax(0)], 0)
    np.testing.assert_array_equal(labels, p.to_input_grid(expect.astype(np.uint8)))
    # the two masks overlap on slice 3 (object 2's prompt slice): there object 2's mask logit
    # (+10 inside its prompt) exceeds object 1's tracked logits where those are lower
    for k in p.object_ids:
        np.testing.assert_array_equal(p.object_mask(k), p.to_input_grid(p.slice_logits(k) > 0))
    both = p.object_mask(1) & p.object_mask(2)
    assert both.any(), "the test needs an overlap"
    assert set(np.unique(labels[both]).tolist()) <= {1, 2, 3}


@pytest.mark.parametrize("axis", [2, 0])
def test_label_slice_and_progress(predictor, axis):
    """label_slice(t) is the plane of label_map() that slice t is; propagation's progress ends at
    (slices, slices)."""
    p = predictor
    p.set_volume(volume(), axis=axis)
    n = p.num_slices
    h, w = p.slice_hw
    p.add_prompt(n // 2, points=[[w / 2, h / 2]], labels=[1], obj_id=1)
    p.add_prompt(n // 2 + 1, box=[0, 0, w / 2, h / 2], obj_id=2)
    calls = []
    labels = p.propagate(progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (n, n) and all(t == n for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert set(np.unique(labels).tolist()) >= {1, 2}
    for k in range(SHAPE[axis]):
        ijk = [0, 0, 0]
        ijk[axis] = k
        t = p.voxel_to_slice(ijk)[0]
        np.testing.assert_array_equal(p.label_slice(t), np.take(labels, k, axis=axis))


def test_mask_prompt_is_the_output(predictor):
    """add_new_mask: the mask is the slice's output (logits +-10 downsampled and upsampled)."""
    p = predictor
    p.set_volume(volume(), axis=2)
    m = square(p.slice_hw, 5, 20, 6, 24)
    out = p.add_mask(1, m, obj_id=7)
    assert (out == m).mean() > 0.97 and out[8:17, 9:21].all() and not out[:3].any()
    assert p.object_ids == [7] and p.label_map().max() == 7
    # a click on that slice afterwards refines it (the mask's logits as the dense prompt)
    p.add_prompt(1, points=[[10, 10]], labels=[0], obj_id=7)
    assert p.history(7) == ["mask on slice 1", "click on slice 1"]


def test_set_labels_starts_from_a_segmentation(predictor, tmp_path):
    p = predictor
    p.set_volume(volume(), axis=2)
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:20, 4:18, 1:5] = 3
    lab[8:25, 10:22, 3] = 9  # largest slice of label 9: z = 3; label 3's: z = 1 (first of equals)
    lab[8:25, 10:22, 2] = 9
    lab[9:12, 11:14, 2] = 0
    assert p.set_labels(lab) == [3, 9] and p.object_ids == [3, 9]
    assert p.history(3) == ["mask on slice 1 (initial labels)"]
    z9 = p.voxel_to_slice((10, 12, 3))[0]
    assert list(p.object_state(9).pending) == [z9]
    before = p.label_map()
    got = before[..., 3] == 9
    assert (got == (lab[..., 3] == 9)).mean() > 0.95
    p.propagate()
    assert set(np.unique(p.label_map()).tolist()) <= {0, 3, 9}
    p.undo()  # the propagation of both objects (one call)
    np.testing.assert_array_equal(p.label_map(), before)
    # every labelled slice as a mask prompt
    assert p.set_labels(lab, slices="all") == [3, 9]
    assert sorted(p.object_state(3).pending) == sorted(p.voxel_to_slice((6, 5, z))[0] for z in range(1, 5))
    # a NIfTI path: shape and affine are checked against the volume file
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume(), aff), str(tmp_path / "v.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "l.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.diag([1.0, 0.8, 2.0, 1.0])), str(tmp_path / "other.nii.gz"))
    p.set_volume(str(tmp_path / "v.nii.gz"), axis=2)
    assert p.set_labels(str(tmp_path / "l.nii.gz")) == [3, 9]
    state = snapshot(p)
    with pytest.raises(ValueError, match="affine"):
        p.set_labels(str(tmp_path / "other.nii.gz"))
    assert_same(snapshot(p), state)


def test_undo_redo(predictor):
    p = predictor
    first = session(p)
    s1 = snapshot(p)
    p.add_prompt(5, points=[[20, 15]], labels=[0], obj_id=1)
    s2 = snapshot(p)
    p.propagate()  # object 1 only: the one that changed
    s3 = snapshot(p)
    assert p.history(1)[-2:] == ["click on slice 5", "propagation from slice 5 (slices 0..5)"]
    assert p.history(2) == s1[2][2]  # untouched
    assert p.undo() == "propagation from slice 5 (slices 0..5) of object 1"
    assert_same(snapshot(p), s2)
    assert p.undo(1) == "click on slice 5 of object 1"
    assert_same(snapshot(p), s1)
    assert p.redo() == "click on slice 5 of object 1"
    assert p.redo(1).startswith("propagation")
    assert_same(snapshot(p), s3)
    with pytest.raises(ValueError, match="nothing to redo"):
        p.redo()
    # the first propagation was one call over three objects: one global undo takes all of it
    p.undo(), p.undo()
    assert p.undo() == ", ".join(f"propagation from slice 2 (slices 0..5) of object {k}" for k in (1, 2, 3))
    for k in (1, 2, 3):
        assert not p.object_state(k).tracked and p.object_state(k).pending
    p.redo()
    np.testing.assert_array_equal(p.label_map(), first)
    # reset of one object is undoable; reset_all forgets everything
    p.reset_object(2)
    assert not p.object_mask(2).any() and p.undo(2) == "reset of object 2"
    np.testing.assert_array_equal(p.label_map(), first)
    p.remove_object(3)
    assert p.object_ids == [1, 2] and not (p.label_map() == 3).any()
    p.reset_all()
    assert p.object_ids == [] and not p.label_map().any()


def test_replayed_interactions_give_the_same_session(predictor):
    """The JSON of a session's interactions, replayed on a fresh engine on the same volume, gives
    the same label map, logits and histories (what a saved session resumes from)."""
    import json

    p = predictor
    p.set_volume(volume(), axis=2)
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:20, 4:18, 1:4] = 4
    p.set_labels(lab)
    p.add_mask(2, square(p.slice_hw, 3, 15, 4, 16), obj_id=1)
    p.add_prompt(4, points=[[12, 9]], labels=[1], obj_id=3)
    p.add_prompt(1, box=[2, 2, 20, 15], obj_id=5)
    p.propagate()
    p.add_prompt(5, points=[[20, 15]], labels=[0], obj_id=1)
    p.propagate(max_slices=2)
    p.undo(), p.redo()
    p.reset_object(3)
    p.undo(3)
    p.remove_object(p.add_object())
    with pytest.raises(ValueError):
        p.undo(9)  # refused: not recorded
    state = snapshot(p)
    log = json.loads(json.dumps(p.interactions))
    calls = [e["call"] for e in log]
    assert calls == ["set_labels", "add_mask", "add_prompt", "add_prompt", "propagate", "add_prompt", "propagate"] + [
        "undo",
        "redo",
        "reset_object",
        "undo",
        "add_object",
        "remove_object",
    ]
    other = VolumePredictor(p.model, p.memory)
    other.set_volume(volume(), axis=2)
    done = []
    other.replay(log, progress=lambda i, n: done.append((i, n)))
    assert done[-1] == (len(log), len(log))
    assert_same(snapshot(other), state)
    assert json.loads(json.dumps(other.interactions)) == log
    with pytest.raises(ValueError, match="interaction 0: 'eval' is not a recorded call"):
        other.replay([{"call": "eval", "args": {}}])


def test_cache_encodes_each_slice_once_and_lru_keeps_results(predictor):
    p = predictor
    session(p)
    info = p.cache_info()
    assert info["misses"] == SHAPE[2] and info["cached_slices"] == SHAPE[2] and info["evictions"] == 0
    e = p.cfg.embedding_size
    assert info["bytes_per_slice"] == 4 * (e * e * 256 + 16 * e * e * 32 + 4 * e * e * 64)  # fp32 pix + high-res
    p.add_prompt(1, points=[[8, 8]], labels=[1], obj_id=2)
    ref = p.propagate()
    assert p.cache_info()["misses"] == SHAPE[2]  # the correction re-used every slice's features
    # a budget of two slices: evictions and re-encoding, the same results
    p.set_cache_budget(2 * info["bytes_per_slice"])
    session(p)
    p.add_prompt(1, points=[[8, 8]], labels=[1], obj_id=2)
    np.testing.assert_array_equal(p.propagate(), ref)
    small = p.cache_info()
    assert small["cached_slices"] == 2 and small["evictions"] > 0 and small["misses"] > SHAPE[2]
    p.set_cache_budget(None)


def test_bounded_repropagation_keeps_the_other_slices(predictor):
    p = predictor
    session(p)
    before = p.slice_logits(3)
    p.add_prompt(1, points=[[5, 20]], labels=[1], obj_id=3)
    p.propagate(max_slices=1)  # slices 0..2 around slice 1
    after = p.slice_logits(3)
    np.testing.assert_array_equal(after[3:], before[3:])
    assert not np.array_equal(after[:3], before[:3])
    assert p.history(3)[-1] == "propagation from slice 1 (slices 0..2)"
    p.propagate(obj_ids=[1], start=4, max_slices=0)
    assert p.history(1)[-1] == "propagation from slice 4 (slices 4..4)"


def test_refused_calls_keep_the_session(predictor, tmp_path):
    p = predictor
    session(p)
    p.add_object(5)  # an object without prompts
    state = snapshot(p)
    hw = p.slice_hw
    bad = [
        (lambda: p.add_prompt(1, points=[[1, 1]], labels=[1], obj_id=0), "object id 0"),
        (lambda: p.add_prompt(1, points=[[1, 1]], labels=[1], obj_id=256), "object id 256"),
        (lambda: p.undo(9), "unknown object id 9"),
        (lambda: p.remove_object(9), "unknown object id 9"),
        (lambda: p.reset_object(9), "unknown object id 9"),
        (lambda: p.object_mask(4), "unknown object id 4"),
        (lambda: p.propagate(obj_ids=[1, 9]), "unknown object id 9"),
        (lambda: p.propagate(obj_ids=[5]), "object 5 has no prompts"),
        (lambda: p.add_object(2), "object id 2 exists"),
        (lambda: p.undo(5), "nothing to undo for object 5"),
        (lambda: p.redo(1), "nothing to redo for object 1"),
        (lambda: p.add_mask(1, np.ones((hw[0] + 1, hw[1]), bool), obj_id=1), r"shape \(27, 30\)"),
        (lambda: p.add_mask(1, np.full(hw, 0.5), obj_id=1), r"binary .* \[0.5\]"),
        (lambda: p.add_mask(1, np.zeros(hw, np.uint8), obj_id=1), "empty"),
        (lambda: p.add_mask(1, square(hw, 1, 5, 1, 5), obj_id=300), "object id 300"),
        (lambda: p.add_prompt(6, points=[[1, 1]], labels=[1]), "slice 6 outside the volume"),
        (lambda: p.add_prompt(1, points=[[31, 1]], labels=[1]), r"prompt at \[31.0, 1.0\] lies outside"),
        (lambda: p.add_prompt(1, box=[-1, 0, 5, 5]), r"prompt at \[-1.0, 0.0\] lies outside"),
        (lambda: p.add_prompt(1, points=[[1, 1]], labels=[2]), r"labels must be 0 .* \[2\]"),
        (lambda: p.propagate(start=-1), "slice -1 outside"),
        (lambda: p.propagate(max_slices=-2), "max_slices -2"),
        (lambda: p.voxel_to_slice((0, 26, 0)), "outside the volume"),
        (lambda: p.set_labels(np.zeros((30, 26, 5), np.uint8)), r"shape \(30, 26, 5\)"),
        (lambda: p.set_labels(np.full(SHAPE, 1.5)), "non-integer"),
        (lambda: p.set_labels(np.full(SHAPE, 300, np.int32)), r"labels must be in 0..255, got \[300\]"),
        (lambda: p.set_labels(np.zeros(SHAPE, np.uint8)), "empty"),
        (lambda: p.set_cache_budget(1000), "cache_bytes 1000 is smaller than one slice"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
        assert_same(snapshot(p), state)
    assert p.object_ids == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="smaller than one slice"):
        VolumePredictor(p.model, p.memory, cache_bytes=10)


def test_predictors_of_one_model_share_compiled_steps(predictor):
    """Predictors of one model (or of an equal one: same graph, other weights) share the compiled
    steps: a second predictor on a volume of another size compiles no model step again."""
    from safeclick_jax.inference.steps import compile_counts

    p = predictor
    p.set_volume(volume(), axis=2)
    p.add_prompt(2, points=[[5, 5]], labels=[1], obj_id=1)
    cfg = p.model.cfg
    other = VolumePredictor(SAM2Image(cfg, nnx.Rngs(5)), SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(6)))
    assert other.model_key is p.model_key
    compiled = [compile_counts()[k] for k in ("encode", "prompt")]
    other.set_volume(volume()[:, :20, :5], axis=2)
    other.add_prompt(2, points=[[5, 5]], labels=[1], obj_id=1)
    assert [compile_counts()[k] for k in ("encode", "prompt")] == compiled
