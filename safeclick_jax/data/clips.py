"""Clips for full SAM 2 training (safeclick_jax/training/full.py): T consecutive slices of a volume
with up to K of its objects, and the prompt plan SAM2Train draws for a batch of clips.

A volume here is the slice cache's pair (data/pipeline.py load_volume / Cache.volume_arrays):
`image` uint8 [N, H, W] and `labels` integer [N, H, W] (0 = background, every other value one
object), slices along the cache's axis.

- `sample_clip` follows sam2's RandomUniformSampler (training/dataset/vos_sampler.py): a uniform
  start among those whose first slice shows an object, then up to K of the objects visible there
  at random. Clips keep one shape: missing objects are empty masks with `valid` False.
- `prompt_plan` follows SAM2Train.prepare_prompt_inputs: mask or clicks (box or click) on 1..2
  initial conditioning frames, the frames that get corrective clicks, and the per-step "click from
  the GT" draws. The initial click / box come from the GT here (sam2_utils.get_next_point with no
  prediction, sample_box_points); corrective clicks depend on predictions and are drawn in the
  graph (step.error_click).
- `validation_plan` is the fixed plan of the clip task's validation: one positive click per object
  at its deepest point on the first frame (the zero-shot protocol's click), no corrections.

Bad input raises ClipError, one line naming the value (the training loop exits 2 on it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from safeclick_jax.data.pipeline import resize_nearest, sam2_image
from safeclick_jax.data.prompts import click_from_mask


class ClipError(ValueError):
    """A volume or setting that cannot give the clips asked for."""


def check_volume(labels: np.ndarray, num_frames: int, num_objects: int, name: str) -> np.ndarray:
    """Start slices whose first slice shows an object; ClipError when the clip is longer than the
    volume, when no T consecutive slices start with an object, or when K exceeds the label count."""
    n = labels.shape[0]
    if num_frames > n:
        raise ClipError(f"{name}: clip length {num_frames} is longer than the volume's {n} slices")
    count = len(np.setdiff1d(np.unique(labels), [0]))
    if num_objects > count:
        raise ClipError(f"{name}: {num_objects} objects per clip, but the volume has {count} labels")
    starts = np.flatnonzero(labels[: n - num_frames + 1].reshape(n - num_frames + 1, -1).any(axis=1))
    if not len(starts):
        raise ClipError(f"{name}: no object present in any {num_frames} consecutive slices")
    return starts


def sample_clip(
    rng, image, labels, num_frames: int, num_objects: int, image_size: int, name: str = "volume", min_pixels: int = 0
):
    """-> {"images" [T,S,S,3] float32 (normalised), "masks" [T,K,S,S] bool, "valid" [K] bool,
    "start", "objects" [K] label values (0 = padding)}. `min_pixels` > 0: only objects with at
    least that many pixels on the first slice at the image size are drawn (the largest one when
    none has), so that a clip does not ask for objects smaller than the decoder's output grid."""
    starts = check_volume(labels, num_frames, num_objects, name)
    start = int(rng.choice(starts))
    clip = labels[start : start + num_frames]
    visible = np.setdiff1d(np.unique(clip[0]), [0])
    if min_pixels > 0:
        first = resize_nearest(clip[0], image_size, image_size)
        area = np.array([(first == v).sum() for v in visible])
        visible = visible[area >= min_pixels] if (area >= min_pixels).any() else visible[[int(np.argmax(area))]]
    chosen = rng.choice(visible, min(len(visible), num_objects), replace=False)
    objects = np.zeros(num_objects, np.int64)
    objects[: len(chosen)] = chosen
    masks = np.zeros((num_frames, num_objects, image_size, image_size), bool)
    for t in range(num_frames):
        small = resize_nearest(clip[t], image_size, image_size)
        for k, obj in enumerate(chosen):
            masks[t, k] = small == obj
    images = np.stack([sam2_image(image[start + t], image_size) for t in range(num_frames)])
    return {"images": images, "masks": masks, "valid": objects > 0, "start": start, "objects": objects}


