"""optim.head_lr_mult / head_warmup_steps: the SafeClick modules (the `safeclick` subtree: F_transform,
E1, E2, CRL) step at head_lr_mult * lr after their warm-up, SAM 2's decoder at lr. Adam's first step
moves every weight by lr * sign(grad), so the step sizes read off the learning rates directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from safeclick_jax.training import model_init
from safeclick_jax.training import train_state as ts


@pytest.fixture(scope="module")
def params():
    config = common.make("sam2.1_hiera_t", "smoke")
    model = model_init.build_model(config, config.data.image_size, log=lambda *a: None)
    return ts.split_model(model, config)[1]


def _first_step(params, mult, warmup):
    config = common.make("sam2.1_hiera_t", "smoke")
    config.optim.update(lr=1e-3, schedule="constant", weight_decay=0.0, grad_clip=0.0)
    config.optim.update(head_lr_mult=mult, head_warmup_steps=warmup)
    opt = ts.make_optimizer(config, 100)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    steps = {}
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        steps.setdefault(path[0].key, []).append(float(jnp.max(jnp.abs(u))))
    return steps


def test_param_groups_split_the_new_modules_from_sam2s_decoder(params):
    labels = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(ts.param_groups(params))}
    assert labels["['safeclick']['crl']['conv']['kernel'].value"] == ts.HEAD  # F_conv, eq. 9
    assert labels["['safeclick']['crl']['alpha'].value"] == ts.HEAD  # alpha, eq. 8
    assert all(g == ts.HEAD for k, g in labels.items() if k.startswith("['safeclick']"))
    assert all(g == ts.BASE for k, g in labels.items() if k.startswith("['sam_mask_decoder']"))
    assert {g for g in labels.values()} == {ts.HEAD, ts.BASE}


def test_head_steps_at_mult_times_lr(params):
    steps = _first_step(params, 10.0, 0)
    np.testing.assert_allclose(steps["safeclick"], 1e-2, rtol=1e-3)
    np.testing.assert_allclose(steps["sam_mask_decoder"], 1e-3, rtol=1e-3)


def test_head_warmup_starts_at_zero_and_mult_one_is_one_group(params):
    steps = _first_step(params, 10.0, 5)  # step 0 of a linear warm-up from 0
    assert max(steps["safeclick"]) == 0.0
    np.testing.assert_allclose(steps["sam_mask_decoder"], 1e-3, rtol=1e-3)
    steps = _first_step(params, 1.0, 5)  # mult 1: one optimizer, the head warm-up does not apply
    np.testing.assert_allclose(steps["safeclick"] + steps["sam_mask_decoder"], 1e-3, rtol=1e-3)
    assert common.make("sam2.1_hiera_t").optim.head_lr_mult == 1.0
