"""Build a model from a checkpoint's description (model.json) and load it from a model directory."""

from __future__ import annotations

from typing import Any

from flax import nnx

from safeclick_jax import checkpoint
from safeclick_jax.models.config import SAM2Config


def build(desc: dict[str, Any], rngs: nnx.Rngs | None = None, abstract: bool = False) -> nnx.Module:
    """The (randomly initialised, or shape-only when `abstract`) model a description names."""
    kind = desc.get("kind")
    cfg = SAM2Config.from_dict(desc["sam2"])
    if kind == "sam2":
        from safeclick_jax.models.sam2 import SAM2Image

        make = lambda: SAM2Image(cfg, rngs or nnx.Rngs(0))
    elif kind == "safeclick":
        from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickModel

        sc = SafeClickConfig.from_dict(desc["safeclick"])
        make = lambda: SafeClickModel(cfg, sc, rngs or nnx.Rngs(0))
    else:
        raise ValueError(f"unknown model kind {kind!r} in model.json (expected 'sam2' or 'safeclick')")
    return nnx.eval_shape(make) if abstract else make()


def load_model(directory: str) -> tuple[nnx.Module, dict[str, Any], dict]:
    """(model with the directory's weights, description, extra tensors). checkpoint.ModelDirError
    (one line naming the directory, the array and the cause) when the directory does not load."""
    desc, params, extra = checkpoint.load(directory)
    try:
        model = build(desc, abstract=True)
    except (TypeError, KeyError, ValueError) as e:
        raise checkpoint.ModelDirError(f"{directory}: model.json does not describe a model ({e})") from None
    checkpoint.assign_params(model, params, where=directory)
    return model, desc, extra


def count_params(module: nnx.Module) -> int:
    return int(sum(v[...].size for _, v in nnx.state(module, nnx.Param).flat_state()))


def describe(model: nnx.Module) -> dict[str, Any]:
    """The model.json description of a SAM2Image or SafeClickModel."""
    desc = {"kind": "safeclick" if hasattr(model, "safeclick") else "sam2", "sam2": model.cfg.to_dict()}
    if desc["kind"] == "safeclick":
        desc["safeclick"] = model.sc.to_dict()
    return desc


def save_model(directory: str, model: nnx.Module, extra: dict | None = None, **meta) -> None:
    """Writes a model directory that `load_model` / `ImagePredictor.from_checkpoint` read."""
    checkpoint.save(directory, {**describe(model), **meta}, checkpoint.model_params(model), extra)
