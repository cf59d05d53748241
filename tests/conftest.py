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


@pytest.fixture(scope="session")
def app_model_dir(tmp_path_factory):
    """A random sam2.1 tiny at image size 128 for the web app's tests: small enough to compile and
    run in seconds; the object-score bias is raised so that a click gives a non-empty mask."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from convert.sam2_to_flax import main as convert_main
    from convert.torch_io import save_torch_state_dict
    from tests.sam2_torch import config_path, numpy_state_dict

    torch.manual_seed(0)
    tm = build_sam2_video_predictor(
        config_path("sam2.1_hiera_t"), ckpt_path=None, device="cpu", hydra_overrides_extra=["++model.image_size=128"]
    )
    with torch.no_grad():
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(20.0)
    d = tmp_path_factory.mktemp("app_model")
    save_torch_state_dict(numpy_state_dict(tm), str(d / "model.pt"))
    assert convert_main(["--checkpoint", str(d / "model.pt"), "--out", str(d / "ckpt"), "--image-size", "128"]) == 0
    return str(d / "ckpt")
