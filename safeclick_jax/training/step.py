"""The jit-compiled, data-parallel train and eval steps.

Inputs per row (host side, `host_batch`): frozen-encoder features (from the embedding cache, or
the normalised image when the cache is off), the prompt as decoder tokens (a click or a box in
one 3-token layout, prompting.click_or_box_tokens), `is_box`, and the ground-truth mask at input
resolution. Rows are sharded on the `data` axis; params/optimizer state are replicated (the batch
mean in the loss makes XLA all-reduce the gradients) or, with FSDP,
split over the same axis. The state argument is donated.

A step whose loss or gradient norm is not finite leaves the state unchanged and reports
`finite = False`; the loop stops on it (so the last checkpoint is the last good state).

Mixed precision (`train.compute_dtype = "bfloat16"`): the float32 master weights and the features
are cast to bf16 inside the loss, so the decoder's matmuls and attention run in bf16 while the
optimizer, its moments and the gradients (the cast's transpose) stay float32. Prompt coordinates
are embedded in float32 (a 1024 px coordinate has no sub-pixel precision in bf16's 8-bit
mantissa) and the embeddings then cast; LayerNorm statistics, softmax statistics and the loss
(logits upcast) are float32.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from safeclick_jax import prompting
from safeclick_jax.models.sam2 import PAD_LABEL, encode_image
from safeclick_jax.parallel import batch_sharding, replicated
from safeclick_jax.training import losses


def host_batch(batch: dict, cache=None, strict: bool = True) -> dict:
    """A grain batch (numpy) -> the step's inputs (numpy)."""
    is_box = batch["prompt_type"] == 1
    coords, labels = prompting.click_or_box_tokens(batch["point_coords"], batch["box"], is_box)
    out = {"coords": coords, "labels": labels, "is_box": is_box, "mask": batch["mask"]}
    if "valid" in batch:
        out["valid"] = batch["valid"]
    if cache is not None:
        out.update({f"feat_{k}": v for k, v in cache.features(batch["roi_id"], strict).items()})
    else:
        out["image"] = batch["image"]
    return out


