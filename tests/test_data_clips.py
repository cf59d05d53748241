"""Clips and prompt plans for full training (safeclick_jax/data/clips.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from safeclick_jax.data.clips import ClipError, box_from_mask, click_from_mask, prompt_plan, sample_clip

PROMPTS = dict(
    prob_to_use_pt_input=0.5, prob_to_use_box_input=0.5, num_init_cond_frames=2, rand_init_cond_frames=True,
    num_frames_to_correct=2, rand_frames_to_correct=True, num_correction_pt_per_frame=3, prob_to_sample_from_gt=0.1,
)  # fmt: skip


def volume(n=6, objects=(1, 2, 3), empty=()):
    labels = np.zeros((n, 40, 40), np.uint8)
    for t in range(n):
        if t in empty:
            continue
        for i, v in enumerate(objects):
            labels[t, 5 + 10 * i : 12 + 10 * i, 8 : 20 + t] = v
    image = (labels * 60).astype(np.uint8)
    return image, labels


def test_clip_shapes_objects_and_start():
    image, labels = volume(empty=(0, 1, 5))
    rng = np.random.default_rng(0)
    for _ in range(10):
        clip = sample_clip(rng, image, labels, 3, 2, 32)
        assert clip["images"].shape == (3, 32, 32, 3) and clip["masks"].shape == (3, 2, 32, 32)
        assert clip["start"] in (2, 3)  # the first slice must show an object
        assert clip["valid"].all() and len(set(clip["objects"])) == 2
        assert clip["masks"][0].reshape(2, -1).any(axis=1).all()


def test_fewer_objects_than_k_are_padding():
    image, labels = volume()
    labels[:5][labels[:5] == 3] = 0  # object 3 only on the last slice: never on a clip's first
    clip = sample_clip(np.random.default_rng(1), image, labels, 2, 3, 32)
    assert clip["valid"].tolist() == [True, True, False] and not clip["masks"][:, 2].any()


def test_min_pixels_draws_only_large_objects_or_the_largest():
    image, labels = volume()
    labels[0][labels[0] == 2] = 0
    labels[0, 15:17, 8:10] = 2  # object 2: 4 pixels of 40x40 on the first slice -> 2-3 at 32 px
    rng = np.random.default_rng(0)
    for _ in range(10):
        clip = sample_clip(rng, image, labels[:3], 3, 3, 32, min_pixels=20)
        assert sorted(clip["objects"][clip["valid"]].tolist()) == [1, 3]
    labels[0][labels[0] != 2] = 0  # only the small object left: it is drawn anyway
    clip = sample_clip(rng, image, labels[:3], 3, 3, 32, min_pixels=20)
    assert clip["objects"].tolist() == [2, 0, 0]


@pytest.mark.parametrize(
    "t, k, empty, match",
    [
        (7, 2, (), "clip length 7 is longer than the volume's 6 slices"),
        (2, 4, (), "4 objects per clip, but the volume has 3 labels"),
        (3, 1, (0, 1, 2, 3), "no object present in any 3 consecutive slices"),
    ],
)
def test_bad_input_is_one_line_naming_the_value(t, k, empty, match):
    image, labels = volume(empty=empty)
    with pytest.raises(ClipError, match=match):
        sample_clip(np.random.default_rng(0), image, labels, t, k, 32, name="vol7")


def test_prompt_plan_follows_sam2_train():
    rng = np.random.default_rng(0)
    cfg = types.SimpleNamespace(**PROMPTS)
    masks = np.zeros((4, 2, 32, 32), bool)
    masks[:, :, 8:20, 10:24] = True
    seen_pt, seen_mask, seen_two = 0, 0, 0
    for _ in range(40):
        p = prompt_plan(rng, masks, cfg)
        init = np.flatnonzero(p["init_cond"])
        assert p["order"][0] == 0 and sorted(p["order"]) == [0, 1, 2, 3]
        assert list(p["order"][: len(init)]) == [0] + [t for t in p["order"][1 : len(init)]]
        assert set(p["order"][: len(init)]) == set(init) and 1 <= len(init) <= 2
        assert p["from_gt"].shape == (4, 3)
        if p["use_pt"]:
            seen_pt += 1
            assert p["correct"][init].all() and 1 <= p["correct"].sum() <= 2
            for t in init:
                lab = p["labels"][t, 0].tolist()
                assert lab in ([1, -2], [2, 3])
        else:
            seen_mask += 1
            assert not p["correct"].any() and (p["labels"] == -2).all()
        seen_two += len(init) == 2
    assert seen_pt > 5 and seen_mask > 5 and seen_two > 5
    image_plan = prompt_plan(rng, masks[:1], cfg)  # T = 1: image training, always clicks
    assert image_plan["use_pt"] and image_plan["correct"].tolist() == [True]


def test_initial_click_and_box_come_from_the_mask():
    rng = np.random.default_rng(0)
    m = np.zeros((32, 32), bool)
    m[10:20, 5:25] = True
    (x, y), label = click_from_mask(rng, m)
    assert label == 1 and m[int(y), int(x)]
    (x, y), label = click_from_mask(rng, np.zeros_like(m))
    assert label == 0
    box = box_from_mask(rng, m)
    # corners within noise 0.1 x side of the mask's box (x 5..24, y 10..19)
    assert np.all(np.abs(box - [[5, 10], [24, 19]]) <= [[1.9, 0.9], [1.9, 0.9]])
