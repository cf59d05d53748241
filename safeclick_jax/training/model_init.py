"""The model a training config starts from: its image size, its SAM2Config and its weights.

Building goes through safeclick_jax.models.registry (the one way models are built); this module
only reads the config (model.name, model.arch, model.kind, model.safeclick, init.*, data.image_size)
and sets the attention implementation it names (model.attention).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from safeclick_jax import checkpoint
from safeclick_jax.models import attention, registry
from safeclick_jax.models.config import SAM2Config, get_config
from safeclick_jax.models.safeclick import SafeClickConfig


def resolve_image_size(config, sam2_cfg: SAM2Config) -> tuple[int, str]:
    """(image size, why): -1 picks the model's own size on accelerators, cpu_image_size on CPU."""
    size = int(config.data.image_size)
    if size > 0:
        return size, "set in the config"
    if jax.default_backend() == "cpu":
        return int(config.data.cpu_image_size), (
            f"auto: CPU backend, small input for a quick run (paper: {sam2_cfg.image_size} px; "
            f"--config.data.image_size={sam2_cfg.image_size} to train at it)"
        )
    return sam2_cfg.image_size, f"auto: the model's input size on {jax.default_backend()}"


def sam2_config(config, image_size: int, base: SAM2Config | None = None) -> SAM2Config:
    """`base` (default: the config's model.name) with the config's model.arch overrides, at `image_size`."""
    cfg = base or get_config(config.model.name)
    arch = config.model.arch.to_dict() if hasattr(config.model.arch, "to_dict") else dict(config.model.arch)
    hiera = arch.pop("hiera", None)
    if hiera:
        arch["hiera"] = dataclasses.replace(
            cfg.hiera, **{k: tuple(v) if isinstance(v, list) else v for k, v in hiera.items()}
        )
    return cfg.replace(**arch, image_size=image_size)


def model_sam2_config(config, image_size: int) -> SAM2Config:
    """The SAM2Config the run's model will have (init.checkpoint's, else model.name's, with the
    config's overrides), read without loading any weights."""
    if config.init.checkpoint:
        desc = checkpoint.read_description(config.init.checkpoint)
        return sam2_config(config, image_size, SAM2Config.from_dict(desc["sam2"]))
    return sam2_config(config, image_size)


def build_model(config, image_size: int, log=print) -> nnx.Module:
    """SafeClickModel (or SAM2Image for the baseline) at `image_size`, base weights from
    config.init.checkpoint, SafeClick head freshly initialised from config.init.seed. Also sets the
    attention implementation for every later trace (config.model.attention)."""
    choice = attention.configure(config.model.attention, config.model.attention_max_scores)
    log(f"attention: {choice.mode}, pieces of at most {choice.max_scores} scores ({choice.source})")
    sc = SafeClickConfig(**config.model.safeclick.to_dict()) if config.model.kind == "safeclick" else None
    ckpt = config.init.checkpoint
    if ckpt:
        model = registry.from_sam2(ckpt, sc, seed=config.init.seed, adapt=lambda c: sam2_config(config, image_size, c))
        log(f"init: base weights from {ckpt} ({model.cfg.name})")
        return model
    cfg = sam2_config(config, image_size)
    bar = "!" * 100
    log(
        f"{bar}\n!!! WARNING: config.init.checkpoint is not set: the image encoder, prompt encoder and "
        f"mask decoder start from RANDOM weights\n!!! (seed {config.init.seed}). Fine for a pipeline "
        f"test; for real training convert a SAM 2 / MedSAM 2 checkpoint\n!!! (python -m "
        f"convert.sam2_to_flax --checkpoint X.pt --out DIR) and pass --config.init.checkpoint=DIR\n{bar}"
    )
    desc = {"kind": config.model.kind, "sam2": cfg.to_dict()}
    if sc is not None:
        desc["safeclick"] = sc.to_dict()
    return registry.build(desc, nnx.Rngs(config.init.seed))
