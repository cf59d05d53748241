"""The memory encoder's depthwise 7 x 7 convolution (256 channels): XLA's grouped convolution,
`layers.depthwise_conv` (what the model runs) and torch's Conv2d(groups=256), forward and
forward + backward (the gradient of a weighted sum w.r.t. input and kernel), at the shapes the
memory encoder sees: [objects, image/16, image/16, 256].

    python benchmarks/bench_depthwise.py [--repeats 20]

Times are medians of interleaved calls (common.time_interleaved). Writes
benchmarks/results/depthwise.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import time_interleaved, write  # noqa: E402
from safeclick_jax.models import layers  # noqa: E402

# (objects, side): 128 px training (2 and 24 objects), 512 px training (2 and 8) and inference (1), 1024 px inference
SHAPES = ((2, 8), (24, 8), (1, 32), (2, 32), (8, 32), (1, 64))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--name", default="depthwise")
    a = p.parse_args()
    c, k, pad = 256, 7, 3
    rng = np.random.default_rng(0)
    kernel = (0.1 * rng.standard_normal((k, k, 1, c))).astype(np.float32)
    tconv = torch.nn.Conv2d(c, c, k, padding=pad, groups=c, bias=False)
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
    rows = []
    for n, s in SHAPES:
        x = rng.standard_normal((n, s, s, c)).astype(np.float32)
        w = rng.standard_normal((n, s, s, c)).astype(np.float32)
        jx, jk, jw = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(w)
        fns = {"xla": layers._depthwise, "layer": layers.depthwise_conv}
        fwd = {name: jax.jit(lambda x_, k_, f=f: f(x_, k_, pad)) for name, f in fns.items()}
        grad = {
            name: jax.jit(jax.grad(lambda x_, k_, w_, f=f: jnp.sum(f(x_, k_, pad) * w_), argnums=(0, 1)))
            for name, f in fns.items()
        }
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous().requires_grad_()
        tw = torch.from_numpy(w.transpose(0, 3, 1, 2)).contiguous()

        def torch_grad():
            tx.grad = tconv.weight.grad = None
            (tconv(tx) * tw).sum().backward()

        timed = {
            **{f"{name} fwd": (lambda f=f: jax.block_until_ready(f(jx, jk))) for name, f in fwd.items()},
            **{f"{name} grad": (lambda f=f: jax.block_until_ready(f(jx, jk, jw))) for name, f in grad.items()},
            "torch fwd": lambda: tconv(tx.detach()),
            "torch grad": torch_grad,
        }
        r = time_interleaved(timed, a.repeats, settle_s=0.01)
        ms = {name: 1e3 * v["median_s"] for name, v in r.items()}
        # the layer's values against XLA's convolution (same inputs)
        y_err = float(jnp.abs(fwd["layer"](jx, jk) - fwd["xla"](jx, jk)).max())
        g_layer, g_xla = grad["layer"](jx, jk, jw), grad["xla"](jx, jk, jw)
        dk_rel = float(jnp.abs(g_layer[1] - g_xla[1]).max() / jnp.abs(g_xla[1]).max())
        row = {"shape": f"{n} x {s} x {s} x {c}", **{f"{name} ms": v for name, v in ms.items()}}
        row.update(out_max_abs=y_err, dk_max_rel=dk_rel)
        rows.append(row)
        print(row, flush=True)
    cols = ["shape"] + [f"{impl} {part} ms" for part in ("fwd", "grad") for impl in ("xla", "layer", "torch")]
    write(a.name, rows, cols + ["out_max_abs", "dk_max_rel"], {"repeats": a.repeats})


if __name__ == "__main__":
    main()