def box_from_mask(rng, mask: np.ndarray, noise: float = 0.1, noise_bound: float = 20.0) -> np.ndarray:
    """sam2_utils.sample_box_points: the mask's box (mask_to_box: x0, y0, x1, y1 of its pixels),
    each corner moved uniformly by up to noise x the box side (at most noise_bound px), clamped to
    the image. -> [2, 2] corners (x, y)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [w, h, -1, -1], np.float32)
    dx = min((box[2] - box[0]) * noise, noise_bound)
    dy = min((box[3] - box[1]) * noise, noise_bound)
    box = box + (2 * rng.random(4) - 1).astype(np.float32) * np.array([dx, dy, dx, dy], np.float32)
    box = np.clip(box, 0, np.array([w - 1, h - 1, w - 1, h - 1], np.float32))
    return box.reshape(2, 2)


def prompt_plan(rng, masks: np.ndarray, cfg) -> dict:
    """SAM2Train.prepare_prompt_inputs (training mode) for one batch: masks [T, N, S, S] bool (the
    objects of every clip). cfg: the prompt fields of the `full` config section. Returns the plan
    of full.py's module docstring (numpy)."""
    num_frames, n = masks.shape[:2]
    c = int(cfg.num_correction_pt_per_frame)
    prob_pt, num_init, num_correct = (
        float(cfg.prob_to_use_pt_input),
        int(cfg.num_init_cond_frames),
        int(cfg.num_frames_to_correct),
    )
    if num_frames == 1:  # image training: always clicks, on the one frame
        prob_pt, num_init, num_correct = 1.0, 1, 1
    num_init = min(num_init, num_frames)
    use_pt = bool(rng.random() < prob_pt)
    if cfg.rand_init_cond_frames and num_init > 1:
        num_init = int(rng.integers(1, num_init, endpoint=True))
    num_correct = min(num_correct, num_frames)
    if use_pt and cfg.rand_frames_to_correct and num_correct > num_init:
        num_correct = int(rng.integers(num_init, num_correct, endpoint=True))
    init = [0] + rng.choice(np.arange(1, num_frames), num_init - 1, replace=False).tolist()
    rest = [t for t in range(num_frames) if t not in init]
    coords = np.zeros((num_frames, n, 2, 2), np.float32)
    labels = np.full((num_frames, n, 2), -2, np.int32)
    if use_pt:
        for t in init:
            if rng.random() < float(cfg.prob_to_use_box_input):
                coords[t] = [box_from_mask(rng, m) for m in masks[t]]
                labels[t] = [2, 3]
            else:
                for i, m in enumerate(masks[t]):
                    coords[t, i, 0], labels[t, i, 0] = click_from_mask(rng, m)
    correct = []
    if use_pt:
        correct = init + rng.choice(rest, max(num_correct - num_init, 0), replace=False).tolist()
    return {
        "order": np.array(init + rest, np.int32),
        "init_cond": np.isin(np.arange(num_frames), init),
        "correct": np.isin(np.arange(num_frames), correct),
        "use_pt": np.bool_(use_pt),
        "coords": coords,
        "labels": labels,
        "from_gt": rng.random((num_frames, c)) < float(cfg.prob_to_sample_from_gt),
    }


def deepest_point(mask: np.ndarray) -> np.ndarray:
    """The deepest pixel of a 2D mask: the maximum of its Euclidean distance transform, the image
    border counting as boundary (ties: the first in row-major order). -> (x, y) float32."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([col, row], np.float32)


def validation_plan(masks: np.ndarray) -> dict:
    """The fixed plan of validation for masks [T, N, S, S] bool: frame 0 the one conditioning frame,
    a positive click at each object's deepest point there (an empty mask, a padding slot: a negative
    click at the centre, so every row has one point), no corrective clicks, frames in order."""
    num_frames, n, size = masks.shape[0], masks.shape[1], masks.shape[-1]
    coords = np.zeros((num_frames, n, 2, 2), np.float32)
    labels = np.full((num_frames, n, 2), -2, np.int32)
    for i, m in enumerate(masks[0]):
        present = bool(m.any())
        coords[0, i, 0] = deepest_point(m) if present else (size // 2, size // 2)
        labels[0, i, 0] = int(present)
    return {
        "order": np.arange(num_frames, dtype=np.int32),
        "init_cond": np.arange(num_frames) == 0,
        "correct": np.zeros(num_frames, bool),
        "use_pt": np.bool_(True),
        "coords": coords,
        "labels": labels,
        "from_gt": np.zeros((num_frames, 0), bool),
    }
