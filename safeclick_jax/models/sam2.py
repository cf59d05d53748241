"""SAM 2's image path as one Flax module: encoder, prompt encoder, mask decoder, no_mem_embed.

Attribute names equal the top-level torch keys of SAM2Base (`image_encoder`, `sam_prompt_encoder`,
`sam_mask_decoder`, `no_mem_embed`), so the official state_dict maps onto it by the generic rule in
safeclick_jax/models/weight_map.py. The memory/video modules are not part of the image path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from safeclick_jax.image import IMAGE_MEAN, IMAGE_STD  # noqa: F401  (re-exported)
from safeclick_jax.models import layers
from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.image_encoder import ImageEncoder
from safeclick_jax.models.mask_decoder import MaskDecoder
from safeclick_jax.models.prompt_encoder import PromptEncoder

# torch keys of SAM2Base that belong to the image path (the Flax model holds exactly these).
IMAGE_PATH_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")

PAD_LABEL = -2  # project-specific: a padding token that the decoder masks out (fixed prompt length)


class SAM2Image(nnx.Module):
    def __init__(self, cfg: SAM2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg, rngs)
        self.sam_prompt_encoder = PromptEncoder(cfg, rngs)
        self.sam_mask_decoder = MaskDecoder(cfg, rngs)
        self.no_mem_embed = layers.small_normal(rngs, (1, 1, cfg.d_model))

    def encode_image(self, images) -> dict:
        return encode_image(self, images)

    def decode(
        self,
        features: dict,
        coords,
        labels,
        mask_input,
        has_mask,
        multimask_output: bool,
        dynamic_multimask: bool | None = None,
    ):
        return decode_prompts(self, features, coords, labels, mask_input, has_mask, multimask_output, dynamic_multimask)


def encode_image(model, images, keep_block: int | None = None) -> dict:
    """images: [B,S,S,3], already normalised with IMAGE_MEAN/STD.

    Returns {"image_embed" [B,E,E,256] (with no_mem_embed added, as SAM2ImagePredictor does),
    "high_res_feats" ([B,4E,4E,32], [B,2E,2E,64]) after conv_s0/conv_s1, and, when keep_block
    is given, "block" = that Hiera block's raw output (SafeClick's intermediate feature)}."""
    out = model.image_encoder(images)
    fpn = out["backbone_fpn"]
    feat_s0, feat_s1 = model.sam_mask_decoder.project_high_res(fpn[0], fpn[1])
    # sam2_image_predictor.py:119-121: no_mem_embed is added to the lowest-resolution level only.
    image_embed = fpn[-1] + model.no_mem_embed[...].reshape(1, 1, 1, -1)
    res = {"image_embed": image_embed, "high_res_feats": (feat_s0, feat_s1)}
    if keep_block is not None:
        res["block"] = out["blocks"][keep_block]
    return res


def decode_prompts(
    model,
    features: dict,
    coords,
    labels,
    mask_input,
    has_mask,
    multimask_output: bool,
    dynamic_multimask: bool | None = None,
    fuse=None,
):
    """Prompts -> (mask logits [B,C,4E,4E], iou [B,C], sam tokens [B,C,256], object score [B,1]).

    coords [B,N,2] in input pixels, labels [B,N] (-2 = padding, masked out), mask_input
    [B,4E,4E,1], has_mask [B] bool. Per-image features with batch 1 serve all B prompts (as
    SAM 2's repeat_image). `fuse(features, x3)`, when given, replaces the two-way transformer's
    image output before the heads (SafeClick's consensus layer, eq. 9)."""
    dec, pe = model.sam_mask_decoder, model.sam_prompt_encoder
    sparse, dense = pe(coords, labels, mask_input, has_mask)
    b = coords.shape[0]
    features = {k: jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:]), v) for k, v in features.items()}
    # With bf16 weights and features, prompts are still embedded from float32 coordinates (bf16
    # has no sub-pixel precision at 1024 px), then cast to the features' dtype (no-op in fp32).
    dt = features["image_embed"].dtype
    hs, src = dec.transformer_tokens(
        features["image_embed"], pe.get_dense_pe().astype(dt), sparse.astype(dt), dense.astype(dt), labels != PAD_LABEL
    )
    if fuse is not None:
        src = fuse(features, src)
    masks, iou, mask_tokens_out, obj = dec.heads(hs, src, features["high_res_feats"])
    masks, iou, tokens = dec.select_outputs(masks, iou, mask_tokens_out, multimask_output, dynamic_multimask)
    return masks, iou, tokens, obj
