"""transformers' Sam2Model / Sam2VideoModel key names <-> the official sam2 key names.

A transformers SAM 2 folder (`config.json` + `model.safetensors`) holds the official tensors under
other names, values untouched, with two exceptions: the four `point_embeddings.{i}.weight` [1,256]
are stacked into `prompt_encoder.point_embed.weight` [4,256], and the prompt encoder's random
Fourier matrix is stored twice (`shared_image_embedding.positional_embedding` is a copy). Renaming
into sam2's names here leaves the rest of the converter (safeclick_jax/models/weight_map.py)
unchanged; `to_hf` is the exact inverse, for the reverse export.

`RENAMES` is the one table: (sam2 module prefix, transformers module prefix), first match wins,
`{n}` / `{m}` stand for a block index, `{w}` for a submodule name.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict

import numpy as np

from convert.torch_io import CheckpointError

_MLP3 = [("layers.0.", "proj_in."), ("layers.1.", "layers.0."), ("layers.2.", "proj_out.")]

RENAMES: list[tuple[str, str]] = [
    # image encoder: Hiera trunk and FPN neck
    ("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.0.", "vision_encoder.backbone.blocks.{n}.mlp.proj_in."),
    ("image_encoder.trunk.blocks.{n}.mlp.layers.1.", "vision_encoder.backbone.blocks.{n}.mlp.proj_out."),
    ("image_encoder.trunk.blocks.{n}.norm{m}.", "vision_encoder.backbone.blocks.{n}.layer_norm{m}."),
    ("image_encoder.trunk.", "vision_encoder.backbone."),
    ("image_encoder.neck.convs.{n}.conv.", "vision_encoder.neck.convs.{n}."),
    # prompt encoder
    ("sam_prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("sam_prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("sam_prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("sam_prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("sam_prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    (
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("sam_prompt_encoder.", "prompt_encoder."),
    # mask decoder
    ("sam_mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("sam_mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("sam_mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    *[(f"sam_mask_decoder.iou_prediction_head.{a}", f"mask_decoder.iou_prediction_head.{b}") for a, b in _MLP3],
    *[(f"sam_mask_decoder.pred_obj_score_head.{a}", f"mask_decoder.pred_obj_score_head.{b}") for a, b in _MLP3],
    *[
        (f"sam_mask_decoder.output_hypernetworks_mlps.{{n}}.{a}", f"mask_decoder.output_hypernetworks_mlps.{{n}}.{b}")
        for a, b in _MLP3
    ],
    ("sam_mask_decoder.transformer.layers.{n}.mlp.layers.0.", "mask_decoder.transformer.layers.{n}.mlp.proj_in."),
    ("sam_mask_decoder.transformer.layers.{n}.mlp.layers.1.", "mask_decoder.transformer.layers.{n}.mlp.proj_out."),
    ("sam_mask_decoder.transformer.layers.{n}.norm{m}.", "mask_decoder.transformer.layers.{n}.layer_norm{m}."),
    ("sam_mask_decoder.transformer.layers.{n}.{w}.out_proj.", "mask_decoder.transformer.layers.{n}.{w}.o_proj."),
    (
        "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.",
    ),
    ("sam_mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("sam_mask_decoder.", "mask_decoder."),
    ("no_mem_embed", "no_memory_embedding"),
    # memory path (Sam2VideoModel only)
    ("memory_attention.layers.{n}.{w}.out_proj.", "memory_attention.layers.{n}.{w}.o_proj."),
    ("memory_attention.layers.{n}.norm{m}.", "memory_attention.layers.{n}.layer_norm{m}."),
    ("memory_attention.norm.", "memory_attention.layer_norm."),
    ("memory_attention.", "memory_attention."),
    # sam2's mask downsampler is one Sequential: conv, norm, GELU per stage, then a 1x1 conv (index 12)
    *[
        pair
        for k in range(4)
        for pair in (
            (f"memory_encoder.mask_downsampler.encoder.{3 * k}.", f"memory_encoder.mask_downsampler.layers.{k}.conv."),
            (
                f"memory_encoder.mask_downsampler.encoder.{3 * k + 1}.",
                f"memory_encoder.mask_downsampler.layers.{k}.layer_norm.",
            ),
        )
    ],
    ("memory_encoder.mask_downsampler.encoder.12.", "memory_encoder.mask_downsampler.final_conv."),
    ("memory_encoder.fuser.layers.{n}.dwconv.", "memory_encoder.memory_fuser.layers.{n}.depthwise_conv."),
    ("memory_encoder.fuser.layers.{n}.pwconv{m}.", "memory_encoder.memory_fuser.layers.{n}.pointwise_conv{m}."),
    ("memory_encoder.fuser.layers.{n}.norm.", "memory_encoder.memory_fuser.layers.{n}.layer_norm."),
    ("memory_encoder.fuser.layers.{n}.gamma", "memory_encoder.memory_fuser.layers.{n}.scale"),
    ("memory_encoder.out_proj.", "memory_encoder.projection."),
    ("memory_encoder.pix_feat_proj.", "memory_encoder.feature_projection."),
    *[(f"obj_ptr_proj.{a}", f"object_pointer_proj.{b}") for a, b in _MLP3],
    ("obj_ptr_tpos_proj.", "temporal_positional_encoding_projection_layer."),
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("no_obj_ptr", "no_object_pointer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ("mask_downsample.", "mask_downsample."),
]

_POINT_EMBED = "prompt_encoder.point_embed.weight"  # rows = sam2's point_embeddings.{0..3}.weight
_PE = "prompt_encoder.shared_embedding.positional_embedding"
_PE_COPY = "shared_image_embedding.positional_embedding"  # a copy of _PE
_GROUPS = {"n": r"(?P<n>\d+)", "m": r"(?P<m>\d+)", "w": r"(?P<w>[a-z_]+)"}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    # a module prefix (ending in '.') keeps the rest of the key; a tensor name must match whole
    return re.compile(pattern + ("(?P<rest>.*)" if template.endswith(".") else "(?P<rest>)"))


_SAM2_TO_HF = [(_compile(a), b) for a, b in RENAMES]
_HF_TO_SAM2 = [(_compile(b), a) for a, b in RENAMES]


def _rename(key: str, table) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if k != "rest"}
            return template.format(**groups) + m["rest"]
    return None


def to_sam2(sd_hf) -> "OrderedDict[str, np.ndarray]":
    """A transformers SAM 2 state_dict in sam2's names; every key must be known."""
    out, unknown = OrderedDict(), []
    for k, v in sd_hf.items():
        if k == _POINT_EMBED:
            for i, row in enumerate(np.asarray(v)):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = row[None]
        elif k == _PE_COPY:
            original = sd_hf.get(_PE)
            if original is None or not np.array_equal(original, v):
                raise CheckpointError(f"{_PE_COPY} differs from {_PE} (sam2 has one matrix for both)")
        else:
            name = _rename(k, _HF_TO_SAM2)
            if name is None:
                unknown.append(k)
            else:
                out[name] = v
    if unknown:
        names = ", ".join(unknown)
        raise CheckpointError(f"not a transformers SAM 2 state_dict: unknown keys ({len(unknown)}): {names}")
    return out


