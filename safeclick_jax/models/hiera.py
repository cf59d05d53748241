"""Hiera trunk of SAM 2's image encoder (sam2/modeling/backbones/hieradet.py) in Flax NNX.

Attribute paths mirror the torch keys under `image_encoder.trunk.` (see layers.py), so
safeclick_jax/models/weight_map.py maps a checkpoint by rule. Feature maps are NHWC; `pos_embed` and
`pos_embed_window` keep torch's (1, C, h, w) layout so they load unchanged.

Numerical details reproduced on purpose (docs/sam2_numerics.md):
- LayerNorm eps 1e-6, exact (erf) GELU, attention scale 1/sqrt(head_dim), no relative-position bias
  (attention.py).
- Pos-embed: torch bicubic resize (A=-0.75, clamped borders) of `pos_embed` to the token grid plus
  `pos_embed_window` tiled over it.
- Windowed attention pads with zeros *after* norm1 and uses no mask, so padded tokens act as keys
  and values (their value is the qkv bias). Windows become a batch axis: no Python loop over
  windows, all shapes static.
- Window size lags one block behind the stage: the first (q-pool) block of a stage still uses the
  previous stage's window, pools q 2x2 inside each window and un-partitions with window // 2.
- q-pool block shortcut = maxpool2x2(proj(norm1(x))): the projection sees the *normed* input.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from safeclick_jax.models.attention import dot_product_attention
from safeclick_jax.models.config import HieraConfig
from safeclick_jax.models.layers import MLP, conv, gelu, layer_norm, linear, resize_bicubic_nchw

LN_EPS = 1e-6


def window_partition(x, window: int):
    """[B, H, W, C] -> ([B * nh * nw, window, window, C], (Hp, Wp)), zero-padding H, W up to
    multiples of `window` (bottom/right), windows ordered row-major like sam2's window_partition."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
    return x, (hp, wp)


def window_unpartition(windows, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]):
    """Inverse of window_partition: [B * nh * nw, window, window, C] -> [B, H, W, C] (crops padding)."""
    hp, wp = pad_hw
    h, w = hw
    nh, nw = hp // window, wp // window
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, window, window, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


def max_pool(x, stride: tuple[int, int]):
    """torch MaxPool2d(kernel=stride, stride=stride, ceil_mode=False) on [N, H, W, C]."""
    sh, sw = stride
    n, h, w, c = x.shape
    ho, wo = h // sh, w // sw  # floor mode: trailing rows/cols are dropped
    x = x[:, : ho * sh, : wo * sw, :].reshape(n, ho, sh, wo, sw, c)
    return x.max(axis=(2, 4))


class PatchEmbed(nnx.Module):
    """Conv 7x7, stride 4, explicit padding 3 (not 'SAME', which pads asymmetrically)."""

    def __init__(self, embed_dim: int, rngs: nnx.Rngs, in_chans: int = 3):
        self.proj = conv(in_chans, embed_dim, 7, rngs, stride=4, padding=3)

    def __call__(self, x):
        return self.proj(x)


