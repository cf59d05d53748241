"""Timing helpers shared by the benchmark scripts: median of repeated runs after warm-up,
compile time (first call) reported separately, results written as JSON + markdown."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def time_fn(fn, repeats: int, warmup: int = 1) -> dict:
    """fn() must block until its result is ready. Returns first-call and steady-state seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def write(name: str, rows: list[dict], columns: list[str], meta: dict) -> str:
    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"machine": machine(), **meta, "rows": rows}, f, indent=2)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    m = machine()
    md = "\n".join(lines) + f"\n\nMachine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['jax_backend']}), " \
                            f"torch {m['torch']} ({m['torch_threads']} threads).\n"
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return md


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
