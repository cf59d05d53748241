"""Is XLA:CPU's oneDNN dot path (the only route from jaxlib to oneDNN's AMX kernels) correct? Small
programs compiled with `--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot`
(as compile options) against the same programs compiled by default, each in a subprocess of its own
(a failing oneDNN partition compile aborts the process).

    python benchmarks/onednn_check.py [--name onednn_check]
    ONEDNN_DEFAULT_FPMATH_MODE=BF16 python benchmarks/onednn_check.py --name onednn_check_bf16

The cases are the patterns SAM 2 has: a plain dot, a dot whose result is scaled per row (attention's
normalisation, (e @ v) / sum(e)) below and above a contraction of 512, a dot plus a per-row bias, a
weight's gradient summed over two uses (two dots added), and the decoder's token-to-image attention
at 512 px (14 queries x 1024 keys). A case passes when its relative L2 error is within the
tolerance (1e-5; 2e-2 with ONEDNN_DEFAULT_FPMATH_MODE=BF16, bf16's rounding). Writes
benchmarks/results/NAME.{json,md} ($BENCH_RESULTS overrides the folder).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ONEDNN_DOTS, write  # noqa: E402

CASES = {  # name: (description, shapes of the arguments)
    "dot": ("x @ y, 256 x 1024 @ 1024 x 256", [(256, 1024), (1024, 256)]),
    "scaled_k512": ("(x @ y) * s, s per row, contraction 512", [(64, 512), (512, 64), (64, 1)]),
    "scaled_k1024": ("(x @ y) * s, s per row, contraction 1024", [(64, 1024), (1024, 64), (64, 1)]),
    "bias_k1024": ("(x @ y) + b, b per row, contraction 1024", [(64, 1024), (1024, 64), (64, 1)]),
    "two_dots": ("x1 @ y1 + x2 @ y2 (a weight used twice: its gradient)", [(64, 32), (32, 48), (64, 32), (32, 48)]),
    "attention": (
        "SAM 2 decoder attention, 8 x 8 heads, 14 queries x 1024 keys",
        [(8, 8, 14, 16), (8, 8, 1024, 16), (8, 8, 1024, 16)],
    ),
}


def program(name: str):
    import jax.numpy as jnp

    from safeclick_jax.models.attention import dot_product_attention

    if name.startswith("scaled"):
        return lambda x, y, s: (x @ y) * s
    if name == "bias_k1024":
        return lambda x, y, b: (x @ y) + b
    if name == "two_dots":
        return lambda a, b, c, d: a @ b + c @ d
    if name == "attention":
        return lambda q, k, v: dot_product_attention(q, k, v, chunk_queries=False)
    return jnp.matmul


def run_case(name: str) -> None:
    """In the subprocess: print the relative error of the oneDNN build against the default one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in CASES[name][1]]
    fn = jax.jit(program(name))
    ref = fn(*args)
    got = fn.lower(*args).compile(compiler_options=ONEDNN_DOTS)(*args)
    print("REL", float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="onednn_check")
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # the subprocess
    a = p.parse_args()
    if a.case:
        return run_case(a.case)
    fpmath = os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "STRICT").upper()
    tol = 2e-2 if fpmath == "BF16" else 1e-5
    rows = []
    for name, (what, _) in CASES.items():
        r = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True)
        rel = next((float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("REL ")), None)
        if r.returncode < 0:
            result = f"aborted ({signal.Signals(-r.returncode).name})"
        elif r.returncode or rel is None:
            result = f"failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
        else:
            result = f"rel {rel:.2e}"
        rows.append({"case": name, "program": what, "result": result, "ok": rel is not None and rel <= tol})
        print(rows[-1], flush=True)
    write(a.name, rows, ["case", "program", "result", "ok"], {"fpmath": fpmath, "tolerance": tol})
    failed = [r["case"] for r in rows if not r["ok"]]
    print(f"oneDNN dots: {'correct' if not failed else 'NOT usable, failing: ' + ', '.join(failed)}")


if __name__ == "__main__":
    main()
