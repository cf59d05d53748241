"""Where one full training step (bench_train_full.py's step: the whole model on a clip, loss,
gradients, AdamW) spends its time, by operation: XLA:CPU's per-thunk trace against torch.profiler
(the method of profile_encoder.py).

    python benchmarks/profile_train_full.py [--size 512] [--frames 4] [--objects 2] [--which both]

Prints, per framework, the top operations; for JAX also the time summed by the model function that
made each op.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench_train_full as b  # noqa: E402
from benchmarks.bench_encoder_grad import Compiled  # noqa: E402
from benchmarks.common import cpu_line  # noqa: E402
from benchmarks.profile_encoder import print_jax, print_torch, profile_jax, profile_torch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--corrections", type=int, default=7)
    p.add_argument("--which", choices=("jax", "torch", "both"), default="both")
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    tm = b.torch_model(a.model, a.size, a.corrections)
    images, masks, centres = b.clip(a.size, a.frames, a.objects)
    case = f"{a.model} {a.size} px, {a.frames} frames x {a.objects} objects, {a.corrections} corrections"
    print(f"{case}; {cpu_line()}\n")
    if a.which in ("jax", "both"):
        model, mem = b.jax_model(tm, a.model, a.size)
        step, state, rest = b.jax_step(model, mem, a.corrections, jnp.float32)
        plan = jax.tree.map(jnp.asarray, b.jax_plan(a.frames, a.objects, a.corrections, centres))
        fn = Compiled(step, state, rest, jnp.asarray(images), jnp.asarray(masks), plan, jax.random.key(0))
        rows, total = profile_jax(fn, a.calls)
        print_jax(rows, total, a.top, "step", "function", lambda where, kind: where.split(":")[0])
    if a.which in ("torch", "both"):
        tstep = b.torch_step(tm, a.corrections, "float32", "cpu")
        rows, total = profile_torch(lambda: tstep(images, masks), a.calls)
        print_torch(rows, total, a.top, "step")


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
