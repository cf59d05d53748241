"""Full SAM 2 training on clips: the image encoder, the memory path and the decoder trained together
as sam2's `SAM2Train` (training/model/sam2.py) and `MultiStepMultiMasksAndIous`
(training/loss_fns.py) train them.

API (what the training loop calls):

    plan = clips.prompt_plan(rng, masks, cfg)          # host, numpy: SAM2Train.prepare_prompt_inputs
    out = track_clip(model, mem, images, masks, plan, key, cfg)   # one differentiable forward
    loss, terms = multistep_loss(out, masks, loss_cfg)      # MultiStepMultiMasksAndIous
    loss, (terms, out) = clip_loss(model, mem, images, masks, plan, key, cfg, loss_cfg, drop_path, dropout)

    images [B, T, S, S, 3] normalised (B clips of T slices), masks [B, T, K, S, S] bool/0-1
    (K objects per clip), plan: a dict of arrays (safeclick_jax/data/clips.py), key: a PRNG key
    (corrective clicks and drop_path drawn in the graph), cfg: the `clip` config section
    (configs/common.py `_full`), loss cfg: the `loss` section.

The objects of all clips form SAM2Train's batch (N = B*K rows); the image features of a slice are
computed once and shared by its clip's objects. One plan serves the whole batch, as in SAM2Train
(one draw of prepare_prompt_inputs per forward). Every decision of the plan is an array, so one
compiled function serves every plan of a clip shape:

    order     [T] int32    processing order: initial conditioning frames first, then the rest in order
    init_cond [T] bool     initial conditioning frames (frame 0 always)
    correct   [T] bool     frames that get corrective clicks (frames_to_add_correction_pt)
    use_pt    []  bool     clicks / boxes on the initial conditioning frames, else their GT mask
    coords    [T, N, 2, 2] float32, labels [T, N, 2] int32: the initial click (label 1, then -2
                           padding) or box (labels 2, 3) of each initial conditioning frame
    from_gt   [T, C] bool  correction step draws its click from the GT instead of the error
                           (prob_to_sample_from_gt_for_train)
    replay: optional corr_coords [T, C, N, 2], corr_labels [T, C, N]: corrective clicks given
    (recorded from torch) instead of drawn in the graph.

Tracking (SAM2Train.forward_tracking / track_step): a memory bank with one entry per processed
frame, in processing order (its `frame`, and `kind` 1 = tracked, 2 = conditioning); the i-th
processed frame sees the i entries before it. An initial conditioning frame uses
its features plus no_mem_embed (directly_add_no_mem_embed); every other frame attends to the
memories of all conditioning frames (t_pos 0) and of the tracked frames 1..num_maskmem-1 before
it, and to the pointers of all conditioning frames (training keeps future ones) and of the tracked
frames up to min(T, max_obj_ptrs_in_encoder) - 1 before it. A frame is either conditioning or
tracked, so one memory entry per frame serves both roles; entries that do not apply (tracked
frames too far back or ahead) are masked out of the attention. A mask prompt becomes the frame's
output (use_mask_input_as_output_without_sam).
Corrective clicks (num_correction_pt_per_frame) are drawn uniformly from the error region of the
previous step (sam2_utils.sample_random_points_from_errors), each step decoding with the previous
low-res logits as mask prompt; a corrected frame becomes conditioning
(add_all_frames_to_correct_as_cond). The memory encoder reads sigmoid(logits), as SAM2Base in
training mode; `binarize_mask_from_pts_for_mem_enc` thresholds masks of frames with clicks instead
(what SAM2Base does in eval mode).

Multimask (sam2 configs: multimask_output_in_sam, for tracking, 0..1 points): a decoding with at
most one point uses the three multimask outputs, else the single mask. Each step keeps all four
decoder outputs with a `multimask` flag so that every frame has one shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from safeclick_jax import video
from safeclick_jax.models.image_encoder import sine_position_encoding
from safeclick_jax.models.sam2 import PAD_LABEL
from safeclick_jax.training import losses
from safeclick_jax.training.step import decoder_outputs, error_click

NOT_A_POINT = -1
OBJ_FOCAL = (-1.0, 0.0)  # sam2 yaml: focal_alpha_obj_score -1, focal_gamma_obj_score 0 (= BCE)
MULTIMASK_MAX_POINTS = 1  # sam2 configs: multimask_min_pt_num 0, multimask_max_pt_num 1


def encode_clips(model, images, drop_path=None):
    """images [B,T,S,S,3] -> per-frame features {pix, pos, high_res, block?}, each [T, B, ...]."""
    b, t = images.shape[:2]
    feats = video.encode_frame(model, images.reshape((b * t,) + images.shape[2:]), drop_path)
    frame_major = lambda x: x.reshape((b, t) + x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(frame_major, feats)


def per_object(x, k: int):
    """[B, ...] clip features -> [B*K, ...] (each clip's row repeated for its K objects)."""
    return jnp.repeat(x, k, axis=0)


def frame_features(feats: dict, f, k: int) -> dict:
    return jax.tree.map(lambda x: per_object(x[f], k), feats)


def memory_conditioned(mem, feats: dict, bank: dict, f, num_frames: int, dropout=None):
    """sam2_base._prepare_memory_conditioned_features (training mode, max_cond_frames_in_attn -1,
    stride 1) for frame f from the bank of the frames processed before it -> [N,E,E,d]. dropout:
    None or (key, rate)."""
    mc = mem.mc
    n, e, _, d = feats["pix"].shape
    t = bank["frame"]
    dist = f - t
    cond = bank["kind"] == 2
    tracked = bank["kind"] == 1
    spatial_valid = cond | (tracked & (dist >= 1) & (dist < mc.num_maskmem))
    tpos = jnp.where(cond, 0, jnp.clip(mc.num_maskmem - dist, 1, mc.num_maskmem - 1))
    sine = jnp.asarray(sine_position_encoding(e, e, mc.mem_dim)).reshape(1, e * e, mc.mem_dim)
    spatial_pos = (sine + mem.tpos_enc(tpos)[:, None, :]).reshape(-1, mc.mem_dim)  # [T*E*E, m]
    spatial = bank["feats"].transpose(1, 0, 2, 3, 4).reshape(n, -1, mc.mem_dim)

    max_ptrs = min(num_frames, mc.max_obj_ptrs_in_encoder)
    ptr_valid = cond | (tracked & (dist >= 1) & (dist < max_ptrs))
    rel = dist if mc.use_signed_tpos_enc_to_obj_ptrs else jnp.abs(dist)
    split = mc.d_model // mc.mem_dim  # a pointer becomes `split` tokens of mem_dim
    ptr_pos = jnp.repeat(mem.obj_ptr_pos(rel, jnp.int32(max_ptrs)), split, axis=0)
    ptrs = bank["ptr"].transpose(1, 0, 2).reshape(n, -1, mc.mem_dim)

    memory = jnp.concatenate([spatial, ptrs], axis=1)
    pos = jnp.broadcast_to(jnp.concatenate([spatial_pos, ptr_pos])[None], memory.shape)
    mask = jnp.concatenate([jnp.repeat(spatial_valid, e * e), jnp.repeat(ptr_valid, split)])
    mask = jnp.broadcast_to(mask[None], memory.shape[:2])
    x = mem.memory_attention(
        feats["pix"].reshape(n, e * e, d), feats["pos"].reshape(n, e * e, d), memory, pos, ptrs.shape[1], mask, dropout
    )
    return x.reshape(n, e, e, d)


def heads(model, mem, feats: dict, pix, coords, labels, mask_input, has_mask):
    """sam2_base._forward_sam_heads with the multimask choice traced (from the number of points).
    -> dict(masks [N,4,h,w] all four outputs, no-object rows at NO_OBJ_SCORE; iou [N,4];
    obj [N,1]; multimask [] bool; low [N,h,w] the chosen mask; ptr [N,d])."""
    features = {"image_embed": pix, "high_res_feats": feats["high_res"]}
    if hasattr(model, "safeclick"):
        features["refined"] = model.safeclick.image_features(feats["block"], pix)
    masks, iou, tokens, obj = decoder_outputs(model, features, coords, labels, mask_input, has_mask)
    # float32 outputs whatever the compute dtype (bf16): as a GT mask prompt's (mask_prompt_output),
    # the other branch of the conditionals in track_clip, and the loss's inputs
    masks, iou, obj = masks.astype(jnp.float32), iou.astype(jnp.float32), obj.astype(jnp.float32)
    masks = jnp.where((obj > 0)[:, :, None, None], masks, video.NO_OBJ_SCORE)
    multimask = jnp.sum(labels[0] >= 0) <= MULTIMASK_MAX_POINTS
    best = jnp.where(multimask, jnp.argmax(iou[:, 1:], axis=-1) + 1, 0)
    low = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)[:, 0]
    token = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
    return {
        "masks": masks,
        "iou": iou,
        "obj": obj,
        "multimask": multimask,
        "low": low,
        "ptr": mem.object_pointer(token, obj).astype(jnp.float32),
    }


