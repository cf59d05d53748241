"""The model to train, its trainable/frozen split, the optimizer and the sharded train state.

TrainState = {"params": trainable nnx.State, "opt_state": optax state, "step": int32,
"rng": PRNG key data}. Frozen weights (image encoder, prompt encoder, conv_s0/s1) are not part of
it: they come from the init checkpoint (or the init seed) and are never saved by training.
Batches are sharded on the `data` mesh axis. Parameters and optimizer state are replicated over it
(data parallelism), or, with `train.fsdp`, split over it (fully sharded data parallelism; see
`param_sharding`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from safeclick_jax import checkpoint
from safeclick_jax.models.config import SAM2Config, get_config
from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickHead, SafeClickModel, trainable_filter
from safeclick_jax.models.sam2 import SAM2Image

DATA_AXIS = "data"


def maybe_initialize_distributed(log=print) -> bool:
    """jax.distributed.initialize() when the environment describes a multi-process job
    (JAX_COORDINATOR_ADDRESS / COORDINATOR_ADDRESS with process count and id, or SLURM with
    more than one task); a no-op on one process. Must run before any other JAX call."""
    env = os.environ
    addr = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    if addr:
        num = env.get("JAX_NUM_PROCESSES") or env.get("NUM_PROCESSES")
        pid = env.get("JAX_PROCESS_ID") or env.get("PROCESS_ID")
        kw = {"coordinator_address": addr}
        if num is not None and pid is not None:
            kw.update(num_processes=int(num), process_id=int(pid))
        jax.distributed.initialize(**kw)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        jax.distributed.initialize()  # cluster auto-detection (SLURM)
    else:
        return False
    log(
        f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices"
    )
    return True


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


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


def resolve_epochs(config) -> tuple[int, str]:
    epochs = int(config.train.epochs)
    if epochs > 0:
        return epochs, "set in the config"
    if jax.default_backend() == "cpu":
        return int(config.train.cpu_epochs), ("auto: CPU backend, a short run (paper: 20; --config.train.epochs=20)")
    return 20, f"auto: the paper's 20 on {jax.default_backend()}"


def sam2_config(config, image_size: int, base: SAM2Config | None = None) -> SAM2Config:
    cfg = base or get_config(config.model.name)
    arch = config.model.arch.to_dict() if hasattr(config.model.arch, "to_dict") else dict(config.model.arch)
    if arch:
        hiera = arch.pop("hiera", None)
        if hiera:
            import dataclasses

            arch["hiera"] = dataclasses.replace(
                cfg.hiera, **{k: tuple(v) if isinstance(v, list) else v for k, v in hiera.items()}
            )
        cfg = cfg.replace(**arch)
    return cfg.replace(image_size=image_size)


def build_model(config, image_size: int, log=print) -> nnx.Module:
    """SafeClickModel (or SAM2Image for the baseline) at `image_size`, base weights from
    config.init.checkpoint, SafeClick head freshly initialised from config.init.seed."""
    kind = config.model.kind
    sc = SafeClickConfig(**config.model.safeclick.to_dict()) if kind == "safeclick" else None
    ckpt = config.init.checkpoint
    if ckpt:
        desc, params, _ = checkpoint.load(ckpt)
        if desc.get("kind") != "sam2":
            raise ValueError(f"{ckpt}: training starts from a plain SAM 2 checkpoint, this one is {desc.get('kind')!r}")
        cfg = sam2_config(config, image_size, SAM2Config.from_dict(desc["sam2"]))
        # Abstract build + assign: no time spent initialising weights that are overwritten.
        if kind == "safeclick":
            model = nnx.eval_shape(lambda: SafeClickModel(cfg, sc, nnx.Rngs(0)))
            head = SafeClickHead(cfg, sc, nnx.Rngs(config.init.seed))
            params = {**params, "safeclick": checkpoint.model_params(head)}
        else:
            model = nnx.eval_shape(lambda: SAM2Image(cfg, nnx.Rngs(0)))
        checkpoint.assign_params(model, params, where=ckpt)
        log(f"init: base weights from {ckpt} ({desc['sam2']['name']})")
        return model
    cfg = sam2_config(config, image_size)
    bar = "!" * 100
    log(
        f"{bar}\n!!! WARNING: config.init.checkpoint is not set: the image encoder, prompt encoder and "
        f"mask decoder start from RANDOM weights\n!!! (seed {config.init.seed}). Fine for a pipeline "
        f"test; for real training convert a SAM 2 / MedSAM 2 checkpoint\n!!! (python -m "
        f"convert.sam2_to_flax --checkpoint X.pt --out DIR) and pass --config.init.checkpoint=DIR\n{bar}"
    )
    rngs = nnx.Rngs(config.init.seed)
    return SafeClickModel(cfg, sc, rngs) if kind == "safeclick" else SAM2Image(cfg, rngs)


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


def replicated(mesh):
    return NamedSharding(mesh, P())


def param_sharding(mesh, tree, fsdp: bool = False, min_size: int = 1 << 16):
    """Shardings for a pytree of parameters (or optimizer state, or frozen weights).

    Replicated by default. With `fsdp`, every array of at least `min_size` elements is split over
    the `data` axis along its largest dimension that the axis size divides (ZeRO-3 / FSDP: each
    device keeps 1/N of those weights and of their Adam moments; inside the jit-compiled step XLA
    all-gathers a weight where it is used and reduce-scatters its gradient). Arrays below
    `min_size` (biases, norms: communication would cost more than the memory saved) or without such
    a dimension stay replicated. The rule is per shape, so Adam's mu/nu follow their parameter."""
    n = mesh.shape[DATA_AXIS]
    rep = NamedSharding(mesh, P())

    def one(x):
        if not fsdp or n == 1 or int(np.prod(x.shape)) < min_size:
            return rep
        for axis in sorted(range(len(x.shape)), key=lambda a: -x.shape[a]):
            if x.shape[axis] % n == 0:
                spec = [None] * len(x.shape)
                spec[axis] = DATA_AXIS
                return NamedSharding(mesh, P(*spec))
        return rep

    return jax.tree.map(one, tree)


def sharded_fraction(shardings, tree) -> tuple[int, int, float]:
    """(arrays split, arrays in total, bytes per device / bytes of a full replica) for a log line."""
    leaves, shs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    is_split = [any(a is not None for a in s.spec) for s in shs]
    nbytes = [x.size * x.dtype.itemsize for x in leaves]
    per_device = sum(b / s.num_devices if split else b for b, s, split in zip(nbytes, shs, is_split))
    return sum(is_split), len(leaves), per_device / max(sum(nbytes), 1)


def batch_sharding(mesh):
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict, mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global jax arrays sharded on `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
