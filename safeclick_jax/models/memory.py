"""SAM 2's memory (video) path in Flax NNX, NHWC: memory encoder, memory attention with RoPE,
object-pointer projection and temporal encodings (sam2/modeling/{memory_encoder,memory_attention,
position_encoding}.py, sam/transformer.py RoPEAttention, sam2_base.py).

`SAM2Memory`'s attribute paths equal SAM2Base's top-level torch keys of the memory path
(`memory_attention.layers.0.cross_attn_image.k_proj`, `memory_encoder.fuser.layers.1.gamma`,
`obj_ptr_proj.layers.2`, `maskmem_tpos_enc`, ...), so it loads by the generic rule
(models/weight_map.py) from the `extra` item that the converter carries:

    mem = SAM2Memory.from_extra(cfg, extra)     # extra: inference.load_model(...).extra

The per-frame logic that uses these modules (which memories a slice sees, the SAM heads with
memory-conditioned features) lives in safeclick_jax/video.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from safeclick_jax.models import layers
from safeclick_jax.models.attention import dot_product_attention
from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.image_encoder import sine_position_encoding
from safeclick_jax.models.mask_decoder import Attention
from safeclick_jax.models.prompt_encoder import Gelu

LAYER_NORM_2D_EPS = 1e-6  # LayerNorm2d and CXBlock (memory_encoder.py)
ATTN_LN_EPS = 1e-5  # torch nn.LayerNorm default (memory_attention.py)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The memory-path settings of configs/sam2{,.1}/*.yaml (identical for t/s/b+/l) and the
    video predictor's overrides (build_sam.py: binarize_mask_from_pts_for_mem_enc, fill_hole_area)."""

    d_model: int = 256
    mem_dim: int = 64
    num_maskmem: int = 7
    attention_layers: int = 4
    dim_feedforward: int = 2048
    rope_theta: float = 10000.0
    cx_blocks: int = 2
    max_obj_ptrs_in_encoder: int = 16
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    binarize_mask_from_pts_for_mem_enc: bool = True
    # sam2.1 only: signed, projected temporal encoding of the pointers; no-object spatial embedding
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    no_obj_embed_spatial: bool = True
    only_obj_ptrs_in_the_past_for_eval: bool = True
    fixed_no_obj_ptr: bool = True

    @classmethod
    def for_model(cls, cfg: SAM2Config) -> "MemoryConfig":
        v21 = cfg.version == "sam2.1"
        return cls(
            d_model=cfg.d_model,
            mem_dim=cfg.mem_dim,
            num_maskmem=cfg.num_maskmem,
            add_tpos_enc_to_obj_ptrs=v21,
            proj_tpos_enc_in_obj_ptrs=v21,
            use_signed_tpos_enc_to_obj_ptrs=v21,
            no_obj_embed_spatial=v21,
        )


# --- encodings ---------------------------------------------------------------------------------


