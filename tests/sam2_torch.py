"""Torch-side fixtures for parity tests: SAM 2 models from the `sam2` package with random,
perturbed weights, so a swapped or missing mapping cannot hide behind ones and zeros."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")


def config_path(name: str) -> str:
    """'sam2.1_hiera_t' -> 'configs/sam2.1/sam2.1_hiera_t.yaml' (the sam2 package's hydra path)."""
    version = name.split("_hiera_")[0]
    return f"configs/{version}/{name}.yaml"


@functools.lru_cache(maxsize=4)
def build_torch_sam2(name: str = "sam2.1_hiera_t", seed: int = 0):
    """A sam2 SAM2Base in eval mode on CPU with every tensor perturbed (deterministic for seed)."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(config_path(name), ckpt_path=None, device="cpu")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def nchw_to_nhwc(t) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


# sam2's training-yaml loss weights (MultiStepMultiMasksAndIous), shared by the parity test and the benchmark
SAM2_LOSS = dict(
    mask_weight=20.0, dice_weight=1.0, iou_weight=1.0, class_weight=1.0, focal_alpha=0.25, focal_gamma=2.0,
    iou_loss="l1", supervise_all_iou=True,
)  # fmt: skip


def import_training():
    """sam2's `training` package without tensordict and its trainer (neither is needed for a step)."""
    import sys
    import types

    if "tensordict" not in sys.modules:
        td = types.ModuleType("tensordict")
        td.tensorclass = lambda cls: cls
        sys.modules["tensordict"] = td
    if "training.trainer" not in sys.modules:
        tr = types.ModuleType("training.trainer")
        tr.CORE_LOSS_KEY = "core_loss"
        sys.modules["training.trainer"] = tr
    import training.loss_fns as loss_fns
    import training.model.sam2 as sam2_train

    return sam2_train, loss_fns
