"""The converter CLI: strictness, size detection, carried memory keys, bit-exact round trip."""

import json
import os

import numpy as np
import pytest

from convert.flax_to_torch import export_state_dict
from convert.sam2_to_flax import detect_model, main
from convert.torch_io import load_torch_state_dict, save_torch_state_dict
from tests.sam2_torch import build_torch_sam2, numpy_state_dict, torch  # noqa: F401  (skips without torch)


def _run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_convert_summary_and_counts(sam2_tiny_pt, sam2_tiny_dir):
    model, _ = sam2_tiny_pt
    desc = json.load(open(os.path.join(sam2_tiny_dir, "model.json")))
    assert desc["kind"] == "sam2" and desc["sam2"]["name"] == "sam2.1_hiera_t"
    counts = desc["param_counts"]
    torch_counts = {
        "image_encoder.trunk": sum(p.numel() for p in model.image_encoder.trunk.parameters()),
        "image_encoder.neck": sum(p.numel() for p in model.image_encoder.neck.parameters()),
        "sam_prompt_encoder": sum(p.numel() for p in model.sam_prompt_encoder.parameters()),
        "sam_mask_decoder": sum(p.numel() for p in model.sam_mask_decoder.parameters()),
    }
    for k, v in torch_counts.items():
        assert counts[k] == v, k
    # parameter counts of the sam2 package's sam2.1 tiny model
    assert counts["image_encoder.trunk"] + counts["image_encoder.neck"] == 27_219_136
    assert counts["sam_mask_decoder"] == 4_215_109


def test_round_trip_bit_exact(sam2_tiny_pt, sam2_tiny_dir, tmp_path):
    original = load_torch_state_dict(sam2_tiny_pt[1])
    exported = export_state_dict(sam2_tiny_dir)
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].shape == v.shape and exported[k].dtype == v.dtype, k
        assert np.array_equal(exported[k], v), k
    # and through the CLI + torch.save
    from convert.flax_to_torch import main as export_main

    out = str(tmp_path / "rt.pt")
    assert export_main(["--model-dir", sam2_tiny_dir, "--out", out]) == 0
    again = load_torch_state_dict(out)
    assert all(np.array_equal(again[k], original[k]) for k in original)


def test_memory_keys_carried(sam2_tiny_pt, sam2_tiny_dir):
    from flax import traverse_util

    from safeclick_jax.checkpoint import load

    _, _, extra = load(sam2_tiny_dir)
    flat = {".".join(k): v for k, v in traverse_util.flatten_dict(extra).items()}
    sd = load_torch_state_dict(sam2_tiny_pt[1])
    memory = {
        k for k in sd if k.startswith(("memory_", "obj_ptr", "mask_downsample", "maskmem", "no_mem_pos", "no_obj"))
    }
    assert set(flat) == memory and len(memory) > 100
    assert np.array_equal(
        flat["memory_attention.layers.0.linear1.weight"], sd["memory_attention.layers.0.linear1.weight"]
    )


def test_prefixes_and_bare_state_dict(sam2_tiny_pt, tmp_path):
    sd = load_torch_state_dict(sam2_tiny_pt[1])
    bare = str(tmp_path / "bare.pt")
    torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, bare)
    again = load_torch_state_dict(bare)
    assert set(again) == set(sd)
    assert detect_model(again) == "sam2.1_hiera_t"


def test_not_a_torch_file(tmp_path, capsys):
    p = tmp_path / "notes.pt"
    p.write_text("hello, not a checkpoint")
    rc, out = _run(["--checkpoint", str(p), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not a PyTorch checkpoint" in out and "notes.pt" in out


def test_truncated_file(sam2_tiny_pt, tmp_path, capsys):
    data = open(sam2_tiny_pt[1], "rb").read()
    p = tmp_path / "truncated.pt"
    p.write_bytes(data[: len(data) // 2])
    rc, out = _run(["--checkpoint", str(p), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "truncated" in out


def test_other_architecture(tmp_path, capsys):
    p = str(tmp_path / "resnet.pt")
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}}, p)
    rc, out = _run(["--checkpoint", p, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not a SAM 2 checkpoint" in out and "conv1.weight" in out


def test_missing_unexpected_misshaped_keys_named(sam2_tiny_pt, tmp_path, capsys):
    sd = load_torch_state_dict(sam2_tiny_pt[1])
    del sd["sam_mask_decoder.iou_token.weight"]
    del sd["memory_encoder.out_proj.weight"]
    sd["sam_mask_decoder.conv_s0.weight"] = np.zeros((31, 256, 1, 1), np.float32)
    sd["sam_mask_decoder.surprise.weight"] = np.zeros(3, np.float32)
    sd["totally_unknown"] = np.zeros(3, np.float32)
    p = str(tmp_path / "bad.pt")
    save_torch_state_dict(sd, p)
    rc, out = _run(["--checkpoint", p, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    for key in [
        "sam_mask_decoder.iou_token.weight",
        "sam_mask_decoder.conv_s0.weight",
        "sam_mask_decoder.surprise.weight",
        "totally_unknown",
    ]:
        assert key in out, key
    assert "(31, 256, 1, 1)" in out


def test_wrong_size_requested(sam2_tiny_pt, tmp_path, capsys):
    rc, out = _run(["--checkpoint", sam2_tiny_pt[1], "--out", str(tmp_path / "o"), "--model", "sam2.1_hiera_s"], capsys)
    assert rc == 2 and "missing keys" in out and "image_encoder.trunk.blocks.15" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "sam2_hiera_t",
        "sam2_hiera_s",
        "sam2_hiera_b+",
        "sam2_hiera_l",
        "sam2.1_hiera_s",
        "sam2.1_hiera_b+",
        "sam2.1_hiera_l",
    ],
)
def test_detect_every_size(name, tmp_path, capsys):
    model = build_torch_sam2(name)
    p = str(tmp_path / "m.pt")
    save_torch_state_dict(numpy_state_dict(model), p)
    rc, out = _run(["--checkpoint", p, "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, out
    assert f"detected {name}" in out
    rt = export_state_dict(str(tmp_path / "o"))
    orig = load_torch_state_dict(p)
    assert set(rt) == set(orig) and all(np.array_equal(rt[k], orig[k]) for k in orig)
