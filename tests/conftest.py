import os

# Tests run on the CPU with a few virtual devices available for the sharding tests; fp32 matmuls
# at full precision so parity numbers mean what they say.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sam2_tiny_pt(tmp_path_factory):
    """(torch model, path) of a perturbed random sam2.1 tiny in the official {'model': sd} layout."""
    from convert.torch_io import save_torch_state_dict
    from tests.sam2_torch import build_torch_sam2, numpy_state_dict

    model = build_torch_sam2("sam2.1_hiera_t")
    path = str(tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_t.pt")
    save_torch_state_dict(numpy_state_dict(model), path)
    return model, path


@pytest.fixture(scope="session")
def sam2_tiny_dir(sam2_tiny_pt, tmp_path_factory):
    """A model directory converted from sam2_tiny_pt by the project's CLI."""
    from convert.sam2_to_flax import main

    out = str(tmp_path_factory.mktemp("converted") / "sam2.1_t")
    assert main(["--checkpoint", sam2_tiny_pt[1], "--out", out]) == 0
    return out