def cast_floats(tree, dtype):
    """Every floating-point leaf of a pytree (params, state) cast to dtype; others unchanged."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def image_features(model, batch, keep_block, dtype=jnp.float32):
    """Decoder features of the batch: from cached encoder outputs, or by running the encoder."""
    if "image" in batch:
        f = encode_image(model, batch["image"].astype(dtype), keep_block=keep_block)
        f = {"image_embed": f["image_embed"], "high_res_feats": f["high_res_feats"], "block": f.get("block")}
    else:
        g = lambda k: batch[f"feat_{k}"].astype(dtype)
        f = {
            "image_embed": g("image_embed"),
            "high_res_feats": (g("high_res_0"), g("high_res_1")),
            "block": g("block") if "feat_block" in batch else None,
        }
    block = f.pop("block")
    if hasattr(model, "safeclick"):  # E1, E2 and the CRL's channel attention: trainable
        f["refined"] = model.safeclick.image_features(block, f["image_embed"])
    return f


def decoder_outputs(model, features, coords, labels, mask_input=None, has_mask=None):
    """SAM 2's decode (models.sam2.decode_prompts) before its output selection: all four outputs
    (single-mask token 0, multimask tokens 1..3). mask_input [B,4E,4E,1] with has_mask [B], or
    None (no mask prompt). Returns (mask logits [B,4,4E,4E], iou [B,4], mask tokens [B,4,d],
    object score logits [B,1])."""
    pe, dec = model.sam_prompt_encoder, model.sam_mask_decoder
    b = coords.shape[0]
    if mask_input is None:
        m = 4 * features["image_embed"].shape[1]
        mask_input, has_mask = jnp.zeros((b, m, m, 1), jnp.float32), jnp.zeros((b,), bool)
    dt = features["image_embed"].dtype  # prompts embedded in float32, then cast (module docstring)
    sparse, dense = pe(coords, labels, mask_input, has_mask)
    hs, src = dec.transformer_tokens(
        features["image_embed"], pe.get_dense_pe().astype(dt), sparse.astype(dt), dense.astype(dt), labels != PAD_LABEL
    )
    if "refined" in features:
        src = model.safeclick.fuse(features["refined"], src)
    return dec.heads(hs, src, features["high_res_feats"])


def decode_all(model, features, coords, labels):
    """All four decoder outputs without a mask prompt -> (mask logits [B,4,4E,4E], iou [B,4],
    object score logits [B,1]), float32."""
    masks, iou, _, obj = decoder_outputs(model, features, coords, labels)
    return masks.astype(jnp.float32), iou.astype(jnp.float32), obj.astype(jnp.float32)


def to_input_resolution(logits, size: int):
    """Bilinear upsampling of [B,C,h,w] logits to [B,C,S,S] (SAM 2's F.interpolate, no antialias)."""
    return jax.image.resize(logits, logits.shape[:2] + (size, size), method="linear", antialias=False)


def loss_target(mask_logits, target, resolution: str):
    s = target.shape[-1]
    if resolution == "input":
        return to_input_resolution(mask_logits, s), target
    if resolution == "low_res":  # nearest (pixel-centre) downsampling of the ground truth
        r = s // mask_logits.shape[-1]
        return mask_logits, target[:, r // 2 :: r, r // 2 :: r]
    raise ValueError(f"loss.resolution {resolution!r}: expected 'input' or 'low_res'")


def compute_dtype(config):
    name = str(config.train.compute_dtype)
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.compute_dtype {name!r}: expected 'float32' or 'bfloat16'")
    return jnp.dtype(name)


def _loss_cfg(cfg) -> types.SimpleNamespace:
    return types.SimpleNamespace(**(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))


def apply_gradients(optimizer, schedule, nan_at: int, state, loss, terms: dict, grads, rng):
    """The optimizer update shared by the tasks' steps: a step whose loss or gradient norm is not
    finite leaves the state as it was (the loop stops on `finite`); `nan_at` >= 0 is the testing
    knob that makes that step diverge. -> (state, metrics: loss, `terms`, grad_norm, lr, finite)."""
    if nan_at >= 0:
        loss = jnp.where(state["step"] == nan_at, jnp.nan, loss)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    gnorm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    metrics = {"loss": loss, **terms, "grad_norm": gnorm, "lr": schedule(state["step"]), "finite": ok}
    return new, metrics


def chosen_output(masks, iou, cand):
    """The output a user of SAM 2's predictor sees: of the candidate outputs ([B,4] bool), the one
    with the highest predicted IoU. masks [B,4,h,w] -> [B,h,w]."""
    best = jnp.argmax(jnp.where(cand, iou, -jnp.inf), axis=-1)
    return jnp.take_along_axis(masks, best[:, None, None, None], axis=1)[:, 0]


def error_click(key, gt, pred):
    """sam2_utils.sample_random_points_from_errors with one point: uniform noise on the false
    positive (channel 0, or the background when the prediction is exact) and false negative
    (channel 1) maps, the argmax gives the click and its label. gt, pred [N,S,S] bool ->
    (coords [N,2] float (x, y), labels [N] int32)."""
    n, h, w = gt.shape
    fp, fn = ~gt & pred, gt & ~pred
    exact = jnp.all(gt == pred, axis=(1, 2))[:, None, None]
    noise = jax.random.uniform(key, (n, h, w, 2))
    noise = noise * jnp.stack([fp | (exact & ~gt), fn], axis=-1)
    idx = jnp.argmax(noise.reshape(n, -1), axis=-1)
    label, idx = idx % 2, idx // 2
    return jnp.stack([idx % w, idx // w], axis=-1).astype(jnp.float32), label.astype(jnp.int32)


def corrective_clicks(config) -> int:
    n = int(config.train.corrective_clicks)
    if n not in (0, 1):
        raise ValueError(f"train.corrective_clicks {n}: expected 0 or 1 (one corrective step)")
    return n


def corrected_decode(model, feats, batch, masks, iou, cand, key):
    """SAM2Train's iterative correction on one slice, one click: the first decoding's mask (the
    candidate with the highest predicted IoU, what a user sees) gets a click drawn uniformly from
    its error region (error_click: positive on a miss, negative on a spill); the prompt plus
    that click is decoded again with the first low-res logits as mask prompt (no gradient through
    the first mask, as SAM2Train). The tokens are those SAM 2's predictors build for the two
    prompts (prompting.sam2_tokens): the click goes where the first layout had its `not a point`
    token, which moves one slot on, so a click row becomes [click, correction, pad point, PAD]
    and a box row [corner, corner, correction, pad point].
    -> (mask logits [B,4,4E,4E], iou [B,4], object score logits [B,1]) of the second decoding."""
    low = jax.lax.stop_gradient(chosen_output(masks, iou, cand))
    pred = to_input_resolution(low[:, None], batch["mask"].shape[-1])[:, 0] > 0
    xy, label = error_click(key, batch["mask"] > 0, pred)
    b = label.shape[0]
    coords = jnp.concatenate([batch["coords"], jnp.zeros((b, 1, 2), batch["coords"].dtype)], axis=1)
    labels = jnp.concatenate([batch["labels"], jnp.full((b, 1), PAD_LABEL, batch["labels"].dtype)], axis=1)
    slot = jnp.argmax(labels == prompting.NOT_A_POINT, axis=1)[:, None]  # the first layout's pad point
    at = jnp.arange(labels.shape[1])[None]
    coords = jnp.where((at == slot)[..., None], xy[:, None], jnp.where((at == slot + 1)[..., None], 0.0, coords))
    labels = jnp.where(at == slot, label[:, None], jnp.where(at == slot + 1, prompting.NOT_A_POINT, labels))
    has_mask = jnp.ones((b,), bool)
    masks, iou, _, obj = decoder_outputs(model, feats, coords, labels, low[..., None], has_mask)
    return masks.astype(jnp.float32), iou.astype(jnp.float32), obj.astype(jnp.float32)


def make_train_step(graphdef, optimizer, schedule, config, mesh, keep_block, state_sharding=None, frozen_sharding=None):
    """The jit-compiled step(state, frozen, batch) -> (state, metrics). Shardings default to
    replicated (parallel.param_sharding gives the FSDP ones)."""
    loss_cfg = _loss_cfg(config.loss)
    multimask = bool(config.train.multimask)
    nan_at = int(config.debug.nan_at_step)
    cdt = compute_dtype(config)
    corrective = corrective_clicks(config)

    def step(state, frozen, batch):
        key, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))  # carried for stochastic layers

        def loss_fn(params):
            model = nnx.merge(graphdef, cast_floats(params, cdt), cast_floats(frozen, cdt))
            feats = image_features(model, batch, keep_block, cdt)
            gt = batch["mask"].astype(jnp.float32)
            masks, iou, obj = decode_all(model, feats, batch["coords"], batch["labels"])
            logits, target = loss_target(masks, gt, loss_cfg.resolution)
            cand = losses.candidate_outputs(batch["is_box"], multimask)
            loss, aux = losses.sam2_loss(logits, iou, obj, target, cand, loss_cfg)
            if corrective:
                masks, iou, obj = corrected_decode(model, feats, batch, masks, iou, cand, jax.random.fold_in(key, 1))
                logits, target = loss_target(masks, gt, loss_cfg.resolution)
                single = losses.candidate_outputs(jnp.ones_like(batch["is_box"]), multimask)
                loss2, aux2 = losses.sam2_loss(logits, iou, obj, target, single, loss_cfg)
                loss, aux = loss + loss2, {n: aux[n] + aux2[n] for n in ("focal", "dice", "iou", "class")}
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        terms = {n: aux[n] for n in ("focal", "dice", "iou", "class")}
        return apply_gradients(optimizer, schedule, nan_at, state, loss, terms, grads, jax.random.key_data(key))

    rep, data = replicated(mesh), batch_sharding(mesh)
    state_sharding = rep if state_sharding is None else state_sharding
    frozen_sharding = rep if frozen_sharding is None else frozen_sharding
    return jax.jit(
        step,
        in_shardings=(state_sharding, frozen_sharding, data),
        out_shardings=(state_sharding, rep),
        donate_argnums=(0,),
    )


def make_eval_step(graphdef, config, mesh, keep_block, params_sharding=None, frozen_sharding=None):
    """-> sums of hard Dice over valid rows: {"dice_sum", "count", "point_sum", "point_count",
    "box_sum", "box_count"}. A click uses the multimask output with the highest predicted IoU
    (what a user of SAM 2's predictor takes), a box the single mask; Dice at input resolution."""
    multimask = bool(config.train.multimask)
    cdt = compute_dtype(config)

    def step(params, frozen, batch):
        model = nnx.merge(graphdef, cast_floats(params, cdt), cast_floats(frozen, cdt))
        feats = image_features(model, batch, keep_block, cdt)
        masks, iou, _ = decode_all(model, feats, batch["coords"], batch["labels"])
        cand = losses.candidate_outputs(batch["is_box"], multimask)
        chosen = to_input_resolution(chosen_output(masks, iou, cand)[:, None], batch["mask"].shape[-1])[:, 0]
        valid = batch["valid"]
        d = losses.hard_dice(chosen, batch["mask"], valid)
        isb = batch["is_box"]
        f = lambda x: x.astype(jnp.float32).sum()
        return {
            "dice_sum": d.sum(),
            "count": f(valid),
            "box_sum": (d * isb).sum(),
            "box_count": f(valid & isb),
            "point_sum": (d * ~isb).sum(),
            "point_count": f(valid & ~isb),
        }

    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(
            rep if params_sharding is None else params_sharding,
            rep if frozen_sharding is None else frozen_sharding,
            data,
        ),
        out_shardings=rep,
    )
