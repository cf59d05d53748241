"""Hugging Face checkpoints: transformers' Sam2Model / Sam2VideoModel folders and hf:REPO.

A transformers Sam2Model with random perturbed weights, saved with save_pretrained, converts to
the same bits as the same weights in sam2's .pt layout, and the converted model's image path gives
transformers' own forward outputs. Nothing is downloaded: hf:REPO is tested on a cache laid out here."""

import json
import os

import numpy as np
import pytest
from flax import traverse_util

from convert import hf_layout
from convert.flax_to_torch import main as export_main
from convert.sam2_to_flax import main as convert_main
from convert.torch_io import load_torch_state_dict, save_torch_state_dict
from tests.sam2_torch import rel_err, torch

transformers = pytest.importorskip("transformers")

SIZE = 256  # a 256 px tiny model: every part of the image path, at a fraction of 1024 px's time


def _tiny_hf_config(video: bool = False):
    from safeclick_jax.models import config as model_config

    return hf_layout.hf_config(model_config.get_config("sam2.1_hiera_t").replace(image_size=SIZE), video)


def _perturbed(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


def _run(main, args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(transformers Sam2Model with perturbed weights, its save_pretrained folder, converted model dir)."""
    torch.manual_seed(0)
    model = _perturbed(transformers.Sam2Model(_tiny_hf_config()), seed=1)
    # sam2 has one Fourier matrix where transformers keeps two buffers; released checkpoints hold a copy
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding
        )
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(str(d / "sam2-hf"))
    assert convert_main(["--checkpoint", str(d / "sam2-hf"), "--out", str(d / "converted")]) == 0
    return model, str(d / "sam2-hf"), str(d / "converted")


def test_rename_table_covers_sam2_video_model(sam2_tiny_pt):
    """Every tensor of sam2's SAM2Base has exactly one transformers name, with transformers' shape,
    and back again: the table is a bijection onto Sam2VideoModel's state_dict."""
    sd = load_torch_state_dict(sam2_tiny_pt[1])
    hf = hf_layout.to_hf(sd)
    video = transformers.Sam2VideoModel(transformers.Sam2VideoConfig()).state_dict()
    assert set(hf) == set(video) and len(hf) == 469
    assert all(tuple(hf[k].shape) == tuple(video[k].shape) for k in hf)
    back = hf_layout.to_sam2(hf)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_hf_folder_converts_bit_exact_to_pt_layout(hf_model, tmp_path, capsys):
    model, folder, converted = hf_model
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    pt = str(tmp_path / "same.pt")
    save_torch_state_dict(hf_layout.to_sam2(sd), pt)
    rc, out = _run(
        convert_main, ["--checkpoint", pt, "--out", str(tmp_path / "from_pt"), "--image-size", "256"], capsys
    )
    # a .pt without the memory path is refused, as before: MedSAM 2 / sam2 files always carry it
    assert rc == 2 and "missing keys" in out and "memory_attention." in out
    from safeclick_jax import checkpoint

    desc_hf, params_hf, extra_hf = checkpoint.load(converted)
    assert desc_hf["sam2"]["image_size"] == SIZE and desc_hf["sam2"]["name"] == "sam2.1_hiera_t"
    assert extra_hf == {}
    # the same weights in sam2's names, converted by the library function the CLI uses
    from convert.sam2_to_flax import convert_state_dict

    from_pt, _ = convert_state_dict(load_torch_state_dict(pt), _flax_cfg(), image_only=True)
    a = traverse_util.flatten_dict(params_hf)
    b = traverse_util.flatten_dict(checkpoint.model_params(from_pt))
    assert set(a) == set(b) and len(a) > 200
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.array_equal(
            np.asarray(a[k]), np.asarray(b[k])
        ), k


def _flax_cfg():
    from safeclick_jax.models import config as model_config

    return model_config.get_config("sam2.1_hiera_t").replace(image_size=SIZE)


def test_image_path_equals_transformers_forward(hf_model):
    import jax.numpy as jnp

    from safeclick_jax.models.registry import load_model

    model, _, converted = hf_model
    flax_model, _, _ = load_model(converted)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    points = np.array([[[[60.0, 90.0], [180.0, 40.0]]]], np.float32)
    labels = np.array([[[1, 0]]], np.int32)
    with torch.no_grad():
        ref = model(
            pixel_values=torch.from_numpy(pixels),
            input_points=torch.from_numpy(points),
            input_labels=torch.from_numpy(labels),
            multimask_output=True,
        )
    feats = flax_model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    # transformers pads a (0, 0) "not a point" (label -1) after clicks without a box, as sam2 does
    coords = jnp.asarray(np.concatenate([points[0], np.zeros((1, 1, 2), np.float32)], 1))
    lab = jnp.asarray(np.concatenate([labels[0], -np.ones((1, 1), np.int32)], 1))
    e4 = 4 * flax_model.cfg.embedding_size
    masks, iou, _, obj = flax_model.decode(
        feats, coords, lab, jnp.zeros((1, e4, e4, 1)), jnp.zeros((1,), bool), multimask_output=True
    )
    errs = {
        "masks": rel_err(masks, ref.pred_masks[0].numpy()),
        "iou": rel_err(iou, ref.iou_scores[0].numpy()),
        "object score": rel_err(obj, ref.object_score_logits[0].numpy()),
    }
    assert masks.shape == (1, 3, e4, e4)
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_export_hf_round_trip_bit_exact(hf_model, tmp_path, capsys):
    model, folder, converted = hf_model
    out = str(tmp_path / "exported")
    rc, text = _run(export_main, ["--model-dir", converted, "--out", out, "--format", "hf"], capsys)
    assert rc == 0, text
    again = transformers.Sam2Model.from_pretrained(out).eval()
    want, got = model.state_dict(), again.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "sam2"


def test_export_hf_video_layout(sam2_tiny_pt, sam2_tiny_dir, tmp_path, capsys):
    """A converted .pt (with the memory path) exports as a Sam2VideoModel folder that transformers
    loads with no missing or unexpected key, tensor for tensor the .pt's."""
    out = str(tmp_path / "video")
    rc, text = _run(export_main, ["--model-dir", sam2_tiny_dir, "--out", out, "--format", "hf"], capsys)
    assert rc == 0, text
    loaded, info = transformers.Sam2VideoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = hf_layout.to_hf(load_torch_state_dict(sam2_tiny_pt[1]))
    got = loaded.state_dict()
    assert all(np.array_equal(got[k].numpy(), want[k]) for k in want)


def _fake_cache(root, repo, files: dict) -> str:
    """huggingface_hub's cache layout: models--OWNER--NAME/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    snap = os.path.join(base, "snapshots", commit)
    for name, src in files.items():
        os.makedirs(os.path.dirname(os.path.join(snap, name)), exist_ok=True)
        os.symlink(src, os.path.join(snap, name))
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_repo_from_cache(offline_cache, hf_model, sam2_tiny_pt, tmp_path, capsys):
    from convert import hf_hub

    _, folder, _ = hf_model
    snap = _fake_cache(
        offline_cache, "facebook/sam2.1-hiera-tiny-hf", {f: os.path.join(folder, f) for f in os.listdir(folder)}
    )
    assert hf_hub.resolve("hf:facebook/sam2.1-hiera-tiny-hf") == snap
    snap_pt = _fake_cache(offline_cache, "facebook/sam2.1-hiera-tiny", {"sam2.1_hiera_tiny.pt": sam2_tiny_pt[1]})
    assert hf_hub.resolve("hf:facebook/sam2.1-hiera-tiny") == os.path.join(snap_pt, "sam2.1_hiera_tiny.pt")
    rc, out = _run(
        convert_main, ["--checkpoint", "hf:facebook/sam2.1-hiera-tiny-hf", "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 0 and "image path only" in out, out


def test_hf_repo_offline_uncached_says_what_to_download(offline_cache, tmp_path, capsys):
    rc, out = _run(
        convert_main, ["--checkpoint", "hf:facebook/sam2.1-hiera-tiny", "--out", str(tmp_path / "o")], capsys
    )
    lines = out.strip().splitlines()
    assert rc == 2 and len(lines) == 1, out
    assert "hf download facebook/sam2.1-hiera-tiny" in out
    assert os.path.join(offline_cache, "models--facebook--sam2.1-hiera-tiny") in out
    assert not os.path.exists(tmp_path / "o")


def test_hf_folder_errors(tmp_path, capsys):
    d = tmp_path / "other"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, out = _run(convert_main, ["--checkpoint", str(d), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "model_type 'bert'" in out
    (d / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    rc, out = _run(convert_main, ["--checkpoint", str(d), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "model.safetensors: no such file" in out
    with pytest.raises(Exception, match="unknown keys \\(1\\): surprise"):
        hf_layout.to_sam2({"mask_decoder.iou_token.weight": np.zeros((1, 256)), "surprise": np.zeros(1)})