def mask_prompt_output(model, mem, feats: dict, gt):
    """A GT mask prompt as the frame's output (sam2_base._use_mask_as_output), in `heads`' layout:
    the mask in output 0, IoU 1."""
    low, ptr, obj = video.mask_as_output(model, mem, feats, gt[..., None])
    n = gt.shape[0]
    masks = jnp.zeros((n, 4) + low.shape[1:], low.dtype).at[:, 0].set(low)
    iou = jnp.zeros((n, 4), jnp.float32).at[:, 0].set(1.0)
    return {"masks": masks, "iou": iou, "obj": obj, "multimask": jnp.bool_(False), "low": low, "ptr": ptr}


def correct(model, mem, feats, pix, coords, labels, first, gt, key, from_gt, replay, size: int):
    """SAM2Train._iter_correct_pt_sampling: C corrective clicks, each from the error of the previous
    step, decoded with the previous low-res logits as mask prompt. coords/labels [N,P,...] with
    the C correction slots after the two initial ones. -> (per-step outputs stacked [C, ...],
    the last step's outputs)."""
    n = gt.shape[0]

    def step(carry, xs):
        coords, labels, low = carry
        j, k, use_gt, rc, rl = xs
        if replay:
            c, lab = rc, rl
        else:
            pred = jax.lax.stop_gradient(video.upsample(low, size)[..., 0] > 0) & ~use_gt
            c, lab = error_click(k, gt, pred)
        coords = jax.lax.dynamic_update_index_in_dim(coords, c, 2 + j, axis=1)
        labels = jax.lax.dynamic_update_index_in_dim(labels, lab, 2 + j, axis=1).at[:, -2].set(PAD_LABEL)
        out = heads(model, mem, feats, pix, coords, labels, low[..., None], jnp.ones((n,), bool))
        return (coords, labels, out["low"]), out

    num = from_gt.shape[0]
    keys = jax.random.split(key, num)
    rc, rl = replay if replay else (jnp.zeros((num, n, 2)), jnp.zeros((num, n), jnp.int32))
    # Each step's decoding is recomputed in the backward pass rather than saved: saved, the
    # activations of C steps are stacked [C, N, H/4, W/4, 32]-sized buffers (memory on any
    # backend) that XLA:CPU also fills with zeros and copies, which costs more than decoding again.
    (coords, labels, _), outs = jax.lax.scan(
        jax.checkpoint(step, prevent_cse=False),
        (coords, labels, first["low"]),
        (jnp.arange(num), keys, from_gt, rc, rl),
    )
    last = jax.tree.map(lambda x: x[-1], outs)
    return outs, last


