"""SAM 2 model configurations as data.

One `SAM2Config` per checkpoint family and size. The numbers come from the `sam2` 1.1.0 package's
YAML files (configs/sam2{,.1}/*.yaml) and the Hiera defaults (modeling/backbones/hieradet.py).
The image path of sam2 and sam2.1 is identical; `version` only changes which memory/video keys a
checkpoint carries (sam2.1 adds `no_obj_embed_spatial` and `obj_ptr_tpos_proj`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> list[int]:
        return [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]

    @property
    def q_pool_blocks(self) -> list[int]:
        return [e + 1 for e in self.stage_ends[:-1]][: self.q_pool]

    @property
    def channel_list(self) -> list[int]:
        """Output channels of each stage, lowest resolution first (the neck's order)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return dims[::-1]


@dataclasses.dataclass(frozen=True)
class SAM2Config:
    name: str = "sam2.1_hiera_t"
    version: str = "sam2.1"  # "sam2" or "sam2.1"
    hiera: HieraConfig = HieraConfig()
    image_size: int = 1024
    backbone_stride: int = 16
    # FPN neck
    d_model: int = 256
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1
    # prompt encoder
    mask_in_chans: int = 16
    # mask decoder
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    use_high_res_features: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    iou_prediction_use_sigmoid: bool = True
    # build_sam.build_sam2 forces these on (apply_postprocessing=True), also for images.
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    # memory (video) path
    mem_dim: int = 64
    num_maskmem: int = 7

    @property
    def embedding_size(self) -> int:
        """Side of the lowest-resolution feature map used by the decoder (64 at 1024 px)."""
        return self.image_size // self.backbone_stride

    def replace(self, **kw) -> "SAM2Config":
        if "hiera" in kw and isinstance(kw["hiera"], dict):
            kw["hiera"] = HieraConfig(**kw["hiera"])
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAM2Config":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAM2Config keys: {unknown}")
        h = d.pop("hiera", {})
        h = {k: tuple(v) if isinstance(v, list) else v for k, v in h.items()}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(hiera=HieraConfig(**h), **d)


_HIERA = {
    "t": HieraConfig(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "s": HieraConfig(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "b+": HieraConfig(
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        window_pos_embed_bkg_spatial_size=(14, 14),
    ),
    "l": HieraConfig(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_spec=(8, 4, 16, 8),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
}
SIZES = tuple(_HIERA)


def model_name(version: str, size: str) -> str:
    return f"{version}_hiera_{size}"


CONFIGS: dict[str, SAM2Config] = {
    model_name(v, s): SAM2Config(name=model_name(v, s), version=v, hiera=h)
    for v in ("sam2", "sam2.1")
    for s, h in _HIERA.items()
}
# MedSAM 2 ships SAM 2.1-tiny weights fine-tuned at 512 px input.
CONFIGS["medsam2_t"] = CONFIGS["sam2.1_hiera_t"].replace(name="medsam2_t", image_size=512)


def get_config(name: str) -> SAM2Config:
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]
