"""SAM 2 mask decoder and two-way transformer (sam2/modeling/sam/{mask_decoder,transformer}.py) in
Flax NNX, NHWC.

Attribute paths mirror the torch keys under `sam_mask_decoder.` (docs/architecture.md, "Weights"), e.g.
`transformer.layers.0.cross_attn_token_to_image.q_proj`, `output_upscaling.{0,1,3}` (torch
nn.Sequential indices; 2 and 4 are GELUs), `output_hypernetworks_mlps.{0..3}.layers.{0,1,2}`.

The decoder is split in two so that SafeClick can put its consensus layer between them:
  hs, src = decoder.transformer_tokens(image_embeddings, image_pe, sparse, dense, token_mask, ...)
  ...  # SafeClick: CEL / CRL may refine `src` here (E3 = this two-way transformer)
  masks, iou, mask_tokens_out, obj = decoder.heads(hs, src, high_res_features)
`__call__` chains the two and applies SAM 2's output selection (multimask / dynamic multimask).

Prompt padding: sparse tokens whose `token_mask` is False (label -2 in the prompt encoder) are
masked as keys in the token self-attention and in the image->token cross-attention. As queries they
compute values that nothing reads, so a padded prompt gives the masks of the unpadded one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
from flax import nnx

from safeclick_jax.models import layers
from safeclick_jax.models.attention import dot_product_attention
from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.prompt_encoder import Gelu

TRANSFORMER_LN_EPS = 1e-5  # torch nn.LayerNorm default (transformer.py)
LAYER_NORM_2D_EPS = 1e-6  # sam2_utils.LayerNorm2d


class Attention(nnx.Module):
    """sam2 transformer.Attention: projections to `dim // downsample_rate`, multi-head SDPA, out proj."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        rngs: nnx.Rngs,
        downsample_rate: int = 1,
        kv_in_dim: Optional[int] = None,
    ):
        kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide internal dim {self.internal_dim}")
        self.q_proj = layers.linear(embedding_dim, self.internal_dim, rngs)
        self.k_proj = layers.linear(kv_in_dim, self.internal_dim, rngs)
        self.v_proj = layers.linear(kv_in_dim, self.internal_dim, rngs)
        self.out_proj = layers.linear(self.internal_dim, embedding_dim, rngs)

    def project(self, q, k, v):
        """Input projections split into heads: q [B,Nq,D], k/v [B,Nk,Dkv] -> [B,H,N,hd] each."""
        h = self.num_heads

        def split(x):
            b, n, c = x.shape
            return x.reshape(b, n, h, c // h).transpose(0, 2, 1, 3)

        return split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))

    def attend(self, q, k, v, key_mask=None):
        """SDPA on projected heads [B,H,N,hd] (scale 1/sqrt(hd)), recombine, out_proj -> [B,Nq,D].

        key_mask [B,Nk] bool (True = attend): masked keys get a large finite negative logit, so
        exp() gives exactly 0 (they change nothing) and a row can never become NaN (the decoder's
        output tokens are always valid keys). See attention.py for the chunked CPU path."""
        b, h, nq, hd = q.shape
        out = dot_product_attention(q, k, v, key_mask).transpose(0, 2, 1, 3).reshape(b, nq, h * hd)
        return self.out_proj(out)

    def __call__(self, q, k, v, key_mask=None):
        """q [B,Nq,D], k/v [B,Nk,Dkv]; key_mask [B,Nk] bool (True = attend) or None -> [B,Nq,D]."""
        return self.attend(*self.project(q, k, v), key_mask)


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attn -> token->image cross-attn -> MLP -> image->token cross-attn (post-norm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        rngs: nnx.Rngs,
        downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ):
        self.self_attn = Attention(dim, num_heads, rngs)
        self.norm1 = layers.layer_norm(dim, TRANSFORMER_LN_EPS, rngs)
        self.cross_attn_token_to_image = Attention(dim, num_heads, rngs, downsample_rate)
        self.norm2 = layers.layer_norm(dim, TRANSFORMER_LN_EPS, rngs)
        self.mlp = layers.MLP(dim, mlp_dim, dim, 2, rngs)  # ReLU
        self.norm3 = layers.layer_norm(dim, TRANSFORMER_LN_EPS, rngs)
        self.norm4 = layers.layer_norm(dim, TRANSFORMER_LN_EPS, rngs)
        self.cross_attn_image_to_token = Attention(dim, num_heads, rngs, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
        if self.skip_first_layer_pe:
            # The first layer's self-attention replaces the queries (no residual), as in torch.
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, rngs: nnx.Rngs, downsample_rate: int = 2):
        self.layers = nnx.List(
            [
                TwoWayAttentionBlock(dim, num_heads, mlp_dim, rngs, downsample_rate, skip_first_layer_pe=(i == 0))
                for i in range(depth)
            ]
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, rngs, downsample_rate)
        self.norm_final_attn = layers.layer_norm(dim, TRANSFORMER_LN_EPS, rngs)

    def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None):
        """image_embedding / image_pe [B,N_img,D] (flattened NHWC), point_embedding [B,T,D],
        token_mask [B,T] bool or None -> (tokens [B,T,D], image [B,N_img,D])."""
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, image_pe, token_mask)
        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder(nnx.Module):
    def __init__(self, cfg: SAM2Config, rngs: nnx.Rngs):
        d = cfg.d_model
        self.transformer = TwoWayTransformer(
            cfg.transformer_depth,
            d,
            cfg.transformer_num_heads,
            cfg.transformer_mlp_dim,
            rngs,
            cfg.attention_downsample_rate,
        )
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = layers.embed(1, d, rngs)
        self.mask_tokens = layers.embed(self.num_mask_tokens, d, rngs)
        self.pred_obj_scores = cfg.pred_obj_scores
        if cfg.pred_obj_scores:
            self.obj_score_token = layers.embed(1, d, rngs)
        # Index of the IoU token in the transformer's token sequence: [obj_score?, iou, masks, sparse].
        self.iou_index = 1 if cfg.pred_obj_scores else 0
        self.num_output_tokens = self.iou_index + 1 + self.num_mask_tokens

        self.output_upscaling = nnx.List(
            [
                layers.conv_transpose2x2(d, d // 4, rngs),
                layers.layer_norm(d // 4, LAYER_NORM_2D_EPS, rngs),  # LayerNorm2d
                Gelu(),
                layers.conv_transpose2x2(d // 4, d // 8, rngs),
                Gelu(),
            ]
        )
        self.use_high_res_features = cfg.use_high_res_features
        if cfg.use_high_res_features:
            self.conv_s0 = layers.conv(d, d // 8, 1, rngs)
            self.conv_s1 = layers.conv(d, d // 4, 1, rngs)
        self.output_hypernetworks_mlps = nnx.List(
            [layers.MLP(d, d, d // 8, 3, rngs) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = layers.MLP(
            d,
            cfg.iou_head_hidden_dim,
            self.num_mask_tokens,
            cfg.iou_head_depth,
            rngs,
            sigmoid_output=cfg.iou_prediction_use_sigmoid,
        )
        if cfg.pred_obj_scores:
            self.pred_obj_score_head = (
                layers.MLP(d, d, 1, 3, rngs) if cfg.pred_obj_scores_mlp else layers.linear(d, 1, rngs)
            )
        self.use_multimask_token_for_obj_ptr = cfg.use_multimask_token_for_obj_ptr
        self.dynamic_multimask_via_stability = cfg.dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = cfg.dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = cfg.dynamic_multimask_stability_thresh

    # -- pieces -------------------------------------------------------------------------------

    def project_high_res(self, fpn0, fpn1):
        """SAM2Base.forward_image: backbone_fpn[0] [B,4E,4E,256] -> conv_s0 (32 ch),
        backbone_fpn[1] [B,2E,2E,256] -> conv_s1 (64 ch). Returns (feat_s0, feat_s1)."""
        return self.conv_s0(fpn0), self.conv_s1(fpn1)

    def output_tokens(self, batch: int):
        """The learned output tokens [B, num_output_tokens, D]: [obj_score?, iou, mask x4]."""
        toks = [self.iou_token.embedding[...], self.mask_tokens.embedding[...]]
        if self.pred_obj_scores:
            toks.insert(0, self.obj_score_token.embedding[...])
        toks = jnp.concatenate(toks, axis=0)
        return jnp.broadcast_to(toks[None], (batch,) + toks.shape)

    def transformer_tokens(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        token_mask=None,
        repeat_image: bool = False,
    ):
        """Runs the two-way transformer.

        Args:
          image_embeddings: [B_img, E, E, D] NHWC (with no_mem_embed already added).
          image_pe: [1, E, E, D] (PromptEncoder.get_dense_pe()).
          sparse_prompt_embeddings: [B, N, D]; dense_prompt_embeddings: [B, E, E, D].
          token_mask: [B, N] bool, True for real sparse tokens (labels != -2), or None (all real).
          repeat_image: repeat every image B times (torch repeat_interleave), for one image with
            B prompts; otherwise B_img must equal B.
        Returns:
          hs [B, T, D] (T = num_output_tokens + N), src [B, E, E, D].
        """
        b = sparse_prompt_embeddings.shape[0]
        tokens = jnp.concatenate([self.output_tokens(b), sparse_prompt_embeddings], axis=1)
        full_mask = None
        if token_mask is not None:
            full_mask = jnp.concatenate([jnp.ones((b, self.num_output_tokens), bool), token_mask.astype(bool)], axis=1)
        if repeat_image:
            src = jnp.repeat(image_embeddings, b, axis=0)
        else:
            if image_embeddings.shape[0] != b:
                raise ValueError(
                    f"image batch {image_embeddings.shape[0]} != prompt batch {b}; "
                    "pass repeat_image=True for one image with many prompts"
                )
            src = image_embeddings
        src = src + dense_prompt_embeddings
        bs, h, w, c = src.shape
        pos = jnp.broadcast_to(image_pe.reshape(1, h * w, c), (bs, h * w, c))
        hs, src = self.transformer(src.reshape(bs, h * w, c), pos, tokens, full_mask)
        return hs, src.reshape(bs, h, w, c)

    def upscale(self, src, high_res_features=None):
        """[B,E,E,D] -> [B,4E,4E,D/8]; with high-res features as SAM 2 (mask_decoder.py:218-225)."""
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        if not self.use_high_res_features:
            return act2(dc2(act1(ln1(dc1(src)))))
        feat_s0, feat_s1 = high_res_features
        x = act1(ln1(dc1(src) + feat_s1))
        return act2(dc2(x) + feat_s0)

    def heads(self, hs, src, high_res_features=None):
        """Mask, IoU and object-score heads.

        Args:
          hs: [B, T, D] transformer tokens; src: [B, E, E, D] transformer image features.
          high_res_features: (feat_s0 [B|1, 4E, 4E, D/8], feat_s1 [B|1, 2E, 2E, D/4]) after
            conv_s0/conv_s1 (see project_high_res), or None when use_high_res_features is off.
        Returns:
          masks [B, 4, 4E, 4E] (all mask tokens), iou_pred [B, 4], mask_tokens_out [B, 4, D],
          object_score_logits [B, 1].
        """
        s = self.iou_index
        iou_token_out = hs[:, s]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens]
        up = self.upscale(src, high_res_features)
        hyper_in = jnp.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1
        )
        masks = jnp.einsum("bkc,bhwc->bkhw", hyper_in, up)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0])
        else:
            object_score_logits = jnp.full((hs.shape[0], 1), 10.0, hs.dtype)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    # -- output selection ---------------------------------------------------------------------

    def stability_scores(self, mask_logits):
        """IoU of the masks thresholded at +delta and -delta: [B, K, H, W] -> [B, K]."""
        delta = self.dynamic_multimask_stability_delta
        area_i = jnp.sum(mask_logits > delta, axis=(-2, -1)).astype(jnp.float32)
        area_u = jnp.sum(mask_logits > -delta, axis=(-2, -1)).astype(jnp.float32)
        return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)

    def dynamic_multimask_select(self, all_mask_logits, all_iou_scores):
        """Single-mask output, falling back to the best-IoU multimask output (tokens 1..3) where
        the single mask's stability is below the threshold. Returns masks [B,1,H,W], iou [B,1]."""
        multi_logits = all_mask_logits[:, 1:]
        multi_iou = all_iou_scores[:, 1:]
        best = jnp.argmax(multi_iou, axis=-1)[:, None]
        best_logits = jnp.take_along_axis(multi_logits, best[:, :, None, None], axis=1)
        best_iou = jnp.take_along_axis(multi_iou, best, axis=1)
        single_logits = all_mask_logits[:, 0:1]
        single_iou = all_iou_scores[:, 0:1]
        is_stable = self.stability_scores(single_logits) >= self.dynamic_multimask_stability_thresh
        masks = jnp.where(is_stable[:, :, None, None], single_logits, best_logits)
        iou = jnp.where(is_stable, single_iou, best_iou)
        return masks, iou

    def select_outputs(
        self, masks, iou_pred, mask_tokens_out, multimask_output: bool, dynamic_multimask: Optional[bool] = None
    ):
        """SAM 2's output selection (MaskDecoder.forward). `dynamic_multimask=None` follows the
        config; torch applies it only in eval mode, so training code passes False."""
        if dynamic_multimask is None:
            dynamic_multimask = self.dynamic_multimask_via_stability
        if multimask_output:
            out_masks, out_iou = masks[:, 1:], iou_pred[:, 1:]
        elif dynamic_multimask:
            out_masks, out_iou = self.dynamic_multimask_select(masks, iou_pred)
        else:
            out_masks, out_iou = masks[:, 0:1], iou_pred[:, 0:1]
        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            # torch always uses the single-mask token as the object-memory token otherwise.
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return out_masks, out_iou, sam_tokens_out

    def __call__(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: Optional[Sequence] = None,
        token_mask=None,
        dynamic_multimask: Optional[bool] = None,
    ):
        """SAM 2 MaskDecoder.forward in NHWC.

        Args:
          image_embeddings: [B_img, E, E, D]; image_pe: [1, E, E, D].
          sparse_prompt_embeddings: [B, N, D]; dense_prompt_embeddings: [B, E, E, D].
          multimask_output, repeat_image: static Python bools.
          high_res_features: (feat_s0 [.,4E,4E,D/8], feat_s1 [.,2E,2E,D/4]) after conv_s0/conv_s1.
          token_mask: [B, N] bool (labels != -2) or None.
          dynamic_multimask: None = config (on for SAM 2); False as torch in training mode.
        Returns:
          masks [B, 3|1, 4E, 4E], iou_pred [B, 3|1], sam_tokens_out [B, 3|1, D],
          object_score_logits [B, 1].
        """
        hs, src = self.transformer_tokens(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, token_mask, repeat_image
        )
        masks, iou_pred, mask_tokens_out, obj = self.heads(hs, src, high_res_features)
        masks, iou_pred, sam_tokens_out = self.select_outputs(
            masks, iou_pred, mask_tokens_out, multimask_output, dynamic_multimask
        )
        return masks, iou_pred, sam_tokens_out, obj
