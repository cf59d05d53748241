"""Export a safeclick-jax model directory back to a PyTorch state_dict (`{"model": state_dict}`).

    python -m convert.flax_to_torch --model-dir ckpt/sam2.1_t --out sam2.1_t_roundtrip.pt
    python -m convert.flax_to_torch --model-dir ckpt/sam2.1_t --out sam2.1_t_hf --format hf   # transformers folder

The image path comes from the Flax weights (inverse of the generic map in safeclick_jax/models/weight_map.py) and
the memory/video tensors from the directory's `extra` item, so a converted official checkpoint
round-trips bit-exactly. `--format hf` writes the same tensors as a transformers folder
(config.json + model.safetensors): Sam2VideoModel's layout with the memory path, else Sam2Model's.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

from flax import traverse_util

from convert.hf_layout import save_hf_folder
from convert.torch_io import CheckpointError, save_torch_state_dict
from safeclick_jax import checkpoint
from safeclick_jax.inference.loader import load_model
from safeclick_jax.models.weight_map import state_dict


def export_state_dict(model_dir: str) -> "OrderedDict":
    return _export(model_dir)[0]


def _export(model_dir: str):
    m = load_model(model_dir)
    model, extra = m.network, m.extra
    sd = state_dict(model)
    for k, v in traverse_util.flatten_dict(extra).items():
        sd[".".join(k)] = v
    return sd, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True, help="a .pt file (--format torch) or a folder (--format hf)")
    p.add_argument("--format", default="torch", choices=("torch", "hf"), help="sam2's .pt or transformers' folder")
    a = p.parse_args(argv)
    try:
        sd, model = _export(a.model_dir)
    except checkpoint.ModelDirError as e:
        checkpoint.exit_on_model_error(e)
    if a.format == "hf":
        try:
            save_hf_folder(sd, model.cfg, a.out)
        except CheckpointError as e:  # a SafeClick model: its decoder has no transformers counterpart
            print(f"error: {a.model_dir}: {e}", file=sys.stderr)
            return 2
    else:
        save_torch_state_dict(sd, a.out)
    print(f"wrote {len(sd)} tensors to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