def track_clip(model, mem, images, masks, plan: dict, key, cfg, drop_path: float = 0.0, dropout: float = 0.0) -> dict:
    """SAM2Train.forward_tracking over the clips -> per processing slot i (frame plan["order"][i]):
    masks [T, 1+C, N, 4, h, w], iou [T, 1+C, N, 4], obj [T, 1+C, N, 1], multimask [T, 1+C],
    valid [T, 1+C] (correction steps only on corrected frames), mask_prompt [T] (step 0 is a GT
    mask prompt), frame [T], ptr [T, N, d] and mem_feats [T, N, E, E, m] (the frame's final pointer
    and memory). cfg: the `clip` config section; drop_path: Hiera's stochastic depth rate;
    dropout: memory attention's dropout rate (model.drop_path / model.dropout)."""
    b, num_frames, k, size = masks.shape[0], masks.shape[1], masks.shape[2], masks.shape[-1]
    n = b * k
    c = int(cfg.num_correction_pt_per_frame)
    max_init = 1 if num_frames == 1 else int(cfg.num_init_cond_frames)
    gt_all = masks.astype(bool).transpose(1, 0, 2, 3, 4).reshape(num_frames, n, size, size)
    key, drop_key = jax.random.split(key)
    feats_all = encode_clips(model, images, (drop_key, float(drop_path)) if drop_path > 0 else None)
    e = feats_all["pix"].shape[2]
    # Entry i of the bank is the i-th processed frame's memory, and the i-th processed frame
    # attends to the static slice bank[:i]: the memories that exist so far (SAM2Train gathers just
    # these), not a slot per frame with the missing ones masked, which would cost attention work.
    bank = {
        "feats": jnp.zeros((num_frames, n, e, e, mem.mc.mem_dim), jnp.float32),
        "ptr": jnp.zeros((num_frames, n, mem.mc.d_model), jnp.float32),
        "kind": jnp.zeros((num_frames,), jnp.int32),
        "frame": jnp.zeros((num_frames,), jnp.int32),
    }
    # prompt slots: 2 initial (click or box corners), c corrective, SAM's pad point, and a second pad
    # point while a frame has no points (SAM2Base pads point_inputs=None with one itself)
    no_click = (
        jnp.zeros((n, c + 4, 2), jnp.float32),
        jnp.full((n, c + 4), NOT_A_POINT, jnp.int32).at[:, : c + 2].set(PAD_LABEL),
    )
    replay = "corr_coords" in plan
    slots = []
    for i in range(num_frames):
        f = plan["order"][i]
        feats = frame_features(feats_all, f, k)
        gt = gt_all[f]
        is_init = plan["init_cond"][f] if 0 < i < max_init else (i == 0)
        coords = no_click[0].at[:, :2].set(plan["coords"][f])
        has_pts = is_init & plan["use_pt"]
        labels = no_click[1].at[:, :2].set(jnp.where(has_pts, plan["labels"][f], PAD_LABEL))
        labels = labels.at[:, -2].set(jnp.where(has_pts, PAD_LABEL, NOT_A_POINT))

        drop = (jax.random.fold_in(drop_key, 1000 + i), float(dropout)) if dropout > 0 else None

        def tracked(feats=feats, f=f, bank=jax.tree.map(lambda x, i=i: x[:i], bank), drop=drop):
            return memory_conditioned(mem, feats, bank, f, num_frames, drop)

        untracked = lambda feats=feats: video.no_memory_features(model, feats)
        if i == 0:
            pix = untracked()
        elif i < max_init:
            pix = jax.lax.cond(is_init, untracked, tracked)
        else:
            pix = tracked()

        sam = lambda feats=feats, pix=pix, coords=coords, labels=labels: heads(
            model, mem, feats, pix, coords, labels, None, None
        )
        if i < max_init:
            first = jax.lax.cond(is_init & ~plan["use_pt"], lambda: mask_prompt_output(model, mem, feats, gt), sam)
        else:
            first = sam()

        do_correct = plan["correct"][f]
        rep = (plan["corr_coords"][f], plan["corr_labels"][f]) if replay else None
        k_f = jax.random.fold_in(key, f)

        def corrected(feats=feats, pix=pix, coords=coords, labels=labels, first=first, gt=gt, k_f=k_f, rep=rep, f=f):
            return correct(model, mem, feats, pix, coords, labels, first, gt, k_f, plan["from_gt"][f], rep, size)

        def uncorrected(first=first):
            steps = jax.tree.map(lambda x: jnp.zeros((c,) + x.shape, x.dtype), first)
            return steps, first

        steps, last = jax.lax.cond(do_correct, corrected, uncorrected) if c > 0 else (None, first)

        mask_prompt = (is_init & ~plan["use_pt"]) if i < max_init else jnp.bool_(False)
        hr = jnp.where(mask_prompt, gt.astype(jnp.float32) * 20.0 - 10.0, video.upsample(last["low"], size)[..., 0])
        has_points = (is_init & plan["use_pt"]) | do_correct
        binarize = has_points & bool(cfg.binarize_mask_from_pts_for_mem_enc)
        mem_feats, _ = mem.encode_memory(feats["pix"], hr[..., None], last["obj"], jnp.broadcast_to(binarize, (n,)))
        kind = jnp.where(is_init | (do_correct & bool(cfg.add_all_frames_to_correct_as_cond)), 2, 1)
        bank = {
            "feats": bank["feats"].at[i].set(mem_feats),
            "ptr": bank["ptr"].at[i].set(last["ptr"]),
            "kind": bank["kind"].at[i].set(kind),
            "frame": bank["frame"].at[i].set(f),
        }
        keep = ("masks", "iou", "obj", "multimask")
        all_steps = {
            key_: jnp.concatenate([first[key_][None], steps[key_]]) if c > 0 else first[key_][None] for key_ in keep
        }
        valid = jnp.concatenate([jnp.ones((1,), bool), jnp.broadcast_to(do_correct, (c,))])
        slots.append(
            {
                **all_steps,
                "valid": valid,
                "mask_prompt": mask_prompt,
                "frame": f,
                "ptr": last["ptr"],
                "mem_feats": mem_feats,
            }
        )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *slots)