class MultiScaleAttention(nnx.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, rngs: nnx.Rngs, q_stride: tuple[int, int] | None = None):
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = linear(dim, dim_out * 3, rngs)
        self.proj = linear(dim_out, dim_out, rngs)

    def __call__(self, x):
        """x: [N, h, w, C] (N = batch * windows) -> [N, h', w', dim_out] (h' = h / q_stride)."""
        n, h, w, _ = x.shape
        # (N, h*w, 3, heads, hd): same split order as torch's reshape + unbind(2). One transpose to
        # (3, N, heads, h*w, hd), heads before tokens for the attention's matmuls (a transposed
        # operand cost ~30% there), then a split: its gradient is one concatenate, where three
        # slices' gradients were three zero-padded copies summed (the encoder's forward + backward
        # at 128 px, batch 8: 11 % faster).
        qkv = self.qkv(x).reshape(n, h * w, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = (a[0] for a in jnp.split(qkv, 3))
        if self.q_stride:
            hd = q.shape[-1]
            q = max_pool(q.reshape(n * self.num_heads, h, w, hd), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(n, self.num_heads, h * w, hd)
        x = dot_product_attention(q, k, v).transpose(0, 2, 1, 3)
        return self.proj(x.reshape(n, h, w, -1))


class MultiScaleBlock(nnx.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        rngs: nnx.Rngs,
        mlp_ratio: float = 4.0,
        q_stride: tuple[int, int] | None = None,
        window_size: int = 0,
    ):
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = tuple(q_stride) if q_stride else None
        self.norm1 = layer_norm(dim, LN_EPS, rngs)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, rngs, q_stride=self.q_stride)
        self.norm2 = layer_norm(dim_out, LN_EPS, rngs)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, rngs, activation=gelu)
        if dim != dim_out:
            self.proj = linear(dim, dim_out, rngs)

    def __call__(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = max_pool(shortcut, self.q_stride)
        ws = self.window_size
        h, w = x.shape[1:3]
        if ws > 0:
            x, pad_hw = window_partition(x, ws)
        x = self.attn(x)
        if self.q_stride:
            # q was pooled inside each window: windows shrink to ws // stride and the map to the
            # shortcut's size. The window grid (hence the padded size) is unchanged.
            ws = self.window_size // self.q_stride[0]
            h, w = shortcut.shape[1:3]
            if self.window_size > 0:
                pad_hw = (pad_hw[0] // self.q_stride[0], pad_hw[1] // self.q_stride[1])
        if self.window_size > 0:
            x = window_unpartition(x, ws, pad_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class BlockSpec(NamedTuple):
    dim: int
    dim_out: int
    num_heads: int
    window_size: int  # 0 = global attention
    q_stride: tuple[int, int] | None  # set on the first block of stages 2.. (q-pool blocks)


def block_specs(cfg: HieraConfig) -> list[BlockSpec]:
    """The static per-block schedule, exactly as hieradet.Hiera.__init__ builds it."""
    dim, num_heads, cur_stage, out = cfg.embed_dim, cfg.num_heads, 1, []
    for i in range(cfg.depth):
        dim_out = dim
        # The window lags one block: the first block of a stage uses the previous stage's window.
        window_size = 0 if i in cfg.global_att_blocks else cfg.window_spec[cur_stage - 1]
        if i - 1 in cfg.stage_ends:
            dim_out = int(dim * cfg.dim_mul)
            num_heads = int(num_heads * cfg.head_mul)
            cur_stage += 1
        q_stride = tuple(cfg.q_stride) if i in cfg.q_pool_blocks else None
        out.append(BlockSpec(dim, dim_out, num_heads, window_size, q_stride))
        dim = dim_out
    return out


class Hiera(nnx.Module):
    """SAM 2's Hiera trunk. `__call__(x [B, H, W, 3]) -> list of every block's output (NHWC)`;
    the stage outputs are `out[i] for i in cfg.stage_ends`. H and W must be multiples of 32 (the
    tiled window pos-embed needs the stride-4 grid to be a multiple of window_spec[0])."""

    def __init__(self, cfg: HieraConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(dim, rngs)
        w0 = cfg.window_spec[0]
        # Zero-initialised like torch; real values always come from a checkpoint.
        self.pos_embed = nnx.Param(jnp.zeros((1, dim, *cfg.window_pos_embed_bkg_spatial_size), jnp.float32))
        self.pos_embed_window = nnx.Param(jnp.zeros((1, dim, w0, w0), jnp.float32))
        self.blocks = nnx.List(
            [
                MultiScaleBlock(
                    b.dim,
                    b.dim_out,
                    b.num_heads,
                    rngs,
                    mlp_ratio=cfg.mlp_ratio,
                    q_stride=b.q_stride,
                    window_size=b.window_size,
                )
                for b in block_specs(cfg)
            ]
        )

    def get_pos_embed(self, hw: tuple[int, int]):
        """[1, h, w, C]: bicubic(pos_embed -> h x w) + pos_embed_window tiled."""
        h, w = hw
        win = self.pos_embed_window[...]
        wh, ww = win.shape[2:]
        if h % wh or w % ww:
            raise ValueError(
                f"token grid {h}x{w} is not a multiple of the window pos-embed {wh}x{ww}; "
                f"the input side must be a multiple of {4 * wh}"
            )
        pe = resize_bicubic_nchw(self.pos_embed[...], (h, w))
        pe = pe + jnp.tile(win, (1, 1, h // wh, w // ww))
        return pe.transpose(0, 2, 3, 1)

    def __call__(self, x) -> list[jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"Hiera expects [B, H, W, 3] images, got shape {x.shape}")
        x = self.patch_embed(x)
        x = x + self.get_pos_embed(x.shape[1:3]).astype(x.dtype)
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        return outs
