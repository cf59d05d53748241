"""SAM 2's decoder training loss (sam2 training/loss_fns.py, MultiStepMultiMasksAndIous), in JAX.

Per prompt: focal loss (alpha 0.25, gamma 2, mean over pixels) and dice loss (smooth 1) on the
mask logits, MSE between the predicted IoU and the actual IoU of the binarised mask, and a BCE
on the object score (target 1: every training ROI contains its object). Weights default to SAM 2's
training recipe (configs/sam2.1_training: mask 20, dice 1, iou 1, class 1).

Multimask (SAM 2: `multimask_output` for prompts with at most one click): the decoder's three
multimask outputs are all scored and only the best (lowest 20*focal + dice) gets the mask losses;
the IoU head is supervised on all three (`supervise_all_iou`). A box (two corner tokens) uses the
single-mask output. Both kinds share one batch: `candidates` [B, 4] marks which of the decoder's
four outputs (0 = single, 1..3 = multimask) a row may use.

SAM 2.1's yaml uses an L1 IoU loss (`iou_use_l1_loss`); the issue and SAM's paper ask for MSE, the
default here; `iou_loss="l1"` gives SAM 2.1's choice. Each term is averaged over the batch
(SAM 2 divides sums by the number of objects, one per row here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_focal(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Per-mask focal loss averaged over pixels: logits/targets [..., H, W] -> [...]."""
    prob = jax.nn.sigmoid(logits)
    ce = jnp.logaddexp(0.0, logits) - logits * targets  # binary_cross_entropy_with_logits
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma if gamma else ce  # gamma 0: plain BCE (and no 0 * inf gradient)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(axis=(-2, -1))


def dice(logits, targets, smooth: float = 1.0):
    """Per-mask soft dice loss: [..., H, W] -> [...]."""
    p = jax.nn.sigmoid(logits)
    num = 2 * (p * targets).sum(axis=(-2, -1))
    den = p.sum(axis=(-2, -1)) + targets.sum(axis=(-2, -1))
    return 1 - (num + smooth) / (den + smooth)


def actual_iou(logits, targets):
    """IoU of (logits > 0) with the target: [..., H, W] -> [...] (no gradient)."""
    pred, gt = logits > 0, targets > 0
    inter = (pred & gt).sum(axis=(-2, -1)).astype(jnp.float32)
    union = (pred | gt).sum(axis=(-2, -1)).astype(jnp.float32)
    return inter / jnp.maximum(union, 1.0)


def sam2_loss(mask_logits, iou_pred, object_logits, target, candidates, cfg):
    """mask_logits [B,4,H,W] (all four decoder outputs), iou_pred [B,4], object_logits [B,1],
    target [B,H,W] float 0/1, candidates [B,4] bool. Returns (total loss, dict of terms and
    the chosen mask index [B])."""
    t = target[:, None].astype(jnp.float32)
    focal = sigmoid_focal(mask_logits, t, cfg.focal_alpha, cfg.focal_gamma)  # [B,4]
    dl = dice(mask_logits, t)
    combo = cfg.mask_weight * focal + cfg.dice_weight * dl
    best = jnp.argmin(jnp.where(candidates, combo, jnp.inf), axis=-1)
    pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
    iou_t = jax.lax.stop_gradient(actual_iou(mask_logits, t))
    err = iou_pred - iou_t
    iou_err = jnp.abs(err) if cfg.iou_loss == "l1" else err**2
    n = jnp.maximum(candidates.sum(-1), 1)
    if cfg.supervise_all_iou:
        iou_l = jnp.where(candidates, iou_err, 0.0).sum(-1) / n
    else:
        iou_l = pick(iou_err)
    obj = jnp.logaddexp(0.0, -object_logits[:, 0])  # BCE with target 1
    terms = {"focal": pick(focal).mean(), "dice": pick(dl).mean(), "iou": iou_l.mean(), "class": obj.mean()}
    total = (
        cfg.mask_weight * terms["focal"]
        + cfg.dice_weight * terms["dice"]
        + cfg.iou_weight * terms["iou"]
        + cfg.class_weight * terms["class"]
    )
    return total, {**terms, "best": best}


def candidate_outputs(is_box, multimask: bool = True):
    """[B,4] bool: a click (row with is_box False) may use the three multimask outputs (when
    `multimask`), a box only the single-mask output 0."""
    single = jnp.array([True, False, False, False])
    multi = jnp.array([False, True, True, True]) if multimask else single
    return jnp.where(is_box[:, None], single[None], multi[None])


def hard_dice(mask_logits, target, valid=None):
    """Dice of (logits > 0) vs target per row: [B,H,W] x2 -> [B] (1 when both are empty)."""
    p, g = mask_logits > 0, target > 0
    inter = (p & g).sum(axis=(-2, -1)).astype(jnp.float32)
    s = (p.sum(axis=(-2, -1)) + g.sum(axis=(-2, -1))).astype(jnp.float32)
    d = jnp.where(s > 0, 2 * inter / jnp.maximum(s, 1.0), 1.0)
    return d if valid is None else jnp.where(valid, d, 0.0)
