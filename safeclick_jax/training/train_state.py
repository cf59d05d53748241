"""The train state, the trainable/frozen split of the model and the optimizer.

TrainState = {"params": trainable nnx.State, "opt_state": optax state, "step": int32,
"rng": PRNG key data}. Frozen weights (image encoder, prompt encoder, conv_s0/s1) are not part of
it: they come from the init checkpoint (or the init seed) and are never saved by training. How the
state is placed on devices (replicated or FSDP-split) is in safeclick_jax/parallel.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from safeclick_jax.models.safeclick import trainable_filter
from safeclick_jax.training.task import ConfigError


def resolve_epochs(config) -> tuple[int, str]:
    epochs = int(config.train.epochs)
    if epochs > 0:
        return epochs, "set in the config"
    if jax.default_backend() == "cpu":
        return int(config.train.cpu_epochs), ("auto: CPU backend, a short run (paper: 20; --config.train.epochs=20)")
    return 20, f"auto: the paper's 20 on {jax.default_backend()}"


def learning_rate(config, total_steps: int, mult: float = 1.0, warmup_steps: int | None = None):
    """optim.lr * mult, linear warm-up over warmup_steps (default optim.warmup_steps), then cosine
    annealing (paper) or constant to the end of the run."""
    o = config.optim
    lr = o.lr * mult
    warmup = int(o.warmup_steps if warmup_steps is None else warmup_steps)
    if o.schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif o.schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=o.min_lr_ratio)
    else:
        raise ValueError(f"optim.schedule {o.schedule!r}: expected 'cosine' or 'constant'")
    if warmup > 0:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    return sched


HEAD, BASE = "head", "base"


def param_groups(params):
    """'head' for the SafeClick modules new to SAM 2 (F_transform, E1, E2, CRL: the `safeclick`
    subtree), 'base' for everything else (SAM 2's mask decoder, E3 included); same tree as params."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: HEAD if getattr(path[0], "key", None) == "safeclick" else BASE, params
    )


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. With optim.head_lr_mult != 1 the SafeClick modules get
    their own AdamW at head_lr_mult * lr with a head_warmup_steps warm-up (configs/common.py says
    why); SAM 2's decoder keeps optim.lr."""
    o = config.optim
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []

    def adamw(schedule):
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)

    mult = float(o.head_lr_mult)
    if mult == 1.0:
        chain.append(adamw(learning_rate(config, total_steps)))
    else:
        head = learning_rate(config, total_steps, mult=mult, warmup_steps=int(o.head_warmup_steps))
        chain.append(
            optax.multi_transform({BASE: adamw(learning_rate(config, total_steps)), HEAD: adamw(head)}, param_groups)
        )
    return optax.chain(*chain)


PARTS = ("image_encoder", "memory", "prompt_encoder", "mask_decoder", "safeclick")  # train.parts
SLICE_PARTS = ("prompt_encoder", "mask_decoder", "safeclick")  # what the slice task can train


def check_parts(config, allowed: tuple[str, ...], task: str) -> tuple[str, ...]:
    """train.parts as a tuple; ConfigError (one line naming the value) for a part that is unknown or
    that `task` cannot train."""
    parts = tuple(config.train.parts)
    for p in parts:
        if p not in PARTS:
            raise ConfigError(f"train.parts: unknown part {p!r}; known: {', '.join(PARTS)}")
        if p not in allowed:
            raise ConfigError(
                f"train.parts: {p!r} does not train in the {task} task (it trains {', '.join(allowed)}); "
                "the variant `full` trains the whole model on clips"
            )
    return parts


def split_model(model: nnx.Module, config):
    """(graphdef, trainable nnx.State, frozen nnx.State) of the slice task: the SafeClick head, the
    mask decoder and the prompt encoder as train.parts names them."""
    parts = check_parts(config, SLICE_PARTS, "slices")
    filt = trainable_filter(train_prompt_encoder="prompt_encoder" in parts, train_mask_decoder="mask_decoder" in parts)
    return nnx.split(model, filt, ...)


def init_state(params, optimizer, seed: int) -> dict:
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
