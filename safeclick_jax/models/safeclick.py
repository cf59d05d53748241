"""SafeClick decoder (paper sec. 2): collaborative expert layer (CEL: E1, E2, E3) and consensus
reasoning layer (CRL), plugged into SAM 2's mask decoder.

    x_i  = block output of Hiera block `intermediate_block` (raw, before the neck)
    x_f  = final image features (the 64^2 level + no_mem_embed, what SAM 2's decoder reads)
    E1   = cross-attention, queries F_transform(x_i), keys/values x_f       (eqs. 1-3)
    E2   = self-attention over x_f, prompt-independent                      (eqs. 4-5)
    E3   = SAM 2's two-way transformer on prompt tokens and x_f -> (tokens, x3)
    CRL  = channel-affinity consensus of x1, x2, then fused with x3         (eqs. 6-9)
    x_enhanced replaces x3 as the input of SAM 2's upscaling; masks / IoU / object score come
    from SAM 2's hypernetwork and heads (E3 tokens).

E1, E2 and the CRL's channel attention do not depend on the prompt: `image_features` computes
them once per image (the interactive loop then pays only LN + LeakyReLU per click), and `fuse`
adds the prompt-dependent x3 (eq. 9).

Choices where the paper is silent (all in SafeClickConfig):
- intermediate_block: the "m/2-th layer" of an m-block trunk read 1-based, i.e. index m//2 - 1
  (t: 5, s: 7, b+: 11, l: 23). All of these lie in stage 3, stride 16, the resolution of x_f,
  so F_transform needs no resampling; for a block at stride 8 or 4 it becomes a strided conv.
- F_transform = conv (kernel = stride = resolution ratio) -> LayerNorm2d -> GELU: the norm and
  activation SAM 2 itself uses for 2D features.
- C1 (the experts' width) = 256 = C, 8 heads, MLP hidden 1024 (ratio 4, ViT default), GELU MLP,
  LayerNorm eps 1e-6; attention layers are SAM 2's `Attention` (downsample_rate 1).
- eq. 7's max is taken per row (keepdim), as in the channel-attention module this contrast
  comes from (DANet); alpha starts at 1.0 (self- and cross-affinity weighted equally); the
  CRL's norm N is LayerNorm2d, phi LeakyReLU(0.01).
- What enters the CRL from E1 is x1 (Phi_1), from E2 x2 (Phi_2), from E3 x3 (eq. 9).
- Ablations: without E1 the cross term is dropped (x2' = sigma(A_self) Phi_2 + Phi_2); without
  E2, Phi_2 is the untouched x_f; without the CRL the available expert outputs are summed and go
  through the same zero-initialised F_conv, norm and activation: x_enh = phi(N(F_conv(x1 + x2) + x3)).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from safeclick_jax.models import layers
from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.image_encoder import ImageEncoder
from safeclick_jax.models.mask_decoder import Attention, MaskDecoder
from safeclick_jax.models.prompt_encoder import PromptEncoder
from safeclick_jax.models.sam2 import decode_prompts, encode_image

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class SafeClickConfig:
    intermediate_block: int = -1  # -1: m // 2 - 1 for an m-block trunk (see module docstring)
    channels: int = 256  # C1
    num_heads: int = 8
    mlp_dim: int = 1024
    alpha_init: float = 1.0
    leaky_slope: float = 0.01
    use_e1: bool = True
    use_e2: bool = True
    use_crl: bool = True

    def block_index(self, cfg: SAM2Config) -> int:
        depth = cfg.hiera.depth
        idx = depth // 2 - 1 if self.intermediate_block == -1 else self.intermediate_block
        if not 0 <= idx < depth:
            raise ValueError(
                f"safeclick intermediate_block={self.intermediate_block} is outside the "
                f"{cfg.name} trunk (blocks 0..{depth - 1})"
            )
        return idx

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SafeClickConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown SafeClickConfig keys: {unknown}")
        return cls(**d)


def block_geometry(cfg: SAM2Config, block: int) -> tuple[int, int]:
    """(channels, stride relative to x_f) of a Hiera block's output."""
    h = cfg.hiera
    stage = next(i for i, end in enumerate(h.stage_ends) if block <= end)
    dim = int(h.embed_dim * h.dim_mul**stage)
    stride_px = 4 * 2**stage  # patch embed /4, then /2 per q-pooled stage
    ratio = cfg.backbone_stride / stride_px
    if ratio < 1:
        raise ValueError(
            f"Hiera block {block} (stride {stride_px}) is coarser than the decoder's "
            f"features (stride {cfg.backbone_stride}); choose a block of stages 1-3"
        )
    return dim, int(ratio)


