"""Device memory of the compiled SafeClick train step (cached features, SAM 2 loss), by attention
path and precision, from XLA's buffer assignment (memory_analysis: arguments + outputs +
temporaries - donated aliases). Compiles only, runs nothing, so it works at 1024 px on a CPU.

    python benchmarks/step_memory.py [--image-size 1024] [--batch 8]

On the CPU backend the numbers are the CPU compiler's; the one-shot fp32 figure (13.9 GB at
1024 px, batch 8) equals what the same step needed on an H200 (13.9 GB), so the buffer assignment
carries over at least there. Attention paths: `full` = one-shot (the GPU/TPU default),
`chunked` = pieces of <= 2^20 scores (the CPU default), `chunked 2^26` = 64M-score pieces (a
GPU-sized setting: 16 pieces for SafeClick's E1/E2 at 1024 px). Writes step_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_train import _batch  # noqa: E402
from common import write  # noqa: E402

from configs import common  # noqa: E402
from safeclick_jax import parallel  # noqa: E402
from safeclick_jax.models.sam2 import encode_image  # noqa: E402
from safeclick_jax.training import model_init  # noqa: E402
from safeclick_jax.training import step as step_lib  # noqa: E402
from safeclick_jax.training import train_state as ts  # noqa: E402

VARIANTS = (("full", None), ("chunked", None), ("chunked", 1 << 26))


def step_mb(size, batch, dtype, mode, max_scores) -> dict:
    config = common.make("sam2.1_hiera_t")
    # build_model configures the attention each compile below uses
    config.model.attention, config.model.attention_max_scores = mode, max_scores or -1
    config.data.image_size, config.data.batch_size, config.train.compute_dtype = size, batch, dtype
    mesh = parallel.make_mesh()
    model = model_init.build_model(config, size, log=lambda *a: None)
    keep = model.keep_block
    raw = _batch(size, batch)
    graphdef, params, frozen = ts.split_model(model, config)
    shapes = jax.eval_shape(lambda m, x: encode_image(m, x, keep_block=keep), model, raw["image"])
    rng = np.random.default_rng(0)
    f = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float16), shapes)
    b = step_lib.host_batch(raw, cache=None)
    b.pop("image")
    b.update(
        {
            "feat_image_embed": f["image_embed"],
            "feat_high_res_0": f["high_res_feats"][0],
            "feat_high_res_1": f["high_res_feats"][1],
            "feat_block": f["block"],
        }
    )
    opt = ts.make_optimizer(config, 1000)
    state = ts.init_state(params, opt, 0)
    fn = step_lib.make_train_step(graphdef, opt, ts.learning_rate(config, 1000), config, mesh, keep)
    t0 = time.perf_counter()
    ma = fn.lower(state, frozen, parallel.global_batch(b, mesh)).compile().memory_analysis()
    mb = lambda n: n / 2**20
    return {
        "attention": mode + (f" 2^{max_scores.bit_length() - 1}" if max_scores else ""),
        "dtype": dtype,
        "step_mb": mb(
            ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
        ),
        "temp_mb": mb(ma.temp_size_in_bytes),
        "arguments_mb": mb(ma.argument_size_in_bytes),
        "compile_s": time.perf_counter() - t0,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        for mode, max_scores in VARIANTS:
            rows.append(step_mb(a.image_size, a.batch, dtype, mode, max_scores))
            print(rows[-1], flush=True)
    write(
        "step_memory",
        rows,
        ["attention", "dtype", "step_mb", "temp_mb", "arguments_mb", "compile_s"],
        {"image_size": a.image_size, "batch": a.batch, "backend": jax.default_backend()},
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