def get_1d_sine_pe(pos, dim: int, temperature: float = 10000.0):
    """sam2_utils.get_1d_sine_pe: [...] -> [..., dim], *concatenated* [sin, cos] (not interleaved)."""
    pe_dim = dim // 2
    dim_t = jnp.arange(pe_dim, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / pe_dim)
    x = pos[..., None].astype(jnp.float32) / dim_t
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def axial_rope(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """compute_axial_cis as (cos, sin), each [end_x*end_y, dim//2] float32.

    Token t sits at x = t % end_x, y = t // end_x; the first dim//4 complex channels rotate with x,
    the rest with y, at frequencies theta^(-4i/dim). float32 like torch (angles are large)."""
    freqs = (
        1.0 / (np.float32(theta) ** (np.arange(0, dim, 4)[: dim // 4].astype(np.float32) / np.float32(dim)))
    ).astype(np.float32)
    t = np.arange(end_x * end_y, dtype=np.float32)
    t_x = (t % end_x).astype(np.float32)
    t_y = np.floor(t / end_x).astype(np.float32)
    ang = np.concatenate([np.outer(t_x, freqs), np.outer(t_y, freqs)], axis=-1).astype(np.float32)
    return np.cos(ang), np.sin(ang)


def apply_rope(x, cos, sin):
    """x [..., D] viewed as D/2 complex pairs (re = even, im = odd) times exp(i*angle); cos / sin
    broadcast against [..., D/2]."""
    xr = x.reshape(x.shape[:-1] + (-1, 2))
    a, b = xr[..., 0], xr[..., 1]
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)


# --- memory attention --------------------------------------------------------------------------


def drop(x, dropout):
    """Dropout: None, or (key, rate): elements zeroed with probability rate, the rest scaled."""
    if dropout is None:
        return x
    key, rate = dropout
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def attention_with_dropout(q, k, v, key_mask, key, rate):
    """softmax(q k^T / sqrt(d)) with dropout on the weights, times v (torch SDPA's dropout_p):
    q / k [B,H,N,d], v [B,H,Nk,dv], key_mask [B,Nk] or None -> [B,H,Nq,dv]."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
    w = drop(jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype), (key, rate))
    return jnp.einsum("bhqk,bhkd->bhqd", w, v)


class RoPEAttention(Attention):
    """transformer.RoPEAttention: SAM's Attention with axial RoPE on q and k (one 256-d head).

    Keys longer than the queries (memories of several frames) repeat the queries' rotation per
    frame (`rope_k_repeat`); the last `num_k_exclude_rope` keys (object-pointer tokens) get none.
    `key_mask` [B, Nk] (True = attend) hides padded memory slots."""

    def __init__(self, dim: int, num_heads: int, rngs: nnx.Rngs, kv_in_dim: int | None = None, theta: float = 10000.0):
        super().__init__(dim, num_heads, rngs, 1, kv_in_dim)
        self.theta = theta

    def __call__(self, q, k, v, num_k_exclude_rope: int = 0, key_mask=None, dropout=None):
        """dropout: None, or (key, rate) on the attention weights (training)."""
        b, nq, _ = q.shape
        nk = k.shape[1]
        h = self.num_heads
        hd = self.internal_dim // h
        q = self.q_proj(q).reshape(b, nq, h, hd)
        k = self.k_proj(k).reshape(b, nk, h, hd)
        # Values narrower than a head (the 64-d memories of the cross-attention, 256-d head): the
        # softmax weights of a row sum to 1, so attending to the raw values and projecting the
        # result, softmax(qk^T) v W + b, equals attending to the projected values. The weighted
        # sum then runs over 64 channels instead of 256, 3/8 of the cross-attention's matmul work.
        late_v = v.shape[-1] < hd
        v = v[:, :, None, :] if late_v else self.v_proj(v).reshape(b, nk, h, hd)
        side = math.isqrt(nq)
        if side * side != nq:
            raise ValueError(f"RoPE needs a square token grid, got {nq} queries")
        cos, sin = (jnp.asarray(a)[:, None, :] for a in axial_rope(hd, side, side, self.theta))
        q = apply_rope(q, cos, sin)
        n_rope = nk - num_k_exclude_rope
        if n_rope % nq:
            raise ValueError(f"{n_rope} rotated keys are not a whole number of {nq}-token frames")
        r = n_rope // nq
        k_rot = apply_rope(k[:, :n_rope], jnp.tile(cos, (r, 1, 1)), jnp.tile(sin, (r, 1, 1)))
        k = jnp.concatenate([k_rot, k[:, n_rope:]], axis=1)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        if late_v:
            v = jnp.broadcast_to(v, (b, h, nk, v.shape[-1]))
        if dropout is None:
            out = dot_product_attention(q, k, v, key_mask)
        else:
            out = attention_with_dropout(q, k, v, key_mask, *dropout)
        out = out.transpose(0, 2, 1, 3)  # [B, Nq, H, hd or kv_in]
        if late_v:
            w = self.v_proj.kernel[...].reshape(-1, h, hd)  # head i's value projection: w[:, i]
            out = jnp.einsum("bqhc,chd->bqhd", out, w) + self.v_proj.bias[...].reshape(h, hd)
        return self.out_proj(out.reshape(b, nq, h * hd))


class MemoryAttentionLayer(nnx.Module):
    """Pre-norm: RoPE self-attention (no pos), RoPE cross-attention to memories (keys + pos,
    queries without pos), ReLU FFN (memory_attention.py)."""

    def __init__(self, mc: MemoryConfig, rngs: nnx.Rngs):
        d = mc.d_model
        self.self_attn = RoPEAttention(d, 1, rngs, theta=mc.rope_theta)
        self.cross_attn_image = RoPEAttention(d, 1, rngs, kv_in_dim=mc.mem_dim, theta=mc.rope_theta)
        self.linear1 = layers.linear(d, mc.dim_feedforward, rngs)
        self.linear2 = layers.linear(mc.dim_feedforward, d, rngs)
        self.norm1 = layers.layer_norm(d, ATTN_LN_EPS, rngs)
        self.norm2 = layers.layer_norm(d, ATTN_LN_EPS, rngs)
        self.norm3 = layers.layer_norm(d, ATTN_LN_EPS, rngs)

    def __call__(self, tgt, memory, pos, num_k_exclude_rope: int = 0, key_mask=None, dropout=None):
        """dropout: None, or (key, rate): sam2's dropout on both attentions' weights, the three
        residual branches and the feed-forward hidden layer (training)."""
        keys = [None] * 6 if dropout is None else [(k, dropout[1]) for k in jax.random.split(dropout[0], 6)]
        x = self.norm1(tgt)
        tgt = tgt + drop(self.self_attn(x, x, x, dropout=keys[0]), keys[1])
        x = self.norm2(tgt)
        tgt = tgt + drop(self.cross_attn_image(x, memory + pos, memory, num_k_exclude_rope, key_mask, keys[2]), keys[3])
        x = self.norm3(tgt)
        return tgt + drop(self.linear2(drop(jax.nn.relu(self.linear1(x)), keys[4])), keys[5])


class MemoryAttention(nnx.Module):
    def __init__(self, mc: MemoryConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([MemoryAttentionLayer(mc, rngs) for _ in range(mc.attention_layers)])
        self.norm = layers.layer_norm(mc.d_model, ATTN_LN_EPS, rngs)

    def __call__(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens: int = 0, key_mask=None, dropout=None):
        """curr / curr_pos [B, N, d] (flattened E x E grid, row-major), memory / memory_pos
        [B, M, mem_dim] with the object-pointer tokens last, key_mask [B, M] or None -> [B, N, d]."""
        x = curr + 0.1 * curr_pos  # pos_enc_at_input
        for i, layer in enumerate(self.layers):
            d = None if dropout is None else (jax.random.fold_in(dropout[0], i), dropout[1])
            x = layer(x, memory, memory_pos, num_obj_ptr_tokens, key_mask, d)
        return self.norm(x)


# --- memory encoder ----------------------------------------------------------------------------


class MaskDownSampler(nnx.Module):
    """4 x (conv 3x3 s2 p1 -> LayerNorm2d -> GELU), 1 -> 4 -> 16 -> 64 -> 256 ch, then a 1x1 conv.
    `encoder` keeps torch's nn.Sequential indices (GELUs at 2, 5, 8, 11)."""

    def __init__(self, d: int, rngs: nnx.Rngs, total_stride: int = 16):
        mods, cin = [], 1
        for _ in range(int(math.log2(total_stride))):
            cout = cin * 4
            mods += [
                layers.conv(cin, cout, 3, rngs, stride=2, padding=1),
                layers.layer_norm(cout, LAYER_NORM_2D_EPS, rngs),
                Gelu(),
            ]
            cin = cout
        mods.append(layers.conv(cin, d, 1, rngs))
        self.encoder = nnx.List(mods)

    def __call__(self, x):
        for m in self.encoder:
            x = m(x)
        return x


class CXBlock(nnx.Module):
    """ConvNeXt block: depthwise 7x7 -> LN -> Linear x4 -> GELU -> Linear -> gamma, residual."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.dwconv = layers.conv(dim, dim, 7, rngs, padding=3, groups=dim)
        self.norm = layers.layer_norm(dim, LAYER_NORM_2D_EPS, rngs)
        self.pwconv1 = layers.linear(dim, 4 * dim, rngs)
        self.pwconv2 = layers.linear(4 * dim, dim, rngs)
        self.gamma = nnx.Param(jnp.full((dim,), 1e-6, jnp.float32))

    def __call__(self, x):
        y = self.pwconv2(layers.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma[...] * y


class Fuser(nnx.Module):
    def __init__(self, dim: int, num_layers: int, rngs: nnx.Rngs):
        self.layers = nnx.List([CXBlock(dim, rngs) for _ in range(num_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nnx.Module):
    def __init__(self, mc: MemoryConfig, rngs: nnx.Rngs):
        d = mc.d_model
        self.mask_downsampler = MaskDownSampler(d, rngs)
        self.pix_feat_proj = layers.conv(d, d, 1, rngs)
        self.fuser = Fuser(d, mc.cx_blocks, rngs)
        self.out_proj = layers.conv(d, mc.mem_dim, 1, rngs)
        self.mem_dim = mc.mem_dim

    def __call__(self, pix_feat, masks):
        """pix_feat [B, E, E, d] (raw stride-16 features, no no_mem_embed), masks [B, 16E, 16E, 1]
        already scaled (sigmoid/binarised * 20 - 10) -> (features [B, E, E, mem_dim], sine pos)."""
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        b, h, w, c = x.shape
        pos = jnp.broadcast_to(jnp.asarray(sine_position_encoding(h, w, c))[None], x.shape)
        return x, pos


# --- the container with SAM2Base's top-level names ---------------------------------------------


class SAM2Memory(nnx.Module):
    """Every tensor of SAM 2's memory path, named as SAM2Base's torch keys."""

    def __init__(self, mc: MemoryConfig, rngs: nnx.Rngs):
        self.mc = mc
        d, m = mc.d_model, mc.mem_dim
        self.memory_attention = MemoryAttention(mc, rngs)
        self.memory_encoder = MemoryEncoder(mc, rngs)
        self.obj_ptr_proj = layers.MLP(d, d, d, 3, rngs)  # use_mlp_for_obj_ptr_proj, ReLU
        self.mask_downsample = layers.conv(1, 1, 4, rngs, stride=4)
        self.maskmem_tpos_enc = layers.small_normal(rngs, (mc.num_maskmem, 1, 1, m))
        self.no_mem_pos_enc = layers.small_normal(rngs, (1, 1, d))
        self.no_obj_ptr = layers.small_normal(rngs, (1, d))
        if mc.no_obj_embed_spatial:
            self.no_obj_embed_spatial = layers.small_normal(rngs, (1, m))
        if mc.proj_tpos_enc_in_obj_ptrs:
            self.obj_ptr_tpos_proj = layers.linear(d, m, rngs)

    @classmethod
    def from_extra(cls, cfg: SAM2Config, extra: dict[str, Any], where: str = "") -> "SAM2Memory":
        """Built (shape-only, then filled) from a model directory's `extra` item: every memory key
        of the checkpoint's version must be present with its shape, and none may be left over."""
        from safeclick_jax.models.weight_map import load_state_dict

        flat = {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(extra).items()}
        if not flat:
            raise ValueError(
                f"{where or 'checkpoint'}: has no memory/video tensors (empty `extra`); "
                "volume propagation needs a converted SAM 2 checkpoint with its memory path"
            )
        mem = nnx.eval_shape(lambda: cls(MemoryConfig.for_model(cfg), nnx.Rngs(0)))
        load_state_dict(mem, flat, strict=True, where=where)
        return mem

    def tpos_enc(self, t_pos):
        """maskmem_tpos_enc row of a memory at temporal position t_pos (0 = conditioning frame,
        num_maskmem-1 = the previous frame): [..., mem_dim]."""
        table = self.maskmem_tpos_enc[...].reshape(self.mc.num_maskmem, -1)
        return table[self.mc.num_maskmem - t_pos - 1]

    def obj_ptr_pos(self, rel_pos, max_ptrs):
        """Temporal encoding of object pointers `rel_pos` frames away ([K] -> [K, mem_dim]);
        sam2_base.py: get_1d_sine_pe(pos / (max_ptrs - 1), d) -> obj_ptr_tpos_proj."""
        if not self.mc.add_tpos_enc_to_obj_ptrs:
            return jnp.zeros(rel_pos.shape + (self.mc.mem_dim,), jnp.float32)
        t_diff_max = jnp.maximum(max_ptrs - 1, 1).astype(jnp.float32)
        pe = get_1d_sine_pe(
            rel_pos.astype(jnp.float32) / t_diff_max,
            self.mc.d_model if self.mc.proj_tpos_enc_in_obj_ptrs else self.mc.mem_dim,
        )
        return self.obj_ptr_tpos_proj(pe) if self.mc.proj_tpos_enc_in_obj_ptrs else pe

    def object_pointer(self, sam_token, object_score):
        """obj_ptr_proj(token) with fixed_no_obj_ptr: replaced by no_obj_ptr where the object
        score is <= 0. sam_token [B, d], object_score [B, 1] -> [B, d]."""
        ptr = self.obj_ptr_proj(sam_token)
        present = (object_score > 0).astype(ptr.dtype)
        if self.mc.fixed_no_obj_ptr:
            ptr = present * ptr
        return ptr + (1 - present) * self.no_obj_ptr[...]

    def encode_memory(self, pix_feat, mask_logits_hr, object_score, binarize):
        """sam2_base._encode_new_memory. pix_feat [B,E,E,d] raw features, mask_logits_hr
        [B,16E,16E,1] mask logits at input resolution, object_score [B,1], binarize: bool or
        traced [B] (masks from clicks are thresholded instead of squashed).
        Returns (features [B,E,E,mem_dim] float32, pos [B,E,E,mem_dim])."""
        mc = self.mc
        soft = jax.nn.sigmoid(mask_logits_hr)
        if mc.binarize_mask_from_pts_for_mem_enc:
            hard = (mask_logits_hr > 0).astype(soft.dtype)
            flag = jnp.reshape(jnp.asarray(binarize, bool), (-1, 1, 1, 1))
            soft = jnp.where(flag, hard, soft)
        masks = soft * mc.sigmoid_scale_for_mem_enc + mc.sigmoid_bias_for_mem_enc
        feats, pos = self.memory_encoder(pix_feat, masks)
        if mc.no_obj_embed_spatial:
            absent = (object_score <= 0).astype(feats.dtype)[:, :, None, None]  # [B,1,1,1]
            feats = feats + absent * self.no_obj_embed_spatial[...].reshape(1, 1, 1, -1)
        return feats, pos
