"""Model checkpoints on disk: an orbax item with the weights plus a JSON description.

Layout of a model directory (written by `convert.sam2_to_flax` and by training's export):

    DIR/model.json   {"format": 1, "kind": "sam2" | "safeclick", "sam2": SAM2Config, ...}
    DIR/state/       orbax: {"params": {path...: array}, "extra": {torch key parts...: array}}

`params` holds every Param/Buffer of the Flax model under its attribute path (all keys strings).
`extra` carries checkpoint tensors the Flax model does not use yet (SAM 2's memory/video
modules), keyed by their torch key split on '.', so nothing from the source file is dropped.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

FORMAT = 1


def _str_keys(flat: dict) -> dict:
    return {tuple(str(p) for p in k): v for k, v in flat.items()}


def model_params(model: nnx.Module) -> dict:
    """Nested dict (string keys) of all of `model`'s variables as numpy arrays."""
    flat = {path: np.asarray(var[...]) for path, var in nnx.state(model).flat_state()}
    return traverse_util.unflatten_dict(_str_keys(flat))


def assign_params(model: nnx.Module, params: dict, where: str = "checkpoint") -> None:
    """Copies a nested `params` dict into `model` in place; every variable must be present with
    its exact shape, and no extra entry may be left over."""
    given = traverse_util.flatten_dict(params)
    state = nnx.state(model)
    flat = dict(state.flat_state())
    missing, mismatched, new = [], [], {}
    for path, var in flat.items():
        k = tuple(str(p) for p in path)
        if k not in given:
            missing.append("/".join(k))
            continue
        v = given[k]
        if tuple(v.shape) != tuple(var.shape):
            mismatched.append(f"{'/'.join(k)} {tuple(v.shape)} vs model {tuple(var.shape)}")
            continue
        new[path] = jax.numpy.asarray(v, dtype=var.dtype)
    unexpected = sorted("/".join(k) for k in set(given) - {tuple(str(p) for p in p_) for p_ in flat})
    if missing or mismatched or unexpected:
        raise ValueError(
            f"{where}: parameters do not fit the model: missing={missing} "
            f"mis-shaped={mismatched} unexpected={unexpected}"
        )
    state.replace_by_pure_dict(traverse_util.unflatten_dict(new), replace_fn=lambda var, val: var.replace(val))
    nnx.update(model, state)


def save(directory: str, description: dict[str, Any], params: dict, extra: dict | None = None) -> None:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    desc = {"format": FORMAT, **description}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "state"), {"params": params, "extra": extra or {}}, force=True)
    ckpt.wait_until_finished()
    if jax.process_index() == 0:  # multi-process training: every process saves (collective), one writes
        with open(os.path.join(directory, "model.json"), "w") as f:
            json.dump(desc, f, indent=2)


def resolve(directory: str) -> str:
    """A model directory, or a training workdir whose `export/` holds the latest exported model."""
    if not os.path.isfile(os.path.join(directory, "model.json")) and os.path.isfile(
        os.path.join(directory, "export", "model.json")
    ):
        return os.path.join(directory, "export")
    return directory


def read_description(directory: str) -> dict[str, Any]:
    directory = resolve(directory)
    path = os.path.join(directory, "model.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory}: not a safeclick-jax model directory (no model.json); "
            "convert a PyTorch checkpoint with `python -m convert.sam2_to_flax`"
        )
    with open(path) as f:
        desc = json.load(f)
    if desc.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {desc.get('format')!r} (expected {FORMAT})")
    return desc


def load(directory: str) -> tuple[dict[str, Any], dict, dict]:
    """Returns (description, params, extra) with numpy arrays."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(resolve(directory))
    desc = read_description(directory)
    state = ocp.StandardCheckpointer().restore(os.path.join(directory, "state"))
    to_np = lambda t: jax.tree.map(np.asarray, t)
    return desc, to_np(state.get("params", {})), to_np(state.get("extra", {}))