def to_hf(sd) -> "OrderedDict[str, np.ndarray]":
    """The inverse of `to_sam2`: sam2 names -> transformers' Sam2VideoModel names (Sam2Model's
    when `sd` holds the image path only)."""
    out, points, unknown = OrderedDict(), {}, []
    for k, v in sd.items():
        m = re.fullmatch(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight", k)
        if m:
            points[int(m[1])] = np.asarray(v)
            continue
        name = _rename(k, _SAM2_TO_HF)
        if name is None:
            unknown.append(k)
        else:
            out[name] = v
    if unknown:
        raise CheckpointError(f"keys without a transformers name ({len(unknown)}): {', '.join(unknown)}")
    out[_POINT_EMBED] = np.concatenate([points[i] for i in sorted(points)], axis=0)
    out[_PE_COPY] = out[_PE]
    return out


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_hf_folder(path: str) -> tuple["OrderedDict[str, np.ndarray]", dict]:
    """(state_dict in sam2's names as float32/int numpy, config.json) of a transformers SAM 2
    folder: `model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}/config.json: not JSON ({e})") from None
    if config.get("model_type") not in ("sam2", "sam2_video"):
        raise CheckpointError(
            f"{path}/config.json: model_type {config.get('model_type')!r}, expected 'sam2' or 'sam2_video'"
        )
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = OrderedDict()
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: no such file (a transformers SAM 2 folder holds config.json + {name})")
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from e
        for k, v in tensors.items():
            sd[k] = (v.float() if v.is_floating_point() else v).numpy()
    return to_sam2(sd), config


def hf_image_size(config: dict) -> int:
    """The input resolution a transformers SAM 2 config was made for."""
    size = config["prompt_encoder_config"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def hf_config(cfg, video: bool):
    """The transformers config (Sam2VideoConfig with the memory path, else Sam2Config) of a
    safeclick-jax SAM2Config: the numbers of sam2's YAML files in transformers' names."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VideoConfig, Sam2VisionConfig

    h, s, e = cfg.hiera, cfg.image_size, cfg.embedding_size
    backbone = Sam2HieraDetConfig(
        hidden_size=h.embed_dim,
        num_attention_heads=h.num_heads,
        image_size=[s, s],
        blocks_per_stage=list(h.stages),
        embed_dim_per_stage=h.channel_list[::-1],
        num_attention_heads_per_stage=[int(h.num_heads * h.head_mul**i) for i in range(len(h.stages))],
        window_size_per_stage=list(h.window_spec),
        global_attention_blocks=list(h.global_att_blocks),
        window_positional_embedding_background_size=list(h.window_pos_embed_bkg_spatial_size),
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=h.channel_list,
        backbone_feature_sizes=[[4 * e, 4 * e], [2 * e, 2 * e], [e, e]],
    )
    parts = dict(vision_config=vision, prompt_encoder_config={"image_size": s}, mask_decoder_config={})
    if not video:
        return Sam2Config(**parts)
    v21 = cfg.version == "sam2.1"
    return Sam2VideoConfig(
        **parts,
        image_size=s,
        enable_occlusion_spatial_embedding=v21,
        enable_temporal_pos_encoding_for_object_pointers=v21,
    )


def save_hf_folder(sd, cfg, out: str) -> None:
    """Writes `out/config.json` + `out/model.safetensors` (transformers' layout) from a sam2-named
    state_dict; a Sam2VideoModel folder when it holds the memory path, else a Sam2Model folder."""
    import torch
    from safetensors.torch import save_file

    # own copies: the two Fourier-matrix entries are one array, and safetensors refuses shared memory
    tensors = {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in to_hf(sd).items()}
    video = any(k.startswith("memory_") for k in sd)
    os.makedirs(out, exist_ok=True)
    hf_config(cfg, video).save_pretrained(out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
