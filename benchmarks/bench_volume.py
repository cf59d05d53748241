"""Volume propagation, JAX VolumePredictor vs the torch SAM2VideoPredictor, same volume, same machine.

    python benchmarks/bench_volume.py [--model sam2.1_hiera_t] [--image-size 512] [--slices 12]

One click on the middle slice, then propagation forward and backward through every slice (image
encoder + memory attention + decoder + memory encoder per slice). JAX is timed on the propagate()
of a second session on the same volume (the first one compiles; the compile time is reported
separately); torch on its propagate_in_video (both directions), eager fp32. Random weights (speed
does not depend on them).
Writes benchmarks/results/volume.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import torch_device, torch_frames, torch_video_predictor, write  # noqa: E402
from convert.sam2_to_flax import convert_state_dict  # noqa: E402
from safeclick_jax.inference import VolumePredictor  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402
from safeclick_jax.models.memory import SAM2Memory  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--hw", type=int, default=256, help="slice height and width in voxels")
    a = p.parse_args()

    import sam2.sam2_video_predictor as svp

    tm = torch_video_predictor(a.model, a.image_size)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    cfg = get_config(a.model).replace(image_size=a.image_size)
    model, extra = convert_state_dict(sd, cfg)
    jp = VolumePredictor(model, SAM2Memory.from_extra(cfg, extra), fill_hole_area=0)

    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, (a.hw, a.hw, a.slices))
    xx, yy = np.mgrid[: a.hw, : a.hw]
    vol[((xx - a.hw / 2) ** 2 + (yy - a.hw / 2) ** 2) < (a.hw / 5) ** 2] += 150
    mid = a.slices // 2
    click = [[a.hw / 2, a.hw / 2]]
    tracked = a.slices - 1

    times = []
    # The first session compiles. The second sets the volume again, so every slice is encoded again
    # as torch encodes it (a second propagate() on the same session would find nothing changed, and
    # one from a given start would read the cached features), with every step compiled.
    for _ in range(2):
        jp.set_volume(vol, axis=2)
        jp.add_prompt(mid, points=click, labels=[1])
        t0 = time.perf_counter()
        jp.propagate()
        times.append(time.perf_counter() - t0)
    first, jax_s = times

    device = torch_device()
    tm = tm.to(device)
    frames = torch_frames(np.array(jp.slices), a.image_size).to(device)
    svp.load_video_frames = lambda **kw: (frames, a.hw, a.hw)
    with torch.inference_mode():
        state = tm.init_state(video_path="(frames)")
        tm.add_new_points_or_box(state, mid, 1, points=click, labels=[1])
        t0 = time.perf_counter()
        for rev in (False, True):
            for _ in tm.propagate_in_video(state, reverse=rev):
                pass
        if device == "cuda":
            torch.cuda.synchronize()
        torch_s = time.perf_counter() - t0

    rows = [
        {
            "stage": f"propagation, {a.slices} slices of {a.hw}x{a.hw} ({tracked} tracked), "
            f"{a.model} @ {a.image_size} px",
            "jax_slices_per_s": tracked / jax_s,
            "torch_slices_per_s": tracked / torch_s,
            "jax/torch speed": torch_s / jax_s,
            "jax_compile_s": first - jax_s,
        }
    ]
    write(
        "volume",
        rows,
        ["stage", "jax_slices_per_s", "torch_slices_per_s", "jax/torch speed", "jax_compile_s"],
        {
            "model": a.model,
            "image_size": a.image_size,
            "slices": a.slices,
            "hw": a.hw,
            "jax_device": str(jax.devices()[0]),
            "note": "one run; machine shared with other jobs",
        },
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
