"""A training export is a complete SAM 2: the memory path is carried over from init.checkpoint, and
the reverse export (convert/flax_to_torch.py) loads into sam2's build_sam2 with every key."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.sam2_torch import config_path, numpy_state_dict, torch  # noqa: F401  (skips without torch)

ROOT = Path(__file__).resolve().parents[1]


# one short training run of SAM 2's decoder on a converted random sam2.1 tiny at 64 px (~1 min on 2 cores)
def test_export_of_a_sam2_run_loads_into_build_sam2(sam2_tiny_pt, sam2_tiny_dir, tmp_path):
    from sam2.build_sam import build_sam2

    from convert.flax_to_torch import main as export_main
    from convert.torch_io import load_torch_state_dict

    wd, data = tmp_path / "run", tmp_path / "data"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/sam2_t.py") + ":baseline",
        "--workdir", str(wd), f"--config.init.checkpoint={sam2_tiny_dir}", "--config.data.image_size=64",
        f"--config.data.roots=('{data / 'synth'}',)", f"--config.data.synthetic_root={data / 'synth'}",
        "--config.data.synthetic_kind=smoke", "--config.data.synthetic_volumes=5",
        f"--config.data.cache_dir={data / 'cache'}", "--config.train.total_steps=2", "--config.train.steps_per_epoch=2",
        "--config.data.batch_size=2", "--config.eval.max_rois=1", "--config.plot=False",
    ]  # fmt: skip
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"memory path: carried over from {sam2_tiny_dir}" in p.stdout

    out = str(tmp_path / "export.pt")
    assert export_main(["--model-dir", str(wd / "export"), "--out", out]) == 0
    exported = load_torch_state_dict(out)
    original = load_torch_state_dict(sam2_tiny_pt[1])
    assert set(exported) == set(original)  # a complete SAM 2: image path + memory path, nothing else
    memory = [k for k in original if k.startswith(("memory_", "obj_ptr", "mask_downsample", "maskmem", "no_obj"))]
    assert len(memory) > 50
    for k in memory + [k for k in original if k.startswith("image_encoder.")]:
        assert np.array_equal(exported[k], original[k]), k  # not trained: carried bit-exactly
    trained = [
        k for k in original if k.startswith("sam_mask_decoder.") and not np.array_equal(exported[k], original[k])
    ]
    assert len(trained) > 10  # the decoder did train

    model = build_sam2(config_path("sam2.1_hiera_t"), ckpt_path=out, device="cpu")  # strict: raises on any key
    got = numpy_state_dict(model)
    for k in ("sam_mask_decoder.iou_prediction_head.layers.0.weight", "memory_encoder.out_proj.weight"):
        np.testing.assert_array_equal(got[k], exported[k])
