"""SAM 2's optimiser for full training (sam2 configs/sam2.1_training/*.yaml `optim`, training/
optimizer.py), as optax, and which parts train.

    trainable = trainable_filter(("image_encoder", "memory", "mask_decoder"))   # an nnx filter
    tx, schedule = make_optimizer(section, params, total_steps)

`params` is the trainable nnx.State of the pair (image model, SAM2Memory) (nnx.split((model, mem),
trainable, ...)); paths are read as the torch names they mirror (models/weight_map.py).

- lr: `lr` for everything, `vision_lr_mult * lr` for the image encoder, both cosine-annealed to
  lr * min_lr_ratio (fvcore CosineParamScheduler from lr to lr / 10) after `warmup_steps` of a
  linear warm-up from 0 (none in sam2's fine-tuning configs), and on the Hiera trunk the
  layer-wise decay of layer_decay_param_modifier: block i scales by layer_decay ** (L - i - 1)
  with L = number of blocks + 1, the patch embedding by layer_decay ** L, the position embeddings
  by 1 (the config's '*pos_embed*' override), other trunk tensors by 1 (Hiera.get_layer_id).
- weight decay: `weight_decay` except on biases ('*bias*') and on torch.nn.LayerNorm weights; the
  LayerNorm2d of the mask downsamplers, the upscaling and the memory fuser are other modules in
  sam2 and keep their decay.
- AdamW (torch's betas and eps), after clipping the global gradient norm to `grad_clip`.
"""

from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from safeclick_jax.training.task import ConfigError

# What trains: config names -> top-level attributes of (image model, SAM2Memory).
PARTS = {
    "image_encoder": ("image_encoder",),
    "prompt_encoder": ("sam_prompt_encoder",),
    "mask_decoder": ("sam_mask_decoder", "no_mem_embed"),
    "memory": (
        "memory_attention", "memory_encoder", "obj_ptr_proj", "mask_downsample", "maskmem_tpos_enc",
        "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial", "obj_ptr_tpos_proj",
    ),
    "safeclick": ("safeclick",),
}  # fmt: skip

# LayerNorm2d modules of SAM 2 (sam2_utils.LayerNorm2d): not torch.nn.LayerNorm, so they decay.
LAYER_NORM_2D = (
    "sam_mask_decoder.output_upscaling.1.*",
    "sam_prompt_encoder.mask_downscaling.*",
    "memory_encoder.mask_downsampler.*",
    "memory_encoder.fuser.layers.*.norm.*",
)
TRUNK = "image_encoder.trunk."


def _keys(path) -> list[str]:
    """Dict / sequence keys of a pytree path (the array inside an nnx.Variable adds `.value`)."""
    return [str(getattr(p, "key", getattr(p, "idx", p))) for p in path if not isinstance(p, jax.tree_util.GetAttrKey)]


def torch_name(path) -> str:
    """A Flax param path of (model, mem) -> the torch key it mirrors ('...kernel' -> '...weight')."""
    keys = _keys(path)
    if keys and keys[0] in ("0", "1"):  # the (image model, memory) pair
        keys = keys[1:]
    if keys[-1] in ("kernel", "scale", "embedding"):
        keys[-1] = "weight"
    return ".".join(keys)


def trainable_filter(parts):
    """nnx filter of the Params of the named parts (PARTS); ConfigError (one line, exit 2 in
    train.py) names an unknown one."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"train.parts: unknown part(s) {unknown}; known: {sorted(PARTS)}")
    roots = {r for p in parts for r in PARTS[p]}

    def is_trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and torch_name(path).split(".")[0] in roots

    return is_trainable


def layer_id(name: str, num_blocks: int) -> int:
    """sam2 Hiera.get_layer_id for a trunk tensor's torch name."""
    if "rel_pos" in name:
        return num_blocks + 1
    if "pos_embed" in name or "patch_embed" in name:
        return 0
    if "blocks" in name:
        return int(name.split("blocks")[1].split(".")[1]) + 1
    return num_blocks + 1


def lr_scale(name: str, cfg, num_blocks: int) -> float:
    """A tensor's lr relative to `lr` (layer_decay_param_modifier on the vision / base groups)."""
    if not name.startswith("image_encoder."):
        return 1.0
    scale = float(cfg.vision_lr_mult)
    if name.startswith(TRUNK):
        if fnmatch.fnmatchcase(name, "*pos_embed*"):
            return scale
        num_layers = num_blocks + 1
        scale *= float(cfg.layer_decay) ** (num_layers - layer_id(name, num_blocks))
    return scale


def decays(name: str, is_norm: bool) -> bool:
    if fnmatch.fnmatchcase(name, "*bias*"):
        return False
    return not (is_norm and not any(fnmatch.fnmatchcase(name, p) for p in LAYER_NORM_2D))


def _num_blocks(names) -> int:
    ids = {int(n[len(TRUNK) + len("blocks.") :].split(".")[0]) for n in names if n.startswith(TRUNK + "blocks.")}
    return max(ids) + 1 if ids else 0


def per_parameter(params, cfg):
    """(lr scale tree, weight-decay mask tree) for the params' tree."""
    flat = list(nnx.to_flat_state(params))
    num_blocks = _num_blocks([torch_name(p) for p, _ in flat])
    # a LayerNorm weight is nnx.LayerNorm's `scale` (every `scale` Param in these models)
    norm = lambda path: _keys(path)[-1] == "scale"
    scales = jax.tree_util.tree_map_with_path(lambda p, _: lr_scale(torch_name(p), cfg, num_blocks), params)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: decays(torch_name(p), norm(p)), params)
    return scales, mask


def scale_per_parameter(scales) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg, params, total_steps: int):
    """-> (optax transform, base lr schedule). cfg: the `optim` section of `full` (lr,
    vision_lr_mult, min_lr_ratio, warmup_steps (linear from 0), layer_decay, weight_decay,
    grad_clip, b1, b2)."""
    scales, decay_mask = per_parameter(params, cfg)
    total, warmup = max(int(total_steps), 1), int(cfg.warmup_steps)
    schedule = optax.cosine_decay_schedule(float(cfg.lr), total, alpha=float(cfg.min_lr_ratio))
    if warmup > 0:  # from random weights (configs/standin.py); sam2's fine-tuning has none
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, float(cfg.lr), min(warmup, total - 1), total, end_value=float(cfg.lr) * float(cfg.min_lr_ratio)
        )
    chain = [optax.clip_by_global_norm(float(cfg.grad_clip))] if float(cfg.grad_clip) > 0 else []
    chain += [
        optax.scale_by_adam(float(cfg.b1), float(cfg.b2)),  # eps 1e-8 as torch
        optax.add_decayed_weights(float(cfg.weight_decay), decay_mask),
        optax.scale_by_learning_rate(schedule),
        scale_per_parameter(scales),
    ]
    return optax.chain(*chain), schedule
