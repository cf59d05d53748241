"""Distributed start-up, the device mesh, shardings and batch placement (training and evaluation).

One mesh axis, `data`: batches are split over it; parameters and optimizer state are replicated
over it (data parallelism) or, with `train.fsdp`, split over it (fully sharded data parallelism; see
`param_sharding`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


# Multi-process agreement. Decisions that lead to collectives (a checkpoint restore, a move aside)
# must be the same on every process, and each process lists the checkpoint directory on its own: a
# 2-process test hung in a restore that only one process started.


def agreed(value: int) -> int:
    """Process 0's integer on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def all_true(flag: bool) -> bool:
    """True on every process when `flag` is true on every process (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(bool(flag)))))


def any_true(flag: bool) -> bool:
    """True on every process when `flag` is true on some process (a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def sync(name: str) -> None:
    """A barrier across processes (no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """numpy copies of a (possibly multi-process, possibly FSDP-split) pytree of jax.Arrays. An
    array whose shards live partly on other processes is all-gathered (collective: every process
    calls this in the same order)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
