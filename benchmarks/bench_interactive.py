"""Interactive 3D session, JAX VolumePredictor vs torch SAM2VideoPredictor, same volume, same machine.

    python benchmarks/bench_interactive.py [--model sam2.1_hiera_t] [--sizes 512,1024] [--slices 48]

One object: a click on the middle slice and propagation forward and backward through every slice
(time to the first full 3D mask, from loading the slices), then corrective clicks on tracked
slices, each followed by a re-propagation from the corrected slice outwards through the whole
volume (propagate_in_video(start_frame_idx=t) both ways for torch). The JAX engine encodes every
slice once and re-uses the host-cached features for corrections; SAM2VideoPredictor keeps the
features of the last frame only and re-encodes. JAX's first session compiles every step (also
those of the corrections); it is reported apart ("cold"), and the comparison uses a second session
on the same volume (new feature cache, compiled steps). Every (framework, size) runs in its own
process, in turn, so the peak host memory (ru_maxrss) is each one's own. Random weights with the
object made present on every slice (speed does not depend on the weights).
Writes benchmarks/results/interactive.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_slices(path: str, n: int, hw: int) -> None:
    import numpy as np

    from safeclick_jax.data.preprocess import normalize_intensity, to_slices, to_uint8

    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, (hw, hw, n))
    xx, yy = np.mgrid[:hw, :hw]
    for z in range(n):
        r = hw / 5 * (1 - 0.5 * abs(z - n // 2) / n)
        vol[((xx - hw / 2) ** 2 + (yy - hw / 2) ** 2) < r**2, z] += 150
    np.save(path, to_slices(to_uint8(normalize_intensity(vol)), 2))


def plan(n: int, hw: int, corrections: int):
    mid = n // 2
    steps = [
        (mid + (c + 1) * max(n // (2 * corrections + 2), 1) * (-1) ** c, [[hw / 2 + 10.0, hw / 2]])
        for c in range(corrections)
    ]
    return mid, [[hw / 2, hw / 2]], steps


def run_jax(a, slices):
    import jax
    import numpy as np
    from flax import nnx

    from safeclick_jax.models.config import get_config
    from safeclick_jax.models.memory import MemoryConfig, SAM2Memory
    from safeclick_jax.models.sam2 import SAM2Image
    from safeclick_jax.volume_predictor import VolumePredictor

    cfg = get_config(a.model).replace(image_size=a.image_size)
    model = SAM2Image(cfg, nnx.Rngs(0))
    bias = model.sam_mask_decoder.pred_obj_score_head.layers[2].bias
    bias[...] = bias[...] + 20.0
    p = VolumePredictor(model, SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(1)), fill_hole_area=0)
    n, hw = slices.shape[0], slices.shape[1]
    mid, click, steps = plan(n, hw, a.corrections)
    vol = np.zeros((hw, hw, n), np.uint8)  # the grid; the slices are set below
    res = {}
    for session in ("cold", "warm"):  # the cold session compiles every step the warm one runs
        t0 = time.perf_counter()
        p.set_volume(vol, axis=2)
        p._slices = slices  # exactly the torch side's frames
        p.add_prompt(mid, points=click, labels=[1])
        lm = p.propagate()
        res[f"first_mask_{session}_s"] = time.perf_counter() - t0
        corr = []
        for t, pt in steps:
            t0 = time.perf_counter()
            p.add_prompt(t, points=pt, labels=[0])
            lm = p.propagate(start=t)
            corr.append(time.perf_counter() - t0)
        res[f"correction_{session}_s"] = corr
    res.update(
        correction_s=corr,
        foreground_voxels=int((lm > 0).sum()),
        cache=p.cache_info(),
        device=str(jax.devices()[0]),
    )
    return res


def run_torch(a, slices):
    import numpy as np
    import sam2.sam2_video_predictor as svp
    import torch
    import torch.nn.functional as F
    from sam2.build_sam import build_sam2_video_predictor

    version = a.model.split("_hiera_")[0]
    torch.manual_seed(0)
    tm = build_sam2_video_predictor(
        f"configs/{version}/{a.model}.yaml",
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={a.image_size}"],
    ).eval()
    with torch.no_grad():
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(20.0)
    tm.fill_hole_area = 0
    tm.add_all_frames_to_correct_as_cond = True
    n, hw = slices.shape[0], slices.shape[1]
    mid, click, steps = plan(n, hw, a.corrections)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def load(**kw):  # what load_video_frames does for an image folder, from the slice array
        x = torch.from_numpy(slices).float()[:, None].expand(-1, 3, -1, -1) / 255.0
        x = F.interpolate(x, (a.image_size, a.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - mean) / std, hw, hw

    svp.load_video_frames = load

    def propagate(state, start=None):
        masks = {}
        for rev in (False, True):
            for f, _, m in tm.propagate_in_video(state, start_frame_idx=start, reverse=rev):
                masks[f] = (m[0, 0] > 0).numpy()
        return masks

    res = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        state = tm.init_state(video_path="(slices)")
        tm.add_new_points_or_box(state, mid, 1, points=click, labels=[1])
        masks = propagate(state)
        res["first_mask_s"] = time.perf_counter() - t0
        corr = []
        for t, pt in steps:
            t0 = time.perf_counter()
            tm.add_new_points_or_box(state, t, 1, points=pt, labels=[0], clear_old_points=False)
            masks = propagate(state, start=t)
            corr.append(time.perf_counter() - t0)
    res.update(
        correction_s=corr,
        foreground_voxels=int(sum(int(np.sum(m)) for m in masks.values())),
        torch_threads=torch.get_num_threads(),
    )
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--sizes", default="512,1024", help="model input sizes (comma-separated)")
    p.add_argument("--slices", type=int, default=48)
    p.add_argument("--hw", type=int, default=256, help="slice height and width in voxels")
    p.add_argument("--corrections", type=int, default=2)
    p.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--slices-file", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.side:  # child process: one framework, one size
        import numpy as np

        slices = np.load(a.slices_file)
        res = (run_jax if a.side == "jax" else run_torch)(a, slices)
        res["peak_rss_gib"] = peak_rss_gib()
        print("RESULT " + json.dumps(res))
        return

    from benchmarks.common import write

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "slices.npy")
    make_slices(path, a.slices, a.hw)
    rows, raw = [], {}
    for size in [int(s) for s in a.sizes.split(",")]:
        out = {}
        for side in ("jax", "torch"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--image-size",
                str(size),
                "--slices-file",
                path,
                "--model",
                a.model,
                "--corrections",
                str(a.corrections),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} @ {size} px failed:\n{proc.stderr[-3000:]}")
            out[side] = json.loads(line[-1][len("RESULT ") :])
            print(side, size, out[side], flush=True)
        raw[size] = out
        j, t = out["jax"], out["torch"]
        jc, tc = sum(j["correction_s"]) / len(j["correction_s"]), sum(t["correction_s"]) / len(t["correction_s"])
        rows.append(
            {
                "setting": f"{a.model} @ {size} px, {a.slices} slices of {a.hw}x{a.hw}",
                "first mask jax s (warm)": j["first_mask_warm_s"],
                "first mask jax s (cold, compiles)": j["first_mask_cold_s"],
                "first mask torch s": t["first_mask_s"],
                "first mask torch/jax": t["first_mask_s"] / j["first_mask_warm_s"],
                "correction jax s": jc,
                "correction torch s": tc,
                "correction torch/jax": tc / jc,
                "peak RSS jax GiB": j["peak_rss_gib"],
                "peak RSS torch GiB": t["peak_rss_gib"],
                "feature cache MiB": j["cache"]["cached_bytes"] / 2**20,
                "bytes per slice": j["cache"]["bytes_per_slice"],
            }
        )
    write(
        "interactive",
        rows,
        list(rows[0]),
        {
            "slices": a.slices,
            "hw": a.hw,
            "corrections": a.corrections,
            "raw": raw,
            "note": "one run; each framework and size in its own process, in turn; machine shared with other jobs",
        },
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import use_huge_pages

    use_huge_pages()  # as train.py and bench_volume.py, for both frameworks
    main()
