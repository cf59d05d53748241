"""SAM 2's tracking step for volumes (slices = video frames), as pure functions of
(image model, SAM2Memory, memory bank).

The memory bank is a fixed-size pytree with one entry per slice, so the slice a step reads or
writes is a traced index and propagation never recompiles:

    feats  [N, E, E, mem_dim] bfloat16   spatial memory (SAM 2 stores it as bf16)
    ptr    [N, d]             float32    object pointer
    kind   [N]                int32      0 = nothing, 1 = tracked (non-conditioning), 2 = prompted
    masks  [N, 4E, 4E]        float32    low-resolution mask logits (SAM 2's `pred_masks`)
    score  [N]                float32    object score logit

It plays the role of SAM2VideoPredictor's output_dict: the memories a slice attends to are
gathered from it with validity masks exactly as sam2_base._prepare_memory_conditioned_features
picks them from the dicts (all prompted slices at t_pos 0; the slices t -+ 1..num_maskmem-1 that
were tracked, in the direction of travel; pointers of prompted slices not in the future and of
up to 15 tracked slices before t). Prompted slices use `cond_slots` padded slots (a power of
two, so adding prompts recompiles only when their count crosses one); invalid slots are masked
out of the attention, which leaves the result unchanged. The previous-slice memories are chosen on
the host (`memory_slots`, from a host copy of `kind`) and only those that exist are gathered,
padded to 2, 4 or num_maskmem - 1 slots: near the prompted slice only 1-3 of the 6 exist, and
attending to all 6 (masked) would make memory attention ~640 of a slice's ~1500 ms on a CPU
(`benchmarks/bench_volume.py`).

Only `bank_entries` (the gather of the entries slice t attends to) and `write` see the bank, so
only they depend on the number of slices: the model steps (`condition_features`, `track_step`,
`encode_memory`) take the gathered entries and compile once for volumes of every size.

Every image model works: SAM2Image and SafeClickModel (whose consensus layer then reads the
memory-conditioned features, the input SAM 2's decoder reads when tracking).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from safeclick_jax.models.image_encoder import sine_position_encoding
from safeclick_jax.models.sam2 import PAD_LABEL
from safeclick_jax.prompting import PROMPT_BUCKET

NO_OBJ_SCORE = -1024.0  # sam2_base.py: mask logits of a slice without the object


def empty_bank(num_slices: int, embed: int, mem_dim: int, d_model: int) -> dict:
    return {
        "feats": jnp.zeros((num_slices, embed, embed, mem_dim), jnp.bfloat16),
        "ptr": jnp.zeros((num_slices, d_model), jnp.float32),
        "kind": jnp.zeros((num_slices,), jnp.int32),
        "masks": jnp.zeros((num_slices, 4 * embed, 4 * embed), jnp.float32),
        "score": jnp.zeros((num_slices,), jnp.float32),
    }


def encode_frame(model, image, drop_path=None) -> dict:
    """image [B,S,S,3] normalised -> raw stride-16 features and pos (no no_mem_embed), the
    decoder's high-res features, and SafeClick's intermediate block when the model has one.
    drop_path: Hiera's stochastic depth (key, rate) in training, None otherwise."""
    out = model.image_encoder(image, drop_path)
    fpn = out["backbone_fpn"]
    feats = {
        "pix": fpn[-1],
        "pos": out["vision_pos_enc"][-1],
        "high_res": model.sam_mask_decoder.project_high_res(fpn[0], fpn[1]),
    }
    if hasattr(model, "safeclick"):
        feats["block"] = out["blocks"][model.keep_block]
    return feats


def memory_slots(kind: np.ndarray, t: int, reverse: bool, num_maskmem: int, min_slots: int = 1):
    """Host side: which tracked slices t attends to as spatial memories (SAM 2: the slices
    t -+ 1..num_maskmem-1 in the direction of travel that hold a non-conditioning output, at
    t_pos num_maskmem - distance). kind: the bank's `kind` on the host. Returns (idx, t_pos,
    valid) int32/int32/bool arrays padded to a bucket size of at least `min_slots` (few compiled
    shapes)."""
    n, sign = len(kind), (-1 if reverse else 1)
    chosen = [(t - (num_maskmem - tp) * sign, tp) for tp in range(1, num_maskmem)]
    chosen = [(i, tp) for i, tp in chosen if 0 <= i < n and kind[i] == 1]
    buckets = [b for b in (2, 4) if b < num_maskmem - 1] + [max(num_maskmem - 1, 1)]
    size = min(b for b in buckets if b >= max(len(chosen), min_slots))
    idx, tpos, valid = np.zeros(size, np.int32), np.ones(size, np.int32), np.zeros(size, bool)
    for j, (i, tp) in enumerate(chosen):
        idx[j], tpos[j], valid[j] = i, tp, True
    return idx, tpos, valid