def step_loss(masks, iou, obj, multimask, mask_prompt, target, real, cfg):
    """MultiStepMultiMasksAndIous._update_losses for one decoding of N objects, each term summed
    over objects (not yet divided by their number). masks [N,4,h,w] low-res logits, target [N,S,S],
    real [N] 1 for an object, 0 for a padding slot (no term)."""
    size = target.shape[-1]
    t = target.astype(jnp.float32)[:, None]
    hr = jax.image.resize(masks, masks.shape[:2] + (size, size), "linear", antialias=False)
    hr = jnp.where(mask_prompt, t * 20.0 - 10.0, hr)  # a mask prompt's output is the mask itself
    cand = jnp.where(multimask, jnp.array([False, True, True, True]), jnp.array([True, False, False, False]))
    focal = losses.sigmoid_focal(hr, t, cfg.focal_alpha, cfg.focal_gamma)  # [N,4]
    dice = losses.dice(hr, t)
    err = iou - jax.lax.stop_gradient(losses.actual_iou(hr, t))
    iou_err = jnp.abs(err) if cfg.iou_loss == "l1" else err**2
    combo = cfg.mask_weight * focal + cfg.dice_weight * dice
    best = jnp.argmin(jnp.where(cand, combo, jnp.inf), axis=-1)[:, None]
    pick = lambda x: jnp.take_along_axis(x, best, axis=1)[:, 0]
    if cfg.supervise_all_iou:
        iou_l = jnp.sum(jnp.where(cand, iou_err, 0.0), -1) / jnp.sum(cand)
    else:
        iou_l = pick(iou_err)
    present = jnp.any(target, axis=(1, 2)).astype(jnp.float32) * real
    obj_l = losses.sigmoid_focal(obj[:, :, None], present[:, None, None], *OBJ_FOCAL)
    return {
        "mask": jnp.sum(pick(focal) * present),
        "dice": jnp.sum(pick(dice) * present),
        "iou": jnp.sum(iou_l * present),
        "class": jnp.sum(obj_l * real),
    }


