"""Square matmul throughput, XLA:CPU vs torch, fp32 and bf16 (what a bf16 model could gain on this CPU).

    python benchmarks/bench_matmul.py [--n 4096] [--repeats 5]

bf16: both inputs bf16; JAX accumulates in fp32 and returns fp32 (preferred_element_type), torch
returns bf16 (oneDNN accumulates in fp32). XLA_FLAGS applies to the JAX side (try library flags).
GFLOP/s = 2 n^3 / median time. Writes benchmarks/results/matmul.{json,md}.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="matmul")
    a = p.parse_args()
    n = a.n
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    rows = []
    for dtype in ("float32", "bfloat16"):
        jx, jy = (jnp.asarray(v, dtype) for v in (x, y))
        tx, ty = (torch.from_numpy(v).to(getattr(torch, dtype)) for v in (x, y))
        mm = jax.jit(lambda u, v: jnp.matmul(u, v, preferred_element_type=jnp.float32))
        r = time_interleaved(
            {"jax": lambda: mm(jx, jy).block_until_ready(), "torch": lambda: torch.mm(tx, ty)}, a.repeats
        )
        flop = 2 * n**3
        rows.append(
            {
                "dtype": dtype,
                "n": n,
                "jax_gflops": flop / r["jax"]["median_s"] / 1e9,
                "torch_gflops": flop / r["torch"]["median_s"] / 1e9,
            }
        )
        print(rows[-1], flush=True)
    meta = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "repeats": a.repeats}
    write(a.name, rows, ["dtype", "n", "jax_gflops", "torch_gflops"], meta)


if __name__ == "__main__":
    main()