def bank_entries(bank: dict, t, reverse, cond_idx, prev_idx, max_obj_ptrs: int) -> dict:
    """The bank entries slice t may attend to: spatial memories of the prompted slices `cond_idx`
    and of `prev_idx` (memory_slots), object pointers of the prompted slices and of the slices
    t -+ 1..max_obj_ptrs-1 with whether those were tracked, and the number of slices."""
    n = bank["kind"].shape[0]
    tt = t - jnp.arange(1, max_obj_ptrs) * jnp.where(reverse, -1, 1)
    tt_c = jnp.clip(tt, 0, n - 1)
    return {
        "feats": bank["feats"][jnp.concatenate([cond_idx, prev_idx])],
        "ptr": bank["ptr"][jnp.concatenate([cond_idx, tt_c])],
        "tracked": (tt >= 0) & (tt < n) & (bank["kind"][tt_c] == 1),
        "num_slices": jnp.int32(n),
    }


def gather_memory(mem, entries: dict, t, reverse, cond_idx, cond_valid, prev):
    """Memories of slice t: (memory [1,M,mem_dim], pos [1,M,mem_dim], key_mask [1,M], number of
    pointer tokens). entries: bank_entries(...); t, reverse: traced scalars; cond_idx /
    cond_valid [K] the prompted slices; prev: memory_slots(...) of slice t (arrays, traced)."""
    mc = mem.mc
    e = entries["feats"].shape[1]
    sign = jnp.where(reverse, -1, 1)

    # spatial memories: prompted slices (t_pos 0), then the existing ones of t_pos 1..num_maskmem-1
    _, prev_tpos, prev_valid = prev
    valid = jnp.concatenate([cond_valid, prev_valid])
    tpos = mem.tpos_enc(jnp.concatenate([jnp.zeros_like(cond_idx), prev_tpos]))  # [K + S, mem_dim]
    sine = jnp.asarray(sine_position_encoding(e, e, mc.mem_dim)).reshape(1, e * e, mc.mem_dim)
    spatial = entries["feats"].astype(jnp.float32).reshape(-1, e * e, mc.mem_dim)
    spatial_pos = sine + tpos[:, None, :]

    # object pointers: prompted slices not in the future, then tracked slices t -+ 1..15
    max_ptrs = jnp.minimum(entries["num_slices"], mc.max_obj_ptrs_in_encoder)
    c_valid = cond_valid
    if mc.only_obj_ptrs_in_the_past_for_eval:
        c_valid = c_valid & (cond_idx * sign <= t * sign)
    c_rel = (t - cond_idx) * sign if mc.use_signed_tpos_enc_to_obj_ptrs else jnp.abs(t - cond_idx)
    t_diff = jnp.arange(1, mc.max_obj_ptrs_in_encoder)
    p_valid = jnp.concatenate([c_valid, entries["tracked"] & (t_diff < max_ptrs)])
    p_pos = mem.obj_ptr_pos(jnp.concatenate([c_rel, t_diff]), max_ptrs)  # [P, mem_dim]
    split = mc.d_model // mc.mem_dim  # a pointer becomes `split` tokens of mem_dim
    ptrs = entries["ptr"].reshape(-1, mc.mem_dim)
    ptr_pos = jnp.repeat(p_pos, split, axis=0)
    ptr_valid = jnp.repeat(p_valid, split)

    memory = jnp.concatenate([spatial.reshape(-1, mc.mem_dim), ptrs])[None]
    pos = jnp.concatenate([spatial_pos.reshape(-1, mc.mem_dim), ptr_pos])[None]
    mask = jnp.concatenate([jnp.repeat(valid, e * e), ptr_valid])[None]
    return memory, pos, mask, ptrs.shape[0]


def condition_features(model, mem, feats: dict, entries: dict, t, reverse, cond_idx, cond_valid, prev):
    """Memory attention on slice t's features -> [1,E,E,d] (the decoder's image embedding)."""
    b, e, _, d = feats["pix"].shape
    memory, pos, mask, n_ptr = gather_memory(mem, entries, t, reverse, cond_idx, cond_valid, prev)
    x = mem.memory_attention(
        feats["pix"].reshape(b, e * e, d), feats["pos"].reshape(b, e * e, d), memory, pos, n_ptr, mask
    )
    return x.reshape(b, e, e, d)


def no_memory_features(model, feats: dict):
    """A slice prompted before any tracking: features + no_mem_embed (directly_add_no_mem_embed)."""
    return feats["pix"] + model.no_mem_embed[...].reshape(1, 1, 1, -1)


