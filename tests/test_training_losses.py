"""Loss terms against SAM 2's own training code (training/loss_fns.py of the sam2 package), the
multimask selection, and the shared prompt token layout. Fast: no model."""

import ast
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safeclick_jax import prompting
from safeclick_jax.training import losses as _losses

# every helper jit-compiled once: eager op-by-op dispatch compiles each op separately (slow on CPU)
losses = types.SimpleNamespace(
    sigmoid_focal=jax.jit(_losses.sigmoid_focal),
    dice=jax.jit(_losses.dice),
    actual_iou=jax.jit(_losses.actual_iou),
    hard_dice=jax.jit(_losses.hard_dice),
    candidate_outputs=jax.jit(_losses.candidate_outputs, static_argnames="multimask"),
    sam2_loss=jax.jit(_losses.sam2_loss, static_argnums=5),
)


def _sam2_loss_fns():
    """sigmoid_focal_loss / dice_loss / iou_loss from sam2's training/loss_fns.py (its module
    imports the trainer and tensordict, so only the three functions are compiled here)."""
    torch = pytest.importorskip("torch")
    import sam2

    site = os.path.dirname(os.path.dirname(sam2.__file__))
    path = os.path.join(site, "training", "loss_fns.py")
    if not os.path.exists(path):
        pytest.skip("sam2's training/loss_fns.py is not installed")
    tree = ast.parse(open(path).read())
    fns = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ("sigmoid_focal_loss", "dice_loss", "iou_loss")
    ]
    ns = {"torch": torch, "F": torch.nn.functional}
    exec(compile(ast.Module(body=fns, type_ignores=[]), path, "exec"), ns)
    return types.SimpleNamespace(**{f.name: ns[f.name] for f in fns}), torch


class _Cfg(types.SimpleNamespace):  # hashable: a static jit argument
    def __hash__(self):
        return hash(tuple(sorted(vars(self).items())))


def _cfg(**kw):
    c = dict(
        mask_weight=20.0,
        dice_weight=1.0,
        iou_weight=1.0,
        class_weight=1.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        iou_loss="mse",
        supervise_all_iou=True,
    )
    c.update(kw)
    return _Cfg(**c)


