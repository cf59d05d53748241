"""The compiled model steps of the volume engine, shared by every session of a model.

The steps are module-level jitted functions of (ModelKey, weights, fixed-shape inputs): the slice
encoder, the prompt decoder, the tracking step and the memory encoder take slice features and
gathered bank entries of fixed shapes, so they compile once per model for every volume; only the
small gathers, writes and resizes compile per volume size. They compile per prompt-length bucket,
multimask or not, with or without memory, and per memory-slot bucket. `compile_counts()` says how
many versions of each are compiled (what the tests and benchmarks check).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from flax import nnx

from safeclick_jax import video
from safeclick_jax.image import preprocess


class ModelKey:
    """The static jit argument standing for a model's graph definition (nnx's GraphDef holds lists
    and has no hash). Keys are interned: equal graph definitions (several predictors, or two loads
    of one checkpoint) get the same key, so every compiled step below is shared by them."""

    _interned: dict = {}

    def __init__(self, graphdef):
        self.graphdef = graphdef

    @classmethod
    def of(cls, graphdef) -> "ModelKey":
        same = cls._interned.setdefault(hash(repr(graphdef)), [])
        for key in same:
            if key.graphdef == graphdef:
                return key
        same.append(cls(graphdef))
        return same[-1]


def fill_holes(logits: np.ndarray, max_area: int) -> np.ndarray:
    """sam2.utils.misc.fill_holes_in_mask_scores on one [h, w] map: background components
    (logit <= 0, 8-connected) of at most `max_area` pixels get the logit 0.1. SAM 2 runs it with
    a CUDA kernel (and silently skips it without one); here it runs on the host with scipy."""
    if max_area <= 0:
        return logits
    lab, n = scipy.ndimage.label(logits <= 0, structure=np.ones((3, 3), bool))
    if n == 0:
        return logits
    small = np.bincount(lab.ravel()) <= max_area
    small[0] = False
    return np.where(small[lab], np.float32(0.1), logits).astype(np.float32)


@partial(jax.jit, static_argnums=(1,))
def model_input(sl, size: int):
    """uint8 slice [H, W] -> the model's RGB input [1, S, S, 3]."""
    return preprocess(jnp.broadcast_to(sl[..., None], sl.shape + (3,)), size)


@partial(jax.jit, static_argnums=(0,))
def encode(key: ModelKey, state, image):
    model, _ = nnx.merge(key.graphdef, state)
    return video.encode_frame(model, image)


bank_entries = jax.jit(video.bank_entries, static_argnums=(5,))
write = jax.jit(video.write, static_argnums=(4,), donate_argnums=(0,))


@partial(jax.jit, static_argnums=(0,))
def track(key: ModelKey, state, feats, memory):
    model, mem = nnx.merge(key.graphdef, state)
    return video.track_step(model, mem, feats, *memory, model.cfg.image_size)


@partial(jax.jit, static_argnums=(0, 8))
def prompt(key: ModelKey, state, feats, memory, coords, labels, mask_in, has_mask, multimask: bool):
    """memory: the memory inputs of a slice that was tracked, None for one that was not."""
    model, mem = nnx.merge(key.graphdef, state)
    if memory is None:
        pix = video.no_memory_features(model, feats)
    else:
        pix = video.condition_features(model, mem, feats, *memory)
    return video.sam_heads(model, mem, feats, pix, coords, labels, mask_in, has_mask, multimask)


@partial(jax.jit, static_argnums=(0,))
def mask_prompt(key: ModelKey, state, feats, mask_hr):
    model, mem = nnx.merge(key.graphdef, state)
    return video.mask_as_output(model, mem, feats, mask_hr)


@partial(jax.jit, static_argnums=(0,))
def memory_features(key: ModelKey, state, feats, low, obj):
    model, mem = nnx.merge(key.graphdef, state)
    return video.encode_memory(mem, feats, low, obj, True, model.cfg.image_size)


@partial(jax.jit, static_argnums=(1,))
def resize(low, hw):
    # SAM 2's video-resolution output: bilinear, align_corners=False, no antialias
    return jax.image.resize(low, (low.shape[0],) + hw, "linear", antialias=False)


@partial(jax.jit, static_argnums=(1,))
def mask_to_input(mask, size: int):
    # add_new_mask: bilinear antialiased resize to the model's input, then >= 0.5
    return jax.image.resize(mask.astype(jnp.float32), (size, size), "linear", antialias=True) >= 0.5


STEPS = {
    "model_input": model_input,
    "encode": encode,
    "bank_entries": bank_entries,
    "write": write,
    "track": track,
    "prompt": prompt,
    "mask_prompt": mask_prompt,
    "memory_features": memory_features,
    "resize": resize,
    "mask_to_input": mask_to_input,
}


def compile_counts() -> dict[str, int]:
    """How many versions of each step are compiled in this process (all models, all volumes)."""
    return {name: int(fn._cache_size()) for name, fn in STEPS.items()}