def sam_heads(model, mem, feats: dict, pix, coords, labels, mask_input, has_mask, multimask: bool):
    """sam2_base._forward_sam_heads for one slice. coords [1,P,2] in input pixels with SAM's pad
    point and PAD_LABEL padding; mask_input [1,4E,4E,1]. Returns (best low-res logits [1,4E,4E],
    object pointer [1,d], object score [1,1])."""
    features = {"image_embed": pix, "high_res_feats": feats["high_res"]}
    if hasattr(model, "safeclick"):
        features["refined"] = model.safeclick.image_features(feats["block"], pix)
    masks, iou, tokens, obj = model.decode(features, coords, labels, mask_input, has_mask, multimask)
    masks = jnp.where((obj > 0)[:, :, None, None], masks, NO_OBJ_SCORE)
    if multimask:
        best = jnp.argmax(iou, axis=-1)  # [1]
        low = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)[:, 0]
        token = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0] if tokens.shape[1] > 1 else tokens[:, 0]
    else:
        low, token = masks[:, 0], tokens[:, 0]
    return low, mem.object_pointer(token, obj), obj


def upsample(low, size: int):
    """[B, h, w] low-res logits -> [B, size, size, 1] (bilinear, align_corners=False)."""
    return jax.image.resize(low, (low.shape[0], size, size), "linear", antialias=False)[..., None]


def encode_memory(mem, feats: dict, low, obj, binarize, size: int):
    """sam2_base._encode_new_memory on the upsampled logits; features rounded to bf16 as SAM 2
    stores them."""
    f, _ = mem.encode_memory(feats["pix"], upsample(low, size), obj, binarize)
    return f.astype(jnp.bfloat16)


def write(bank: dict, t, feats_bf16, ptr, kind: int, low, obj) -> dict:
    return {
        "feats": bank["feats"].at[t].set(feats_bf16[0]),
        "ptr": bank["ptr"].at[t].set(ptr[0]),
        "kind": bank["kind"].at[t].set(kind),
        "masks": bank["masks"].at[t].set(low[0]),
        "score": bank["score"].at[t].set(obj[0, 0]),
    }


def no_prompt(batch: int = 1):
    """The tracking prompt: SAM 2 pads one (0,0) 'not a point' and its prompt encoder a second."""
    coords = jnp.zeros((batch, PROMPT_BUCKET, 2), jnp.float32)
    labels = jnp.full((batch, PROMPT_BUCKET), PAD_LABEL, jnp.int32).at[:, :2].set(-1)
    return coords, labels


def track_step(model, mem, feats: dict, entries: dict, t, reverse, cond_idx, cond_valid, prev, size: int):
    """One propagation step on slice t (not prompted) from its encode_frame features and the
    bank_entries it attends to: memory attention, SAM heads with multimask (tracking), memory
    encoder on the mask upsampled to the input `size`. -> (memory features bf16, object pointer,
    low-res logits, object score), the slice's entry of the bank (`write(..., kind=1, ...)`)."""
    pix = condition_features(model, mem, feats, entries, t, reverse, cond_idx, cond_valid, prev)
    coords, labels = no_prompt()
    e = feats["pix"].shape[1]
    mask_in = jnp.zeros((1, 4 * e, 4 * e, 1), jnp.float32)
    low, ptr, obj = sam_heads(model, mem, feats, pix, coords, labels, mask_in, jnp.zeros((1,), bool), True)
    return encode_memory(mem, feats, low, obj, False, size), ptr, low, obj


def mask_as_output(model, mem, feats: dict, mask_hr):
    """sam2_base._use_mask_as_output (use_mask_input_as_output_without_sam, SAM 2's mask prompt):
    the binary mask at the model's input size, mask_hr [1,S,S,1] float 0/1, becomes the slice's
    output without memory: logits mask * 20 - 10 downsampled x4 (bilinear, antialiased); the
    object pointer comes from the SAM heads on the raw features with mask_downsample(mask) as the
    dense prompt and no points; the object score is +-10 from whether the mask is empty.
    Batched over objects: mask_hr [B,S,S,1] with feats of batch B.
    Returns (low-res logits [B,4E,4E], object pointer [B,d], object score [B,1])."""
    b, s = mask_hr.shape[:2]
    mask_hr = mask_hr.astype(jnp.float32)  # a bool mask would keep the conv below boolean
    high = mask_hr * 20.0 - 10.0
    low = jax.image.resize(high, (b, s // 4, s // 4, 1), "linear", antialias=True)[..., 0]
    coords, labels = no_prompt(b)
    _, ptr, _ = sam_heads(
        model, mem, feats, feats["pix"], coords, labels, mem.mask_downsample(mask_hr), jnp.ones((b,), bool), False
    )
    present = jnp.any(mask_hr > 0, axis=(1, 2, 3)).astype(jnp.float32)[:, None]
    if mem.mc.fixed_no_obj_ptr:
        ptr = present * ptr
    ptr = ptr + (1 - present) * mem.no_obj_ptr[...]
    return low, ptr, present * 20.0 - 10.0