def multistep_loss(out: dict, masks, cfg, objects=None):
    """MultiStepMultiMasksAndIous over every decoding step of every frame: (weighted total, terms),
    each term summed over steps and frames and divided by the number of objects.

    objects [B, K] bool (optional): which object slots hold an object. A padding slot (a clip with
    fewer than K objects, data/clips.py) is not one of SAM2Train's objects: it adds no loss term,
    the object score's included, and is not counted."""
    num_frames, steps = out["valid"].shape
    n = out["masks"].shape[2]
    real = jnp.ones((n,), jnp.float32) if objects is None else objects.reshape(n).astype(jnp.float32)
    size = masks.shape[-1]
    gt = masks.astype(bool).transpose(1, 0, 2, 3, 4).reshape(num_frames, n, size, size)[out["frame"]]
    flat = lambda x: x.reshape((num_frames * steps,) + x.shape[2:])
    xs = (
        flat(out["masks"]),
        flat(out["iou"]),
        flat(out["obj"]),
        out["multimask"].reshape(-1),
        jnp.repeat(out["mask_prompt"], steps),
        jnp.repeat(gt, steps, axis=0),
        out["valid"].reshape(-1),
    )

    # A step that did not run (the correction slots of an uncorrected frame) is skipped, not
    # computed and zeroed: SAM2Train's loss sees only the steps that ran.
    @jax.checkpoint  # the input-resolution logits of a step are recomputed in the backward pass
    def one(xs):
        m, i, o, mm, mp, t, v = xs
        ran = lambda: step_loss(m, i, o, mm, mp, t, real, cfg)
        skipped = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(ran))
        return jax.lax.cond(v, ran, skipped)

    count = jnp.maximum(jnp.sum(real), 1.0)
    terms = jax.tree.map(lambda x: jnp.sum(x) / count, jax.lax.map(one, xs))
    total = (
        cfg.mask_weight * terms["mask"]
        + cfg.dice_weight * terms["dice"]
        + cfg.iou_weight * terms["iou"]
        + cfg.class_weight * terms["class"]
    )
    return total, terms


