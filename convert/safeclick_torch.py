"""PyTorch reference of the SafeClick decoder, built from the `sam2` package's torch modules.

It mirrors safeclick_jax.models.safeclick module for module and name for name, so the generic
weight map (safeclick_jax/models/weight_map.py) moves a SafeClick model between the frameworks in both
directions: `SafeClickTorch.state_dict()` keys == the Flax model's torch keys. Parity tests
(tests/test_safeclick_parity.py) compare forward outputs and gradients. Equation numbers refer
to the paper (sec. 2); the design choices are documented in the Flax module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from sam2.modeling.sam.transformer import Attention
from sam2.modeling.sam2_utils import MLP, LayerNorm2d

from safeclick_jax.models.safeclick import LN_EPS, SafeClickConfig, block_geometry


class Transform(nn.Module):
    """F_transform (eq. 1): conv -> LayerNorm2d -> GELU."""

    def __init__(self, din, dout, ratio):
        super().__init__()
        self.conv = nn.Conv2d(din, dout, ratio, stride=ratio)
        self.norm = LayerNorm2d(dout, eps=LN_EPS)

    def forward(self, x):
        return F.gelu(self.norm(self.conv(x)))


class Expert(nn.Module):
    """Pre-norm attention + MLP on flattened tokens: eqs. 2-3 (cross) or 4-5 (self)."""

    def __init__(self, dim, heads, mlp_dim, cross):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LN_EPS) if cross else None
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, mlp_dim, dim, 2, activation=nn.GELU)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # T_cl
        q = self.norm_q(t)
        kv = q if context is None else self.norm_kv(context.flatten(2).transpose(1, 2))
        t = self.attn(q, kv, kv) + t
        t = self.mlp(self.norm_mlp(t)) + t
        return t.transpose(1, 2).reshape(b, c, h, w)  # R


def channel_affinity(phi_a, phi_b):
    """eq. 7 with Phi in [B, C, N] (channel-first, as the paper writes it)."""
    energy = phi_a @ phi_b.transpose(1, 2)
    energy = energy.max(dim=-1, keepdim=True)[0] - energy
    return energy.softmax(dim=-1)


class ConsensusLayer(nn.Module):
    def __init__(self, c1, c, alpha_init, slope, use_crl, use_cross):
        super().__init__()
        self.use_crl, self.use_cross, self.slope = use_crl, use_cross, slope
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if use_crl and use_cross else None
        self.conv = nn.Conv2d(c1, c, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.norm = LayerNorm2d(c, eps=LN_EPS)

    def refine(self, x1, x2):
        if not self.use_crl:
            return self.conv(x2 if x1 is None else x1 + x2)
        b, c, h, w = x2.shape
        phi2 = x2.flatten(2)  # eq. 6
        att = channel_affinity(phi2, phi2)
        if self.use_cross:
            att = (att + self.alpha * channel_affinity(x1.flatten(2), phi2)) / (1 + self.alpha)  # eq. 8
        x2p = att @ phi2 + phi2
        return self.conv(x2p.reshape(b, c, h, w))

    def fuse(self, refined, x3):
        return F.leaky_relu(self.norm(refined + x3), self.slope)  # eq. 9


class SafeClickHead(nn.Module):
    def __init__(self, sam2_cfg, sc: SafeClickConfig):
        super().__init__()
        c, c1 = sam2_cfg.d_model, sc.channels
        if sc.use_e1:
            din, ratio = block_geometry(sam2_cfg, sc.block_index(sam2_cfg))
            self.transform = Transform(din, c1, ratio)
            self.e1 = Expert(c1, sc.num_heads, sc.mlp_dim, cross=True)
        else:
            self.transform = self.e1 = None
        self.in_proj = nn.Conv2d(c, c1, 1) if (sc.use_e1 or sc.use_e2) and c1 != c else None
        self.e2 = Expert(c1, sc.num_heads, sc.mlp_dim, cross=False) if sc.use_e2 else None
        self.crl = ConsensusLayer(c1, c, sc.alpha_init, sc.leaky_slope, sc.use_crl, sc.use_e1)

    def image_features(self, block, image_embed):
        xf = image_embed if self.in_proj is None else self.in_proj(image_embed)
        x1 = self.e1(self.transform(block), xf) if self.e1 is not None else None
        x2 = self.e2(xf) if self.e2 is not None else xf
        return self.crl.refine(x1, x2)


class SafeClickTorch(nn.Module):
    """A sam2 SAM2Base's image path plus the SafeClick head, with the Flax model's key names."""

    def __init__(self, sam2_base: nn.Module, sam2_cfg, sc: SafeClickConfig):
        super().__init__()
        self.image_encoder = sam2_base.image_encoder
        self.sam_prompt_encoder = sam2_base.sam_prompt_encoder
        self.sam_mask_decoder = sam2_base.sam_mask_decoder
        self.no_mem_embed = sam2_base.no_mem_embed
        self.safeclick = SafeClickHead(sam2_cfg, sc)
        self.keep_block = sc.block_index(sam2_cfg)
        self.image_size = sam2_base.image_size
        object.__setattr__(self, "base", sam2_base)  # not a submodule: its keys stay un-prefixed

    def forward_image(self, images):
        return self.base.forward_image(images)

    def _prepare_backbone_features(self, backbone_out):
        return self.base._prepare_backbone_features(backbone_out)

    def decode(self, image_embed, high_res_feats, refined, coords, labels, mask_input, multimask_output):
        """NCHW inputs, one image per prompt (batch B). Returns (masks, iou, sam_tokens, obj)."""
        pe, dec = self.sam_prompt_encoder, self.sam_mask_decoder
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=mask_input)
        # mask_decoder.py predict_masks, with x3 replaced by x_enhanced (eq. 9) before upscaling.
        s = 1 if dec.pred_obj_scores else 0
        toks = [dec.obj_score_token.weight] if dec.pred_obj_scores else []
        toks = torch.cat(toks + [dec.iou_token.weight, dec.mask_tokens.weight], 0)
        tokens = torch.cat([toks[None].expand(sparse.shape[0], -1, -1), sparse], 1)
        src = image_embed + dense
        b, c, h, w = src.shape
        hs, x3 = dec.transformer(src, pe.get_dense_pe().expand(b, -1, -1, -1), tokens)
        x3 = x3.transpose(1, 2).view(b, c, h, w)
        src = self.safeclick.crl.fuse(refined, x3)
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        feat_s0, feat_s1 = high_res_feats
        up = act2(dc2(act1(ln1(dc1(src) + feat_s1))) + feat_s0)
        mask_tokens_out = hs[:, s + 1 : s + 1 + dec.num_mask_tokens]
        hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
        masks = (hyper @ up.flatten(2)).view(b, -1, up.shape[2], up.shape[3])
        iou = dec.iou_prediction_head(hs[:, s])
        obj = dec.pred_obj_score_head(hs[:, 0]) if dec.pred_obj_scores else 10.0 * iou.new_ones(b, 1)
        if multimask_output:
            masks, iou = masks[:, 1:], iou[:, 1:]
        elif dec.dynamic_multimask_via_stability and not dec.training:
            masks, iou = dec._dynamic_multimask_via_stability(masks, iou)
        else:
            masks, iou = masks[:, 0:1], iou[:, 0:1]
        tokens_out = (
            mask_tokens_out[:, 1:]
            if multimask_output and dec.use_multimask_token_for_obj_ptr
            else mask_tokens_out[:, 0:1]
        )
        return masks, iou, tokens_out, obj


def build_safeclick_torch(sam2_name: str, sc: SafeClickConfig, image_size: int | None = None, seed: int = 0):
    """A SafeClickTorch around a freshly built sam2 model of config `sam2_name` (random weights)."""
    from sam2.build_sam import build_sam2

    from safeclick_jax.models.config import get_config

    cfg = get_config(sam2_name)
    overrides = []
    if image_size:
        cfg = cfg.replace(image_size=image_size)
        overrides = [f"++model.image_size={image_size}"]
    version = sam2_name.split("_hiera_")[0]
    torch.manual_seed(seed)
    base = build_sam2(
        f"configs/{version}/{sam2_name}.yaml", ckpt_path=None, device="cpu", hydra_overrides_extra=overrides
    )
    return SafeClickTorch(base, cfg, sc).eval(), cfg
