"""The one place models are built: from a description (model.json), or from a SAM 2 base with a fresh
SafeClick head (a model directory is loaded by safeclick_jax.inference.load_model, which builds it
here). It imports both model files; neither imports it.

    desc = {"kind": "sam2" | "safeclick", "sam2": SAM2Config dict, "safeclick": SafeClickConfig dict}
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from safeclick_jax import checkpoint
from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickHead, SafeClickModel
from safeclick_jax.models.sam2 import SAM2Image

KINDS = ("sam2", "safeclick")


def build(desc: dict[str, Any], rngs: nnx.Rngs | None = None, abstract: bool = False) -> nnx.Module:
    """The (randomly initialised, or shape-only when `abstract`) model a description names."""
    kind = desc.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} in model.json (expected 'sam2' or 'safeclick')")
    cfg = SAM2Config.from_dict(desc["sam2"])
    if kind == "sam2":
        make = lambda: SAM2Image(cfg, rngs or nnx.Rngs(0))
    else:
        sc = SafeClickConfig.from_dict(desc["safeclick"])
        make = lambda: SafeClickModel(cfg, sc, rngs or nnx.Rngs(0))
    return nnx.eval_shape(make) if abstract else make()


def describe(model: nnx.Module) -> dict[str, Any]:
    """The model.json description of a SAM2Image or SafeClickModel."""
    desc = {"kind": "safeclick" if isinstance(model, SafeClickModel) else "sam2", "sam2": model.cfg.to_dict()}
    if desc["kind"] == "safeclick":
        desc["safeclick"] = model.sc.to_dict()
    return desc


def save_model(directory: str, model: nnx.Module, extra: dict | None = None, **meta) -> None:
    """Writes a model directory that safeclick_jax.inference.load_model reads."""
    checkpoint.save(directory, {**describe(model), **meta}, checkpoint.model_params(model), extra)


def from_sam2(
    base,
    sc: SafeClickConfig | None,
    seed: int = 0,
    adapt: Callable[[SAM2Config], SAM2Config] | None = None,
) -> nnx.Module:
    """A model whose SAM 2 weights (image encoder, prompt encoder, E3 / tokens / upscaling / heads) come
    from `base` (a SAM2Image, or a converted SAM 2 model directory) and whose SafeClick head (F_transform,
    E1, E2, CRL) is freshly initialised from `seed`; with `sc` None, a plain SAM2Image (the baseline).
    `adapt` changes the base's SAM2Config where no parameter shape depends on it (image size)."""
    if isinstance(base, str):
        where = base
        desc, params, _ = checkpoint.load(base)
        if desc.get("kind") != "sam2":
            raise ValueError(
                f"{base}: a model built on SAM 2 needs a plain SAM 2 checkpoint, this one is {desc.get('kind')!r}"
            )
        cfg = SAM2Config.from_dict(desc["sam2"])
    elif isinstance(base, SAM2Image):
        where, params, cfg = "the SAM 2 base model", checkpoint.model_params(base), base.cfg
    else:
        raise TypeError(f"base must be a SAM2Image or a model directory, got {type(base).__name__}")
    cfg = adapt(cfg) if adapt else cfg
    # Only the new parts need random values: build the rest as shapes, then fill it from `base`.
    if sc is None:
        model = nnx.eval_shape(lambda: SAM2Image(cfg, nnx.Rngs(0)))
    else:
        model = nnx.eval_shape(lambda: SafeClickModel(cfg, sc, nnx.Rngs(0)))
        params = {**params, "safeclick": checkpoint.model_params(SafeClickHead(cfg, sc, nnx.Rngs(seed)))}
    checkpoint.assign_params(model, params, where=where)
    return model


def base_model(model: nnx.Module) -> SAM2Image | None:
    """For a SafeClick model: the same SAM 2 network without the SafeClick head (weights shared), the
    base its overhead is timed against; None for a plain SAM 2 model."""
    if not isinstance(model, SafeClickModel):
        return None
    base = nnx.eval_shape(lambda: SAM2Image(model.cfg, nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.update(base, nnx.State({k: v for k, v in state.items() if k != "safeclick"}))
    return base


def count_params(module: nnx.Module) -> int:
    return int(sum(v[...].size for _, v in nnx.state(module, nnx.Param).flat_state()))
