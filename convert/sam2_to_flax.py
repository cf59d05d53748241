"""Convert an official SAM 2 / SAM 2.1 / MedSAM 2 checkpoint into a safeclick-jax model directory.

    python -m convert.sam2_to_flax --checkpoint sam2.1_hiera_tiny.pt --out ckpt/sam2.1_t [--model sam2.1_hiera_t]
    python -m convert.sam2_to_flax --checkpoint sam2.1-hiera-tiny-hf/ --out ckpt/sam2.1_t   # transformers folder
    python -m convert.sam2_to_flax --checkpoint hf:facebook/sam2.1-hiera-tiny --out ckpt/sam2.1_t

The checkpoint is a PyTorch .pt file, a transformers Sam2Model / Sam2VideoModel folder (config.json +
model.safetensors; its names are mapped onto sam2's by convert/hf_layout.py), or hf:REPO[/FILE],
resolved through huggingface_hub's cache (convert/hf_hub.py).

Strict: every key the Flax image path needs must be present with its exact shape, every image-path
key in the file must be used, and the memory/video keys of the detected version must be present;
they are carried into the output's `extra` item untouched. Anything else exits non-zero naming
every offending key. A transformers Sam2Model holds the image path only: it converts without
memory/video tensors (segmenting volumes then takes them from `--memory-checkpoint`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import numpy as np
from flax import nnx, traverse_util

from convert import hf_hub, hf_layout
from convert.torch_io import CheckpointError, load_torch_state_dict
from safeclick_jax import checkpoint
from safeclick_jax.models import config as model_config
from safeclick_jax.models.registry import count_params
from safeclick_jax.models.sam2 import IMAGE_PATH_PREFIXES, SAM2Image
from safeclick_jax.models.weight_map import WeightMapError, load_state_dict

# Top-level torch modules of SAM2Base's memory/video path, per checkpoint version.
MEMORY_PREFIXES = {
    "sam2": (
        "memory_attention.",
        "memory_encoder.",
        "obj_ptr_proj.",
        "mask_downsample.",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "no_obj_ptr",
    ),
}
MEMORY_PREFIXES["sam2.1"] = MEMORY_PREFIXES["sam2"] + ("no_obj_embed_spatial", "obj_ptr_tpos_proj.")
# (embed_dim, number of Hiera blocks) -> size, from the sam2 configs.
_SIZE_BY_SHAPE = {(h.embed_dim, h.depth): s for s, h in model_config._HIERA.items()}


def detect_model(sd) -> str:
    """The config name (e.g. 'sam2.1_hiera_t') that the tensors' shapes describe."""
    key = "image_encoder.trunk.pos_embed"
    if key not in sd:
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"not a SAM 2 checkpoint: no key {key!r} (the file's first keys: {sample})")
    embed_dim = int(sd[key].shape[1])
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith("image_encoder.trunk.blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    size = _SIZE_BY_SHAPE.get((embed_dim, depth))
    if size is None:
        known = ", ".join(f"{s}: embed_dim {d}, {n} blocks" for (d, n), s in _SIZE_BY_SHAPE.items())
        raise CheckpointError(f"unknown Hiera shape: embed_dim {embed_dim}, {depth} blocks (known: {known})")
    # the image path alone (a transformers Sam2Model) does not tell the version: the newest is assumed
    image_only = all(k.startswith(IMAGE_PATH_PREFIXES) for k in sd)
    version = "sam2.1" if "no_obj_embed_spatial" in sd or image_only else "sam2"
    return model_config.model_name(version, size)


def convert_state_dict(sd, cfg, image_only: bool = False) -> tuple[SAM2Image, dict]:
    """Loads the image path into a SAM2Image; returns it and the memory/video tensors (nested).
    `image_only`: a source without memory/video tensors is accepted (then `extra` is empty)."""
    model = nnx.eval_shape(lambda: SAM2Image(cfg, nnx.Rngs(0)))
    image_sd = {k: v for k, v in sd.items() if k.startswith(IMAGE_PATH_PREFIXES)}
    rest = {k: v for k, v in sd.items() if not k.startswith(IMAGE_PATH_PREFIXES)}
    memory = () if image_only and not rest else MEMORY_PREFIXES[cfg.version]
    unexpected = sorted(k for k in rest if not k.startswith(memory))
    missing_memory = [p for p in memory if not any(k.startswith(p) for k in rest)]
    try:
        load_state_dict(model, image_sd, strict=True, where=f"({cfg.name})")
    except WeightMapError as e:
        raise WeightMapError(
            e.missing + missing_memory, e.unexpected + unexpected, e.mismatched, f"({cfg.name})"
        ) from None
    if unexpected or missing_memory:
        raise WeightMapError(missing_memory, unexpected, (), f"({cfg.name})")
    extra = traverse_util.unflatten_dict({tuple(k.split(".")): np.asarray(v) for k, v in rest.items()})
    return model, extra


def read_checkpoint(path: str) -> tuple[dict, int | None, bool, str]:
    """(sam2-named state_dict, the source's image size or None, whether it may lack the memory path,
    the local path) of a .pt file, a transformers folder or hf:REPO[/FILE]."""
    if path.startswith(hf_hub.PREFIX):
        path = hf_hub.resolve(path)
    if hf_layout.is_hf_folder(path):
        sd, config = hf_layout.load_hf_folder(path)
        return sd, hf_layout.hf_image_size(config), config["model_type"] == "sam2", path
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a folder without config.json (expected a .pt file or a transformers folder)")
    return load_torch_state_dict(path), None, False, path


def part_counts(model: SAM2Image) -> "OrderedDict[str, int]":
    return OrderedDict(
        [
            ("image_encoder.trunk", count_params(model.image_encoder.trunk)),
            ("image_encoder.neck", count_params(model.image_encoder.neck)),
            ("sam_prompt_encoder", count_params(model.sam_prompt_encoder)),
            ("sam_mask_decoder", count_params(model.sam_mask_decoder)),
            ("no_mem_embed", int(model.no_mem_embed[...].size)),
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="PyTorch .pt file ({'model': state_dict} or bare), transformers SAM 2 folder, or hf:REPO[/FILE]",
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument(
        "--model",
        default=None,
        choices=sorted(model_config.CONFIGS),
        help="config name; detected from tensor shapes when absent",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input resolution (default: a transformers config's, else the model config's; MedSAM 2 uses 512)",
    )
    a = p.parse_args(argv)
    try:
        sd, source_size, image_only, source = read_checkpoint(a.checkpoint)
        detected = detect_model(sd)
        name = a.model or detected
        cfg = model_config.get_config(name)
        image_size = a.image_size or source_size
        if image_size:
            if image_size % 32:
                raise CheckpointError(f"--image-size {image_size}: must be a multiple of 32")
            cfg = cfg.replace(image_size=image_size)
        model, extra = convert_state_dict(sd, cfg, image_only)
    except (CheckpointError, WeightMapError) as e:
        print(f"error: {a.checkpoint}: {e}", file=sys.stderr)
        return 2
    counts = part_counts(model)
    n_extra = sum(v.size for v in traverse_util.flatten_dict(extra).values())
    checkpoint.save(
        a.out,
        {"kind": "sam2", "sam2": cfg.to_dict(), "source": os.path.abspath(source), "param_counts": counts},
        checkpoint.model_params(model),
        extra,
    )
    print(f"converted {a.checkpoint}")
    print(f"  model      {cfg.name} (detected {detected}), image size {cfg.image_size}, version {cfg.version}")
    for part, n in counts.items():
        print(f"  {part:<22}{n:>13,d}")
    print(f"  {'image path total':<22}{sum(counts.values()):>13,d}")
    if extra:
        n_tensors = len(traverse_util.flatten_dict(extra))
        print(f"  {'memory/video (extra)':<22}{n_extra:>13,d}  ({n_tensors} tensors, carried)")
    else:
        print("  memory/video           none in the source (image path only; volumes need --memory-checkpoint)")
    print(f"  written to {os.path.abspath(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