def test_terms_match_sam2_training_code():
    ref, torch = _sam2_loss_fns()
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, 3, 16, 16)).astype(np.float32)
    target = (rng.random((5, 1, 16, 16)) < 0.3).astype(np.float32)
    target = np.broadcast_to(target, logits.shape).copy()
    iou_pred = rng.random((5, 3)).astype(np.float32)
    tl, tt, ti = map(torch.from_numpy, (logits, target, iou_pred))
    focal_ref = ref.sigmoid_focal_loss(tl, tt, 1, loss_on_multimask=True).numpy()
    dice_ref = ref.dice_loss(tl, tt, 1, loss_on_multimask=True).numpy()
    iou_ref = ref.iou_loss(tl, tt, ti, 1, loss_on_multimask=True).numpy()
    np.testing.assert_allclose(losses.sigmoid_focal(logits, target), focal_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses.dice(logits, target), dice_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose((iou_pred - losses.actual_iou(logits, target)) ** 2, iou_ref, rtol=1e-5, atol=1e-7)


def test_multimask_best_mask_and_box_single_mask():
    rng = np.random.default_rng(1)
    target = np.zeros((2, 8, 8), np.float32)
    target[:, 2:6, 2:6] = 1
    good = np.where(target[0] > 0, 8.0, -8.0)
    logits = rng.normal(0, 1, (2, 4, 8, 8)).astype(np.float32)
    logits[0, 2] = good  # row 0 (a click): multimask output 2 is right
    logits[1, 2] = good  # row 1 (a box): only output 0 may be used, even though 2 is right
    iou = np.full((2, 4), 0.5, np.float32)
    obj = np.full((2, 1), 10.0, np.float32)
    is_box = jnp.array([False, True])
    cand = losses.candidate_outputs(is_box)
    np.testing.assert_array_equal(np.asarray(cand), [[0, 1, 1, 1], [1, 0, 0, 0]])
    total, aux = losses.sam2_loss(jnp.asarray(logits), iou, obj, target, cand, _cfg())
    np.testing.assert_array_equal(np.asarray(aux["best"]), [2, 0])
    # recompute by hand: focal/dice of the chosen masks, IoU MSE over the candidates
    t = target[:, None]
    f = np.asarray(losses.sigmoid_focal(logits, t))
    d = np.asarray(losses.dice(logits, t))
    a = np.asarray(losses.actual_iou(logits, t))
    iou_rows = [((0.5 - a[0, 1:]) ** 2).mean(), (0.5 - a[1, 0]) ** 2]
    expect = 20 * (f[0, 2] + f[1, 0]) / 2 + (d[0, 2] + d[1, 0]) / 2 + np.mean(iou_rows) + np.log1p(np.exp(-10.0))
    np.testing.assert_allclose(float(total), expect, rtol=1e-5)
    assert float(aux["dice"]) == pytest.approx((d[0, 2] + d[1, 0]) / 2, rel=1e-5)
    # single-mask training (multimask off): clicks use output 0 as well
    cand1 = losses.candidate_outputs(is_box, multimask=False)
    _, aux1 = losses.sam2_loss(jnp.asarray(logits), iou, obj, target, cand1, _cfg())
    np.testing.assert_array_equal(np.asarray(aux1["best"]), [0, 0])


def test_loss_gradient_is_finite_and_l1_option():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(0, 1, (3, 4, 8, 8)).astype(np.float32))
    target = jnp.asarray((rng.random((3, 8, 8)) < 0.5).astype(np.float32))
    iou = jnp.asarray(rng.random((3, 4)).astype(np.float32))
    obj = jnp.zeros((3, 1))
    cand = losses.candidate_outputs(jnp.array([False, True, False]))
    g = jax.jit(jax.grad(lambda x: _losses.sam2_loss(x, iou, obj, target, cand, _cfg())[0]))(logits)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
    _, a_mse = losses.sam2_loss(logits, iou, obj, target, cand, _cfg())
    _, a_l1 = losses.sam2_loss(logits, iou, obj, target, cand, _cfg(iou_loss="l1"))
    assert float(a_l1["iou"]) > float(a_mse["iou"])  # |e| > e^2 for |e| < 1


def test_hard_dice():
    p = np.full((3, 4, 4), -1.0, np.float32)
    g = np.zeros((3, 4, 4), np.uint8)
    p[0, :2] = 1
    g[0, :2] = 1  # perfect
    p[1, :2] = 1
    g[1, 1:3] = 1  # |P&G| = 4, |P| + |G| = 16 -> 0.5
    d = losses.hard_dice(p, g, np.array([True, True, False]))
    np.testing.assert_allclose(np.asarray(d), [1.0, 0.5, 0.0])


def test_prompt_tokens_layout():
    coords, labels = prompting.click_or_box_tokens(
        np.array([[[5.0, 6.0]], [[1.0, 2.0]]]),
        np.array([[0, 1, 9, 8], [2, 3, 4, 5]], np.float32),
        np.array([False, True]),
    )
    np.testing.assert_array_equal(labels, [[1, -1, -2], [2, 3, -1]])
    np.testing.assert_array_equal(coords, [[[5, 6], [0, 0], [0, 0]], [[2, 3], [4, 5], [0, 0]]])
    # the predictor's layout: box corners, clicks, the (0,0) pad point, padding to a multiple of 8
    c, l = prompting.sam2_tokens(
        box=np.array([[0, 1, 2, 3]]), points=np.array([[[7, 7], [8, 8]]]), point_labels=np.array([[1, 0]])
    )
    assert c.shape == (1, 8, 2)
    np.testing.assert_array_equal(l, [[2, 3, 1, 0, -1, -2, -2, -2]])
    np.testing.assert_array_equal(c[0, :5], [[0, 1], [2, 3], [7, 7], [8, 8], [0, 0]])
    assert prompting.sam2_tokens() == (None, None)
