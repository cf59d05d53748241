"""Small model directories for the evaluation tests, written without eager Flax initialisation
(which takes minutes for a Hiera-T on 2 busy cores): the abstract model gives every variable's
path and shape, numpy fills them, checkpoint.save writes the directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx, traverse_util

from safeclick_jax import checkpoint
from safeclick_jax.models import registry
from safeclick_jax.models.config import get_config
from safeclick_jax.models.safeclick import SafeClickConfig

CT_SMALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_small"


def random_params(desc: dict, seed: int) -> dict:
    """Nested params for the model `desc` describes: norm scales ~1, biases ~0, weights scaled by
    1/sqrt(fan_in), so activations stay in a sane range through a deep random network."""
    model = registry.build(desc, abstract=True)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, var in nnx.state(model).flat_state():
        key = tuple(str(p) for p in path)
        shape, name = tuple(var.shape), key[-1]
        if name == "scale" or name == "weight":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            v = 0.05 * rng.standard_normal(shape)
        elif len(shape) == 0:
            v = np.asarray(1.0)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            v = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        flat[key] = np.asarray(v, dtype=var.dtype)
    return traverse_util.unflatten_dict(flat)


def write_sam2_dir(path, image_size: int = 128, seed: int = 0, name: str = "sam2.1_hiera_t") -> str:
    cfg = get_config(name).replace(image_size=image_size)
    desc = {"kind": "sam2", "sam2": cfg.to_dict()}
    checkpoint.save(str(path), desc, random_params(desc, seed))
    return str(path)


def write_safeclick_dir(path, base_dir, seed: int = 1) -> str:
    """SafeClick on the base's weights (as registry.from_sam2) with a random SafeClick head."""
    base_desc, base_params, _ = checkpoint.load(base_dir)
    desc = {"kind": "safeclick", "sam2": base_desc["sam2"], "safeclick": SafeClickConfig().to_dict()}
    params = random_params(desc, seed)
    params.update({k: v for k, v in base_params.items()})
    checkpoint.save(str(path), desc, params)
    return str(path)
