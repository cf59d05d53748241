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


def resolve_epochs(config) -> tuple[int, str]:
    epochs = int(config.train.epochs)
    if epochs > 0:
        return epochs, "set in the config"
    if jax.default_backend() == "cpu":
        return int(config.train.cpu_epochs), ("auto: CPU backend, a short run (paper: 20; --config.train.epochs=20)")
    return 20, f"auto: the paper's 20 on {jax.default_backend()}"


def learning_rate(config, total_steps: int):
    o = config.optim
    if o.schedule == "constant":
        sched = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        sched = optax.cosine_decay_schedule(o.lr, max(total_steps - o.warmup_steps, 1), alpha=o.min_lr_ratio)
    else:
        raise ValueError(f"optim.schedule {o.schedule!r}: expected 'cosine' or 'constant'")
    if o.warmup_steps > 0:
        sched = optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), sched], [o.warmup_steps])
    return sched


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    o = config.optim
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    chain.append(optax.adamw(learning_rate(config, total_steps), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
    return optax.chain(*chain)


def split_model(model: nnx.Module, config):
    """(graphdef, trainable nnx.State, frozen nnx.State)."""
    filt = trainable_filter(train_prompt_encoder=config.train.train_prompt_encoder, train_mask_decoder=True)
    return nnx.split(model, filt, ...)


def init_state(params, optimizer, seed: int) -> dict:
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
