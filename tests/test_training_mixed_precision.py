"""train.compute_dtype = "bfloat16": one train step of the smoke model in bf16 against float32 on
the same batch and weights. The master weights and optimizer state must stay float32, and the
loss, gradient norm and update direction must agree within bf16 rounding (8-bit mantissa)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from safeclick_jax import parallel
from safeclick_jax.training import model_init
from safeclick_jax.training import step as step_lib
from safeclick_jax.training import train_state as ts


def _batch(size, n, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = rng.uniform(0.3 * size, 0.7 * size, n), rng.uniform(0.3 * size, 0.7 * size, n), 0.15 * size
    mask = ((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2 < r * r).astype(np.uint8)
    return {
        "image": rng.normal(0, 1, (n, size, size, 3)).astype(np.float32),
        "mask": mask,
        "point_coords": np.stack([cx, cy], -1)[:, None].astype(np.float32),
        "box": np.stack([cx - r, cy - r, cx + r, cy + r], -1).astype(np.float32),
        "prompt_type": (np.arange(n) % 2).astype(np.int32),
    }


def one_step(config):
    """One train step of `config`'s model from its init on the 4-row batch of `_batch`.
    -> (params before, state after, metrics)."""
    size = config.data.image_size
    mesh = parallel.make_mesh()
    model = model_init.build_model(config, size, log=lambda *a: None)
    graphdef, params, frozen = ts.split_model(model, config)
    opt = ts.make_optimizer(config, 100)
    state = ts.init_state(jax.tree.map(jnp.copy, params), opt, 0)
    fn = step_lib.make_train_step(graphdef, opt, ts.learning_rate(config, 100), config, mesh, model.keep_block)
    batch = parallel.global_batch(step_lib.host_batch(_batch(size, 4)), mesh)
    new, metrics = fn(state, frozen, batch)
    return params, new, jax.device_get(metrics)


@pytest.fixture(scope="module")
def steps():
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = common.make("sam2.1_hiera_t", "smoke")
        config.train.compute_dtype = dtype
        out[dtype] = one_step(config)
    return out


def test_master_weights_and_moments_stay_float32(steps):
    _, new, metrics = steps["bfloat16"]
    dtypes = {
        x.dtype
        for x in jax.tree.leaves(new["params"]) + jax.tree.leaves(new["opt_state"])
        if jnp.issubdtype(x.dtype, jnp.floating)
    }
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert bool(metrics["finite"])


def test_bf16_step_agrees_with_float32(steps):
    p0, new32, m32 = steps["float32"]
    _, new16, m16 = steps["bfloat16"]
    loss_rel = abs(float(m16["loss"]) - float(m32["loss"])) / abs(float(m32["loss"]))
    gn_rel = abs(float(m16["grad_norm"]) - float(m32["grad_norm"])) / float(m32["grad_norm"])
    assert loss_rel < 2e-2, (float(m16["loss"]), float(m32["loss"]))
    assert gn_rel < 5e-2, (float(m16["grad_norm"]), float(m32["grad_norm"]))
    # Direction of the first AdamW update (about lr * sign(grad)): cosine over all trainable weights.
    d32 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new32["params"]), jax.tree.leaves(p0))])
    d16 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new16["params"]), jax.tree.leaves(p0))])
    cos = float(d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16)))
    assert cos > 0.8, cos


def test_unknown_compute_dtype_is_named():
    config = common.make("sam2.1_hiera_t", "smoke")
    config.train.compute_dtype = "float16"
    with pytest.raises(ValueError, match="float16"):
        step_lib.compute_dtype(config)
