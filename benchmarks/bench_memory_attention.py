"""SAM 2's memory attention alone, JAX vs torch, same weights and inputs, same machine.

    python benchmarks/bench_memory_attention.py [--sizes 512,1024] [--memories 7] [--pointers 16]

One call of the 4-layer memory attention of every SAM 2 model (sam2/modeling/memory_attention.py)
for one object on one slice, as the interactive engine runs it for every slice it tracks: the
slice's (E x E) tokens attend to `--memories` memory frames of E x E 64-d tokens plus the object
pointers (4 tokens each). This is what a correction costs per slice at 1024 px. The torch module
is the one of `--model`'s SAM2VideoPredictor (common.torch_video_predictor: torch's init, seeded),
its weights loaded into the Flax module; fp32, eval mode; JAX and torch calls
alternate (common.time_interleaved), torch at 2 threads. The outputs are compared (rel error).
Writes benchmarks/results/memory_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--sizes", default="512,1024", help="model input sizes (tokens: size / 16 per side)")
    p.add_argument("--memories", type=int, default=7, help="memory frames attended to (num_maskmem)")
    p.add_argument("--pointers", type=int, default=16, help="object pointers (4 tokens each)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--name", default="memory_attention")
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from benchmarks.common import ratio, time_interleaved, torch_video_predictor, write
    from safeclick_jax.models.memory import MemoryAttention, MemoryConfig
    from safeclick_jax.models.weight_map import load_state_dict

    torch.set_num_threads(2)
    rows = []
    for size in (int(s) for s in a.sizes.split(",")):
        side = size // 16
        n, m = side * side, a.memories * side * side + 4 * a.pointers
        tm = torch_video_predictor(a.model, size).memory_attention
        ma = nnx.eval_shape(lambda: MemoryAttention(MemoryConfig(), nnx.Rngs(0)))
        load_state_dict(ma, {k: v.numpy() for k, v in tm.state_dict().items()}, where="torch MemoryAttention")
        rng = np.random.default_rng(0)
        curr, pos = (rng.standard_normal((1, n, 256)).astype(np.float32) for _ in range(2))
        mem, mpos = (rng.standard_normal((1, m, 64)).astype(np.float32) for _ in range(2))
        graph, state = nnx.split(ma)
        step = jax.jit(lambda st, *x: nnx.merge(graph, st)(*x, 4 * a.pointers))
        jx = [jnp.asarray(x) for x in (curr, pos, mem, mpos)]
        tx = [torch.from_numpy(x).transpose(0, 1) for x in (curr, mem, pos, mpos)]  # sequence first

        def run_jax():
            return np.asarray(step(state, *jx).block_until_ready())

        def run_torch():
            with torch.inference_mode():
                return tm(*tx, num_obj_ptr_tokens=4 * a.pointers).transpose(0, 1).numpy()

        got, want = run_jax(), run_torch()
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        t = time_interleaved({"jax": run_jax, "torch": run_torch}, a.repeats)
        row = {
            "size px": size,
            "queries": n,
            "keys": m,
            "JAX ms": 1000 * t["jax"]["median_s"],
            "torch ms": 1000 * t["torch"]["median_s"],
            "JAX / torch time": ratio(t["jax"], t["torch"]),
            "output rel err": rel,
        }
        print(row, flush=True)
        rows.append(row)
    print(write(a.name, rows, list(rows[0]), {"args": vars(a)}))


if __name__ == "__main__":
    main()
