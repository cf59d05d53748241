"""Reading PyTorch checkpoints (official SAM 2 / SAM 2.1 / MedSAM 2 files) into numpy."""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict

import numpy as np


class CheckpointError(ValueError):
    pass


def load_torch_state_dict(path: str) -> "OrderedDict[str, np.ndarray]":
    """Returns the model state_dict of a .pt file as float32/int numpy arrays.

    Accepts the official layout `{"model": state_dict}`, a bare state_dict, `{"state_dict": ...}`,
    and keys prefixed with `module.` (DDP) or `model.`."""
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types; name the file and the cause
        kind = (
            "truncated or corrupt torch file"
            if zipfile.is_zipfile(path) or _starts_like_zip(path)
            else "not a PyTorch checkpoint"
        )
        raise CheckpointError(f"{path}: {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    sd = obj
    if isinstance(obj, dict):
        for k in ("model", "state_dict"):
            if k in obj and isinstance(obj[k], dict):
                sd = obj[k]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors "
            "(expected {'model': state_dict} or a bare state_dict)"
        )
    out = OrderedDict()
    for k, v in sd.items():
        for p in ("module.", "model."):
            if k.startswith(p):
                k = k[len(p) :]
        if v.is_floating_point():
            v = v.float()
        out[k] = v.detach().cpu().numpy()
    return out


def _starts_like_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def save_torch_state_dict(sd, path: str) -> None:
    """Writes `{"model": state_dict}`, the official SAM 2 layout."""
    import torch

    torch.save({"model": OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())}, path)
