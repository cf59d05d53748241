"""Random initialisation equals sam2's: a model trained from scratch (the stand-in, `full` training
without init.checkpoint) starts from the distribution SAM2Train starts from.

Every tensor of a JAX sam2.1 tiny built from random weights (image path and memory path) is
compared with the same tensor of sam2's own random init (build_sam2, ckpt_path=None): mean and
standard deviation, and whether it is constant. Tolerances: a std within 15% and a mean within
0.1 std for tensors of at least 1024 values (sampling noise of a uniform or normal draw of that
size is under 5%); smaller tensors only need the same order of magnitude (within a factor of 2).
"""

import numpy as np
import pytest
from flax import nnx

from safeclick_jax.models import registry
from safeclick_jax.models.config import get_config
from safeclick_jax.models.memory import MemoryConfig, SAM2Memory
from safeclick_jax.models.weight_map import state_dict
from tests.sam2_torch import config_path, torch


@pytest.fixture(scope="module")
def both():
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    tm = build_sam2(config_path("sam2.1_hiera_t"), ckpt_path=None, device="cpu")
    ref = {k: v.detach().numpy() for k, v in tm.state_dict().items() if v.is_floating_point()}
    cfg = get_config("sam2.1_hiera_t")
    image = registry.build({"kind": "sam2", "sam2": cfg.to_dict()}, nnx.Rngs(0))
    memory = SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(1))
    ours = {**state_dict(image), **state_dict(memory)}
    return ours, ref


def test_every_tensor_initialised_as_sam2(both):
    ours, ref = both
    missing = sorted(set(ref) - set(ours))
    assert not missing, f"no JAX tensor for {missing[:5]}"
    bad = []
    for key, t in ref.items():
        a, b = np.asarray(ours[key], np.float64), t.astype(np.float64)
        sa, sb = a.std(), b.std()
        if b.size == 1:  # one draw (a bias of one output): nothing to compare
            continue
        if sb == 0:  # a constant in sam2 (zeros, ones, layer-scale 1e-6): the same constant
            if not np.allclose(a, b):
                bad.append(f"{key}: constant {b.flat[0]} in sam2, not here")
        elif b.size >= 1024:
            if not (0.85 < sa / sb < 1.15) or abs(a.mean() - b.mean()) > 0.1 * sb:
                bad.append(f"{key} {b.shape}: std {sa:.4g} / mean {a.mean():.3g} vs sam2 {sb:.4g} / {b.mean():.3g}")
        elif not (0.5 < sa / sb < 2.0):
            bad.append(f"{key} {b.shape}: std {sa:.4g} vs sam2 {sb:.4g}")
    assert not bad, f"{len(bad)} tensors initialised unlike sam2:\n" + "\n".join(bad[:20])