def final_dice(out: dict, masks, objects):
    """Hard Dice of every object's final mask on every frame: the chosen output of the frame's last
    decoding step (the best multimask output by predicted IoU for at most one point, else the
    single mask) at input resolution, > 0, against the GT (1 when both are empty). objects [B, K]:
    padding slots are left out. -> (sum over objects and frames, their count)."""
    num_frames, n = out["valid"].shape[0], out["masks"].shape[2]
    size = masks.shape[-1]
    gt = masks.astype(bool).transpose(1, 0, 2, 3, 4).reshape(num_frames, n, size, size)[out["frame"]]
    last = jnp.sum(out["valid"], axis=1) - 1  # valid steps are a prefix: step 0, then all corrections or none
    pick = lambda x: jnp.take_along_axis(x, last.reshape((num_frames,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    logits, iou = pick(out["masks"]).astype(jnp.float32), pick(out["iou"])  # [T, N, 4, h, w], [T, N, 4]
    multimask = pick(out["multimask"][..., None])[:, 0]
    best = jnp.where(multimask[:, None], jnp.argmax(iou[..., 1:], axis=-1) + 1, 0)
    chosen = jnp.take_along_axis(logits, best[..., None, None, None], axis=2)[:, :, 0]
    chosen = jax.image.resize(chosen, chosen.shape[:2] + (size, size), "linear", antialias=False)
    real = jnp.broadcast_to(objects.reshape(1, n), (num_frames, n))
    d = losses.hard_dice(chosen, gt, real)
    return jnp.sum(d), jnp.sum(real.astype(jnp.float32))


def clip_loss(
    model, mem, images, masks, plan, key, cfg, loss_cfg, drop_path: float = 0.0, dropout: float = 0.0, objects=None
):
    """The differentiable loss of one batch of clips: (loss, (terms, tracking outputs)); objects
    [B, K] marks the slots that hold an object (multistep_loss)."""
    out = track_clip(model, mem, images, masks, plan, key, cfg, drop_path, dropout)
    loss, terms = multistep_loss(out, masks, loss_cfg, objects)
    return loss, (terms, out)


def split_model(model, mem):
    """(graphdef, params) of the pair (image model, memory path) for jax.grad over both."""
    return nnx.split((model, mem))
