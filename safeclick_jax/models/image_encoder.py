"""SAM 2's image encoder = Hiera trunk + FPN neck (sam2/modeling/backbones/image_encoder.py).

Attribute paths mirror the torch keys under `image_encoder.` (`trunk.*`, `neck.convs.{i}.conv.*`).
Feature maps are NHWC.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.hiera import Hiera
from safeclick_jax.models.layers import conv


@functools.lru_cache(maxsize=32)
def sine_position_encoding(
    h: int, w: int, num_pos_feats: int = 256, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> np.ndarray:
    """PositionEmbeddingSine(num_pos_feats, normalize=True) of an h x w map as [h, w, num_pos_feats].

    Parameter-free, so it is computed once in numpy (float32, the same operation order as torch):
    positions (1..n) / (n + 1e-6) * 2pi; dim_t = T^(2 floor(i/2) / (C/2)); channels interleave
    sin (even) / cos (odd) and are ordered [y (C/2), x (C/2)].
    Returned read-only so the cached array cannot be mutated by a caller."""
    npf = num_pos_feats // 2
    y = np.arange(1, h + 1, dtype=np.float32)
    x = np.arange(1, w + 1, dtype=np.float32)
    eps = np.float32(1e-6)
    y = y / (y[-1:] + eps) * np.float32(scale)
    x = x / (x[-1:] + eps) * np.float32(scale)
    dim_t = np.arange(npf, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(npf))

    def enc(p):  # [n] -> [n, npf], interleaved sin/cos
        p = p[:, None] / dim_t
        return np.stack((np.sin(p[:, 0::2]), np.cos(p[:, 1::2])), axis=2).reshape(len(p), npf)

    pe = np.concatenate(
        [np.broadcast_to(enc(y)[:, None, :], (h, w, npf)), np.broadcast_to(enc(x)[None, :, :], (h, w, npf))], axis=-1
    )
    pe = np.ascontiguousarray(pe, dtype=np.float32)
    pe.setflags(write=False)
    return pe


class _ConvHolder(nnx.Module):
    """torch's `nn.Sequential(conv=...)` wrapper: gives the key `convs.{i}.conv.weight`."""

    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.conv = conv(din, dout, 1, rngs)

    def __call__(self, x):
        return self.conv(x)


def upsample_nearest2x(x):
    """F.interpolate(scale_factor=2, mode='nearest') on NHWC (= repeat_interleave on H and W)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class FpnNeck(nnx.Module):
    """1x1 lateral convs to d_model, nearest x2 top-down sum on `fpn_top_down_levels`, and the sine
    position encoding of every level. `convs[0]` takes the lowest-resolution stage (torch order)."""

    def __init__(self, cfg: SAM2Config, rngs: nnx.Rngs):
        self.d_model = cfg.d_model
        self.backbone_channel_list = tuple(cfg.hiera.channel_list)
        self.fpn_top_down_levels = tuple(cfg.fpn_top_down_levels)
        self.convs = nnx.List([_ConvHolder(c, cfg.d_model, rngs) for c in self.backbone_channel_list])

    def __call__(self, xs):
        """xs: stage outputs, high resolution first -> (features, pos), both high resolution first."""
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"FpnNeck expects {n + 1} feature maps, got {len(xs)}")
        out, pos = [None] * (n + 1), [None] * (n + 1)
        prev = None
        for i in range(n, -1, -1):  # top-down: lowest resolution first
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                prev = lateral + upsample_nearest2x(prev)
            else:
                prev = lateral
            out[i] = prev
            b, h, w, _ = prev.shape
            pe = jnp.asarray(sine_position_encoding(h, w, self.d_model), dtype=prev.dtype)
            pos[i] = jnp.broadcast_to(pe[None], (b, h, w, self.d_model))
        return out, pos


class ImageEncoder(nnx.Module):
    """`__call__(x [B, H, W, 3] normalised image) -> dict`:
    - "vision_features": [B, H/16, W/16, d_model] (the last kept FPN level),
    - "vision_pos_enc": list of [B, h, w, d_model] for the kept levels, high resolution first,
    - "backbone_fpn": list of [B, h, w, d_model], high resolution first (H/4, H/8, H/16 with scalp=1),
    - "blocks": every Hiera block's output (NHWC), for SafeClick's intermediate feature.
    """

    def __init__(self, cfg: SAM2Config, rngs: nnx.Rngs):
        self.scalp = cfg.scalp
        self.trunk = Hiera(cfg.hiera, rngs)
        self.neck = FpnNeck(cfg, rngs)

    def __call__(self, x, drop_path=None) -> dict:
        blocks = self.trunk(x, drop_path)
        features, pos = self.neck([blocks[i] for i in self.trunk.cfg.stage_ends])
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {
            "vision_features": features[-1],
            "vision_pos_enc": pos,
            "backbone_fpn": features,
            "blocks": blocks,
        }
