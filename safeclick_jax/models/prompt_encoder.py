"""SAM 2 prompt encoder (sam2/modeling/sam/prompt_encoder.py) in Flax NNX, NHWC.

Attribute paths mirror the torch keys under `sam_prompt_encoder.`:
  pe_layer.positional_encoding_gaussian_matrix (2,128)   Buffer (loaded, never trained)
  point_embeddings.{0..3}.weight (1,256)                  nnx.Embed -> `.embedding`
  not_a_point_embed.weight, no_mask_embed.weight (1,256)  nnx.Embed
  mask_downscaling.{0,1,3,4,6}                            torch nn.Sequential indices (2, 5 = GELU)

Labels (as torch, plus one project label):
  -2  padding to a fixed prompt length (project-specific). Its sparse embedding is zero; the mask
      decoder must be given `token_mask = labels != -2` so that the token is ignored. With that mask
      a padded prompt gives the same masks as the unpadded one (tests/test_decoder_parity.py).
  -1  SAM's "not a point" pad: `not_a_point_embed` replaces the positional encoding.
   0  negative click, 1 positive click, 2 / 3 box top-left / bottom-right corner.

Unlike torch's `forward(points, boxes=None, masks)`, `__call__` never appends SAM's (0,0,-1) pad
point itself: torch adds it whenever `boxes is None`, which is always the case in SAM 2 (boxes are
passed as corner points 2/3). The caller (the predictor) appends it, so that the prompt layout
(real points, SAM pad, project padding) stays under the caller's control and of fixed length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from safeclick_jax.models import layers
from safeclick_jax.models.config import SAM2Config

PAD_LABEL = -2  # project padding token (ignored by the decoder)
NOT_A_POINT_LABEL = -1  # SAM's own pad point


class Gelu(nnx.Module):
    """Parameter-free exact GELU, a placeholder that keeps torch's nn.Sequential indices."""

    def __call__(self, x):
        return layers.gelu(x)


class PositionEmbeddingRandom(nnx.Module):
    """sam2 PositionEmbeddingRandom: random Fourier features of coordinates in [0,1]^2."""

    def __init__(self, num_pos_feats: int, rngs: nnx.Rngs, scale: float = 1.0):
        g = scale * jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        self.positional_encoding_gaussian_matrix = layers.Buffer(g)

    def encode(self, coords):
        """coords [..., 2] in [0,1] (x, y) -> [..., 2*num_pos_feats] = [sin, cos]."""
        coords = 2.0 * coords - 1.0
        # HIGHEST: the product is multiplied by 2*pi and fed to sin/cos, which would amplify the
        # reduced-precision (TF32/bf16) matmuls that accelerators use by default.
        coords = jnp.matmul(coords, self.positional_encoding_gaussian_matrix[...], precision=jax.lax.Precision.HIGHEST)
        coords = 2.0 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def grid(self, h: int, w: int):
        """Dense encoding of an h x w grid at pixel centres -> [h, w, C] (torch returns C,h,w)."""
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        xy = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        return self.encode(xy)

    def with_coords(self, coords, image_hw: tuple[int, int]):
        """coords [..., 2] in pixels (x, y) of an image of size image_hw=(H, W)."""
        scale = jnp.asarray([1.0 / image_hw[1], 1.0 / image_hw[0]], jnp.float32)
        return self.encode(coords.astype(jnp.float32) * scale)


class PromptEncoder(nnx.Module):
    def __init__(self, cfg: SAM2Config, rngs: nnx.Rngs):
        d = cfg.d_model
        c = cfg.mask_in_chans
        self.embed_dim = d
        self.input_image_size = (cfg.image_size, cfg.image_size)
        self.image_embedding_size = (cfg.embedding_size, cfg.embedding_size)
        self.pe_layer = PositionEmbeddingRandom(d // 2, rngs)
        self.point_embeddings = nnx.List([layers.embed(1, d, rngs) for _ in range(4)])
        self.not_a_point_embed = layers.embed(1, d, rngs)
        self.mask_downscaling = nnx.List(
            [
                layers.conv(1, c // 4, 2, rngs, stride=2),
                layers.layer_norm(c // 4, 1e-6, rngs),  # LayerNorm2d
                Gelu(),
                layers.conv(c // 4, c, 2, rngs, stride=2),
                layers.layer_norm(c, 1e-6, rngs),  # LayerNorm2d
                Gelu(),
                layers.conv(c, d, 1, rngs),
            ]
        )
        self.no_mask_embed = layers.embed(1, d, rngs)

    def get_dense_pe(self):
        """Positional encoding of the image-embedding grid: [1, E, E, d_model] (NHWC)."""
        return self.pe_layer.grid(*self.image_embedding_size)[None]

    def embed_points(self, coords, labels):
        """coords [B,N,2] (x,y) in input pixels (0..image_size), labels [B,N] int -> [B,N,d]."""
        pe = self.pe_layer.with_coords(coords + 0.5, self.input_image_size)  # pixel centre
        labels = labels[..., None]
        emb = jnp.where(labels == NOT_A_POINT_LABEL, self.not_a_point_embed.embedding[...][0], pe)
        for i, table in enumerate(self.point_embeddings):
            emb = jnp.where(labels == i, emb + table.embedding[...][0], emb)
        return jnp.where(labels == PAD_LABEL, 0.0, emb)

    def embed_masks(self, masks):
        """masks [B, 4E, 4E, 1] (low-res logits) -> [B, E, E, d]."""
        x = masks
        for layer in self.mask_downscaling:
            x = layer(x)
        return x

    def __call__(self, coords, labels, mask_input=None, has_mask=None):
        """Sparse and dense prompt embeddings.

        Args:
          coords: [B,N,2] float, (x, y) already scaled to the model input (image_size pixels).
            May be None (then N = 0). Append SAM's (0,0) label -1 pad point before calling.
          labels: [B,N] int (see the module docstring; -2 = padding, ignored by the decoder).
          mask_input: [B, 4E, 4E, 1] float mask logits, or None for "no mask".
          has_mask: optional bool, scalar or [B] (may be traced): where False, the dense embedding
            is `no_mask_embed` even though `mask_input` is given, so one compiled function serves
            both cases. None means True for every element when mask_input is given.
        Returns:
          sparse [B, N, d], dense [B, E, E, d].
        """
        if coords is not None:
            b = coords.shape[0]
        elif mask_input is not None:
            b = mask_input.shape[0]
        else:
            b = 1
        if coords is not None:
            sparse = self.embed_points(coords, labels)
        else:
            sparse = jnp.zeros((b, 0, self.embed_dim), jnp.float32)

        h, w = self.image_embedding_size
        no_mask = jnp.broadcast_to(self.no_mask_embed.embedding[...][0], (b, h, w, self.embed_dim))
        if mask_input is None:
            return sparse, no_mask
        dense = self.embed_masks(mask_input)
        if has_mask is not None:
            flag = jnp.broadcast_to(jnp.asarray(has_mask, bool), (b,))
            dense = jnp.where(flag[:, None, None, None], dense, no_mask)
        return sparse, dense
