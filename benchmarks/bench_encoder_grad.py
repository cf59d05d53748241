"""SAM 2's image encoder (Hiera trunk + FPN neck), JAX vs PyTorch on the same machine: forward, and
forward + backward with respect to every encoder parameter (what pretraining the encoder costs).

    python benchmarks/bench_encoder_grad.py [--cases 1024x1:fwd 128x8:grad 256x4:grad] [--repeats 5]

A case is SIZExBATCH:fwd|grad. fwd: the encoder's outputs, no gradient (torch under no_grad).
grad: the gradient of loss = sum over the FPN levels of mean(level^2), i.e. `jax.grad` through
`image_encoder(x)["backbone_fpn"]` against `loss.backward()` on torch's `backbone_fpn` (both with
scalp applied: the same three levels). JAX and torch calls alternate, each framework in a worker
process of its own (common.time_in_processes; JAX with the programs' host allocator, torch with
glibc's huge-page malloc); the ratio is the median of per-round JAX / torch times. Random weights
(torch's init, converted), fp32.
`--which jax` times JAX alone (for trying XLA flags in a separate process).
Writes benchmarks/results/encoder_grad[_NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import ratio, serve, time_fn, time_in_processes, time_interleaved, write  # noqa: E402
from convert.sam2_to_flax import convert_state_dict  # noqa: E402
from safeclick_jax.host_memory import glibc_env  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402


def parse_case(text: str) -> tuple[int, int, str]:
    try:
        shape, kind = text.split(":")
        size, batch = (int(v) for v in shape.split("x"))
    except ValueError:
        raise SystemExit(f"--cases {text!r}: expected SIZExBATCH:fwd or SIZExBATCH:grad, e.g. 128x8:grad")
    if kind not in ("fwd", "grad"):
        raise SystemExit(f"--cases {text!r}: the kind must be fwd or grad")
    return size, batch, kind


class Compiled:
    """A compiled JAX function bound to its arguments: calling it runs it and waits for the result."""

    def __init__(self, fn, *args, options: dict | None = None):
        self.args = args
        self.compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)

    def __call__(self):
        return jax.block_until_ready(self.compiled(*self.args))


def jax_fns(model, size: int, batch: int, options: dict | None = None, dtype=jnp.float32) -> tuple[Compiled, Compiled]:
    """(forward, gradient) of the JAX encoder, compiled with XLA `options` (DebugOptions fields),
    parameters and input cast to `dtype` (as train.compute_dtype does). Parameters are device
    arrays, as the predictors and the trainer hold them (numpy arrays would be copied in on every
    call)."""
    graphdef, params = nnx.split(model.image_encoder)
    params = jax.device_put(jax.tree.map(lambda v: v.astype(dtype), params))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32), dtype)

    def loss(p, x):
        fpn = nnx.merge(graphdef, p)(x)["backbone_fpn"]
        return sum(jnp.mean(f**2) for f in fpn)

    forward = Compiled(lambda p, x: nnx.merge(graphdef, p)(x)["backbone_fpn"], params, x, options=options)
    return forward, Compiled(jax.grad(loss), params, x, options=options)


def torch_fns(tmodel, size: int, batch: int):
    enc = tmodel.image_encoder
    x = torch.randn(batch, 3, size, size)

    def fwd():
        with torch.no_grad():
            return enc(x)["backbone_fpn"]

    def grad():
        enc.zero_grad(set_to_none=True)
        loss = sum((f**2).mean() for f in enc(x)["backbone_fpn"])
        loss.backward()

    return fwd, grad


def models(name: str, jax_too: bool = True):
    """(torch model, JAX model or None) with the same random weights (torch's init, seed 0)."""
    from sam2.build_sam import build_sam2

    version = name.split("_hiera_")[0]
    torch.manual_seed(0)
    tmodel = build_sam2(f"configs/{version}/{name}.yaml", ckpt_path=None, device="cpu")
    if not jax_too:
        return tmodel, None
    jmodel, _ = convert_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()}, get_config(name))
    return tmodel, jmodel


def worker(a) -> None:
    """One framework's function for one case, served to time_in_processes."""
    size, batch, kind = parse_case(a.cases[0])
    tmodel, jmodel = models(a.model, jax_too=a.worker == "jax")
    t0 = time.perf_counter()
    if a.worker == "jax":
        fn = jax_fns(jmodel, size, batch)[kind == "grad"]
    else:
        fn = torch_fns(tmodel, size, batch)[kind == "grad"]
    compile_s = time.perf_counter() - t0
    serve(fn, lambda: {"compile_s": compile_s})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--cases", nargs="+", default=["1024x1:fwd", "128x8:grad", "256x4:grad"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--which",
        choices=("both", "jax", "jax-bf16"),
        default="both",
        help="both: JAX vs torch (fp32); jax: JAX alone; jax-bf16: JAX fp32 vs JAX bf16 weights and activations",
    )
    p.add_argument("--name", default="", help="suffix of the result files (encoder_grad_NAME)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)  # time_in_processes' workers
    a = p.parse_args()
    if a.worker:
        return worker(a)
    cases = [parse_case(c) for c in a.cases]
    tmodel, jmodel = models(a.model) if a.which != "both" else (None, None)

    rows = []
    for text, (size, batch, kind) in zip(a.cases, cases):
        row = {"case": f"{size} px, batch {batch}, {'forward' if kind == 'fwd' else 'forward + backward'}"}
        if a.which == "both":
            cmd = [sys.executable, os.path.abspath(__file__), f"--model={a.model}", "--cases", text, "--worker"]
            r, rep = time_in_processes(
                {"jax": cmd + ["jax"], "torch": cmd + ["torch"]}, a.repeats, envs={"torch": glibc_env(os.environ)}
            )
            row.update(
                jax_ms=r["jax"]["median_s"] * 1e3,
                torch_ms=r["torch"]["median_s"] * 1e3,
                **{"jax/torch": ratio(r["jax"], r["torch"])},
                jax_compile_s=rep["jax"]["compile_s"],
            )
            print(row, flush=True)
            rows.append(row)
            continue
        t0 = time.perf_counter()
        jf = jax_fns(jmodel, size, batch)[kind == "grad"]
        compile_s = time.perf_counter() - t0
        if a.which == "jax":
            r = time_fn(jf, a.repeats)
            row.update(jax_ms=r["median_s"] * 1e3, jax_compile_s=compile_s)
        elif a.which == "jax-bf16":
            bf = jax_fns(jmodel, size, batch, dtype=jnp.bfloat16)[kind == "grad"]
            r = time_interleaved({"jax": jf, "bf16": bf}, a.repeats)
            row.update(
                jax_ms=r["jax"]["median_s"] * 1e3,
                jax_bf16_ms=r["bf16"]["median_s"] * 1e3,
                **{"bf16/fp32": ratio(r["bf16"], r["jax"])},
            )
        print(row, flush=True)
        rows.append(row)
    meta = {
        "model": a.model,
        "repeats": a.repeats,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "attention": os.environ.get("SAFECLICK_ATTENTION", ""),
    }
    cols = ["case", "jax_ms", "torch_ms", "jax/torch", "jax_compile_s"]
    if a.which == "jax-bf16":
        cols = ["case", "jax_ms", "jax_bf16_ms", "bf16/fp32"]
    write("encoder_grad" + (f"_{a.name}" if a.name else ""), rows, cols, meta)


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # JAX as the programs run; torch's workers get glibc_env (host_memory.py)
    main()
