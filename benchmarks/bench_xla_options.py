"""XLA:CPU compiler options on SAM 2's image encoder: each option set against the default, in one
process, calls alternating (common.time_interleaved), JAX only.

    python benchmarks/bench_xla_options.py [--cases 128x8:grad 1024x1:fwd] [--repeats 3]

Options are DebugOptions fields passed to `compile(compiler_options=...)`, the same fields as the
XLA_FLAGS of the same name (the list below is what jaxlib's libjax_common.so has; `strings` on it
lists the xla_cpu_* flags). Writes benchmarks/results/xla_options.{json,md} (--name).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_encoder_grad import jax_fns, models, parse_case  # noqa: E402
from benchmarks.common import ONEDNN_DOTS, ratio, time_interleaved, write  # noqa: E402

DOT_ELTWISE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"  # XLA_FLAGS spells it dot,eltwise
VARIANTS = {
    "YNNPACK off (Eigen / XLA dots)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "YNNPACK dots only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "YNNPACK individual dots": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "fast math": {"xla_cpu_enable_fast_math": True},
    "XNNPACK graph fusion greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "oneDNN": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True},
    # oneDNN's graph API for dots (and their elementwise neighbours): float32 dots as brgemm kernels;
    # with ONEDNN_DEFAULT_FPMATH_MODE=BF16 in the environment they may run as bf16 where the CPU has AMX.
    "oneDNN dots": ONEDNN_DOTS,
    "oneDNN dot+eltwise": {**ONEDNN_DOTS, "xla_cpu_experimental_onednn_fusion_type": DOT_ELTWISE},
    "prefer 512-bit vectors": {"xla_cpu_prefer_vector_width": 512},
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--cases", nargs="+", default=["128x8:grad", "1024x1:fwd"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="xla_options", help="result files benchmarks/results/NAME.{json,md}")
    a = p.parse_args()
    jmodel = models(a.model)[1]
    rows = []
    for text in a.cases:
        size, batch, kind = parse_case(text)
        fns = {"default": jax_fns(jmodel, size, batch)[kind == "grad"]}
        for name in a.variants:
            try:
                fns[name] = jax_fns(jmodel, size, batch, VARIANTS[name])[kind == "grad"]
            except Exception as e:  # an option this jaxlib rejects: report it, time the rest
                rows.append({"case": text, "options": name, "note": f"{type(e).__name__}: {str(e)[:80]}"})
        r = time_interleaved(fns, a.repeats)
        for name in fns:
            rows.append(
                {
                    "case": text,
                    "options": name,
                    "ms": r[name]["median_s"] * 1e3,
                    "time / default": ratio(r[name], r["default"]),
                }
            )
            print(rows[-1], flush=True)
    meta = {"repeats": a.repeats, "onednn_fpmath": os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "")}
    write(a.name, rows, ["case", "options", "ms", "time / default", "note"], meta)


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
