"""The one generic weight map between PyTorch state_dicts and Flax NNX modules.

Flax attribute paths mirror torch keys (safeclick_jax/models/layers.py), so a key maps by rule:
  Linear.weight (O,I)         <-> kernel (I,O)           transpose
  Conv2d.weight (O,I,kh,kw)   <-> kernel (kh,kw,I,O)     transpose(2,3,1,0)
  ConvTranspose2d (I,O,kh,kw) <-> kernel (kh,kw,O,I)     same transpose (flax transpose_kernel=True)
  LayerNorm.weight            <-> scale
  Embedding.weight            <-> embedding
  anything else (biases, free tensors, buffers) keeps its name and layout.
Both directions are pure transposes, so torch -> flax -> torch is bit-exact.

It lives in the package (numpy + flax only, no torch) because the package itself loads tensors
kept in torch layout: the memory/video modules load from a model directory's `extra` item.
The converters and tests import it from here too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
from flax import nnx, traverse_util

_RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class WeightMapError(ValueError):
    """A state_dict does not fit a model: lists every missing, unexpected or mis-shaped key."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), where: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"state_dict does not match the model{(' ' + where) if where else ''}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(
                f"  mis-shaped keys ({len(self.mismatched)}): "
                + ", ".join(f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.mismatched)
            )
        super().__init__("\n".join(lines))


def torch_key(path: tuple) -> str:
    *head, leaf = (str(p) for p in path)
    return ".".join(head + [_RENAME.get(leaf, leaf)])


def to_flax_layout(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if w.ndim == 2:
            return w.T
        if w.ndim == 4:
            return w.transpose(2, 3, 1, 0)
    return w


def to_torch_layout(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if w.ndim == 2:
            return w.T
        if w.ndim == 4:
            return w.transpose(3, 2, 0, 1)
    return w


def model_keys(model: nnx.Module, prefix: str = "") -> dict[str, tuple]:
    """torch key -> flax path, for every Param/Buffer of `model`."""
    return {prefix + torch_key(p): p for p, _ in nnx.state(model).flat_state()}


def load_state_dict(
    model: nnx.Module, sd: Mapping[str, np.ndarray], prefix: str = "", strict: bool = True, where: str = ""
) -> list[str]:
    """Copy `sd[prefix + key]` into `model` in place. Returns the keys of `sd` under `prefix` that
    the model does not have (an error when strict). Missing and mis-shaped keys always raise."""
    state = nnx.state(model)
    flat = dict(state.flat_state())
    new, missing, mismatched, used = {}, [], [], set()
    for path, var in flat.items():
        key = prefix + torch_key(path)
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        w = to_flax_layout(str(path[-1]), np.asarray(sd[key]))
        if tuple(w.shape) != tuple(var.shape):
            mismatched.append(
                (key, np.asarray(sd[key]).shape, to_torch_layout(str(path[-1]), np.zeros(var.shape)).shape)
            )
            continue
        new[path] = w.astype(var.dtype)
    unexpected = sorted(k for k in sd if k.startswith(prefix) and k not in used)
    if missing or mismatched or (strict and unexpected):
        raise WeightMapError(missing, unexpected if strict else (), mismatched, where)
    state.replace_by_pure_dict(traverse_util.unflatten_dict(new), replace_fn=_replace)
    nnx.update(model, state)
    return unexpected


def _replace(var, value):
    return var.replace(value) if hasattr(var, "replace") else value


def state_dict(model: nnx.Module, prefix: str = "") -> "OrderedDict[str, np.ndarray]":
    """The torch-layout state_dict (numpy arrays) of `model`'s Params and Buffers."""
    out = OrderedDict()
    for path, var in nnx.state(model).flat_state():
        out[prefix + torch_key(path)] = np.asarray(to_torch_layout(str(path[-1]), np.asarray(var[...])))
    return out