class Transform(nnx.Module):
    """F_transform (eq. 1): conv -> LayerNorm2d -> GELU, to x_f's channels and resolution."""

    def __init__(self, din: int, dout: int, ratio: int, rngs: nnx.Rngs):
        self.conv = layers.conv(din, dout, ratio, rngs, stride=ratio)
        self.norm = layers.layer_norm(dout, LN_EPS, rngs)

    def __call__(self, x):
        return layers.gelu(self.norm(self.conv(x)))


class Expert(nnx.Module):
    """A pre-norm transformer layer on flattened tokens (T_cl): eqs. 2-3 when `cross`, else 4-5."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, cross: bool, rngs: nnx.Rngs):
        self.norm_q = layers.layer_norm(dim, LN_EPS, rngs)
        self.norm_kv = layers.layer_norm(dim, LN_EPS, rngs) if cross else None
        self.attn = Attention(dim, heads, rngs)
        self.norm_mlp = layers.layer_norm(dim, LN_EPS, rngs)
        self.mlp = layers.MLP(dim, mlp_dim, dim, 2, rngs, activation=layers.gelu)

    def __call__(self, x, context=None):
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c)  # T_cl: HxWxC -> NxC
        q = self.norm_q(t)
        kv = q if context is None else self.norm_kv(context.reshape(b, -1, context.shape[-1]))
        t = self.attn(q, kv, kv) + t  # eq. 2 / eq. 4
        t = self.mlp(self.norm_mlp(t)) + t  # eq. 3 / eq. 5
        return t.reshape(b, h, w, c)  # R


def channel_affinity(phi_a, phi_b):
    """eq. 7: softmax(max(Phi_a Phi_b^T) K - Phi_a Phi_b^T) for Phi in [B, N, C] (channels last).

    The max is per row, so each row's largest affinity gets the smallest weight: the contrast
    favours channels that are *less* redundant with each other."""
    energy = jnp.einsum("bnc,bnd->bcd", phi_a, phi_b)
    energy = jnp.max(energy, axis=-1, keepdims=True) - energy
    return jax.nn.softmax(energy, axis=-1)


class ConsensusLayer(nnx.Module):
    """CRL, eqs. 6-9. alpha is learnable, F_conv (1x1) starts at zero."""

    def __init__(
        self, c1: int, c: int, alpha_init: float, slope: float, use_crl: bool, use_cross: bool, rngs: nnx.Rngs
    ):
        self.use_crl, self.use_cross, self.slope = use_crl, use_cross, slope
        self.alpha = nnx.Param(jnp.asarray(alpha_init, jnp.float32)) if use_crl and use_cross else None
        self.conv = layers.conv(c1, c, 1, rngs, zero_init=True)
        self.norm = layers.layer_norm(c, LN_EPS, rngs)

    def refine(self, x1, x2):
        """The prompt-independent part: F_conv(x2') (eq. 8 and the conv of eq. 9)."""
        if not self.use_crl:
            return self.conv(x2 if x1 is None else x1 + x2)
        b, h, w, c = x2.shape
        phi2 = x2.reshape(b, h * w, c)  # eq. 6 (channels last: Phi^T)
        att = channel_affinity(phi2, phi2)
        if self.use_cross:
            phi1 = x1.reshape(b, h * w, c)
            a = self.alpha[...]
            att = (att + a * channel_affinity(phi1, phi2)) / (1 + a)  # eq. 8
        x2p = jnp.einsum("bcd,bnd->bnc", att, phi2) + phi2
        return self.conv(x2p.reshape(b, h, w, c))

    def fuse(self, refined, x3):
        """eq. 9: phi(N(F_conv(x2') + x3))."""
        return jax.nn.leaky_relu(self.norm(refined + x3), self.slope)


class SafeClickHead(nnx.Module):
    """F_transform, E1, E2 and the CRL: everything SafeClick adds to SAM 2."""

    def __init__(self, cfg: SAM2Config, sc: SafeClickConfig, rngs: nnx.Rngs):
        self.sc = sc
        c, c1 = cfg.d_model, sc.channels
        if sc.use_e1:
            din, ratio = block_geometry(cfg, sc.block_index(cfg))
            self.transform = Transform(din, c1, ratio, rngs)
            self.e1 = Expert(c1, sc.num_heads, sc.mlp_dim, cross=True, rngs=rngs)
        else:
            self.transform = self.e1 = None
        if (sc.use_e1 or sc.use_e2) and c1 != c:
            self.in_proj = layers.conv(c, c1, 1, rngs)  # x_f to C1 channels, when C1 != C
        else:
            self.in_proj = None
        self.e2 = Expert(c1, sc.num_heads, sc.mlp_dim, cross=False, rngs=rngs) if sc.use_e2 else None
        self.crl = ConsensusLayer(c1, c, sc.alpha_init, sc.leaky_slope, sc.use_crl, sc.use_e1, rngs)

    def image_features(self, block, image_embed):
        """Prompt-independent: E1, E2 and F_conv(x2') for one batch of images."""
        xf = image_embed if self.in_proj is None else self.in_proj(image_embed)
        x1 = self.e1(self.transform(block), xf) if self.e1 is not None else None
        x2 = self.e2(xf) if self.e2 is not None else xf
        return self.crl.refine(x1, x2)

    def fuse(self, refined, x3):
        return self.crl.fuse(refined, x3)


class SafeClickModel(nnx.Module):
    """SAM 2's image path with the SafeClick decoder. Attribute names follow SAM2Image so the
    base checkpoint's weights (E3, tokens, upscaling, heads) load unchanged."""

    def __init__(self, cfg: SAM2Config, sc: SafeClickConfig, rngs: nnx.Rngs):
        self.cfg, self.sc = cfg, sc
        self.keep_block = sc.block_index(cfg)
        self.image_encoder = ImageEncoder(cfg, rngs)
        self.sam_prompt_encoder = PromptEncoder(cfg, rngs)
        self.sam_mask_decoder = MaskDecoder(cfg, rngs)
        self.no_mem_embed = layers.small_normal(rngs, (1, 1, cfg.d_model))
        self.safeclick = SafeClickHead(cfg, sc, rngs)

    def encode_image(self, images) -> dict:
        feats = encode_image(self, images, keep_block=self.keep_block)
        feats["refined"] = self.safeclick.image_features(feats.pop("block"), feats["image_embed"])
        return feats

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
        """SAM 2's decoding with the CRL fusing the prompt-dependent x3 (eq. 9) before the heads."""
        return decode_prompts(
            self,
            features,
            coords,
            labels,
            mask_input,
            has_mask,
            multimask_output,
            dynamic_multimask,
            fuse=lambda f, x3: self.safeclick.fuse(f["refined"], x3),
        )


# --- what trains ----------------------------------------------------------------------------


# conv_s0/conv_s1 belong to torch's sam_mask_decoder but only project the frozen encoder's
# high-resolution maps; keeping them frozen lets training cache their (small) outputs instead of
# the 256-channel maps (16x the bytes).
FROZEN_DECODER_PARTS = ("conv_s0", "conv_s1")


def is_frozen_encoder_path(path) -> bool:
    """The parameters whose outputs training caches per slice: the image encoder, no_mem_embed and the
    frozen decoder parts (FROZEN_DECODER_PARTS)."""
    p = tuple(str(x) for x in path)
    return p[0] in ("image_encoder", "no_mem_embed") or (
        p[0] == "sam_mask_decoder" and len(p) > 1 and p[1] in FROZEN_DECODER_PARTS
    )


def trainable_filter(train_prompt_encoder: bool = False, train_mask_decoder: bool = True):
    """An nnx filter selecting the trainable Params: the SafeClick head and SAM 2's mask decoder
    (E3, tokens, upscaling, heads) but never the image encoder (paper: encoder frozen)."""
    roots = {"safeclick"}
    if train_mask_decoder:
        roots.add("sam_mask_decoder")
    if train_prompt_encoder:
        roots.add("sam_prompt_encoder")

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param) or not path or path[0] not in roots:
            return False
        return not (path[0] == "sam_mask_decoder" and len(path) > 1 and path[1] in FROZEN_DECODER_PARTS)

    return is_trainable


def parameter_counts(model: nnx.Module, trainable) -> dict[str, int]:
    train, frozen = 0, 0
    for path, v in nnx.state(model).flat_state():
        n = int(v[...].size)
        if trainable(path, v):
            train += n
        else:
            frozen += n
    return {"trainable": train, "frozen": frozen, "total": train + frozen}
