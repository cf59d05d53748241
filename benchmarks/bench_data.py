"""Data throughput on this machine: prepare (ROIs/s) and the grain training pipeline (samples/s).

  python benchmarks/bench_data.py [--quick]

Writes benchmarks/results/data.json and data.md. Datasets: the synthetic CT-like set at two
sizes, and the real CT in tests/data/ct_small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_info, cpu_line  # noqa: E402
from safeclick_jax.data import pipeline, prepare, synthetic  # noqa: E402

CT_SMALL = REPO / "tests" / "data" / "ct_small"


def bench_prepare(name, root, out, workers):
    t = time.perf_counter()
    s = prepare.prepare_dataset(root, out, workers=workers, progress=False)
    dt = time.perf_counter() - t
    return {
        "dataset": name,
        "workers": workers,
        "volumes": s["volumes_ok"],
        "rois": s["rois_total"],
        "seconds": round(dt, 3),
        "rois_per_s": round(s["rois_total"] / dt, 1),
        "volumes_per_s": round(s["volumes_ok"] / dt, 2),
    }


def bench_pipeline(name, cache, image_size, batch_size, threads, batches):
    ds = pipeline.make_dataset(cache, "train", image_size=image_size, batch_size=batch_size, seed=0)
    it = pipeline.make_iterator(ds, num_threads=threads)
    next(it)  # warm-up: thread pool, memory maps, resize matrices
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    return {
        "dataset": name,
        "image_size": image_size,
        "batch_size": batch_size,
        "threads": threads,
        "batches": batches,
        "seconds": round(dt, 3),
        "samples_per_s": round(batches * batch_size / dt, 1),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer batches (smoke run)")
    a = p.parse_args()
    nb = 3 if a.quick else 12
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "lscpu": cpu_info(),
        },
        "prepare": [],
        "pipeline": [],
    }
    sets = {
        # default synthetic volumes: 48 x 48 x 16 at 2 x 2 x 5 mm
        "synthetic-small (20 vol, 48x48x16)": dict(num_volumes=20, shape=(48, 48, 16), spacing=(2.0, 2.0, 5.0)),
        # closer to a real CT's in-plane size: 192 x 192 x 32 at 1 x 1 x 4 mm -> 192 x 192 x 128
        "synthetic-large (6 vol, 192x192x32)": dict(num_volumes=6, shape=(192, 192, 32), spacing=(1.0, 1.0, 4.0)),
    }
    caches = {}
    for name, kw in sets.items():
        root = tmp / name.split()[0]
        synthetic.write_dataset(root, seed=0, **kw)
        for workers in (1, 2):
            caches[name] = tmp / f"cache-{name.split()[0]}-{workers}"
            results["prepare"].append(bench_prepare(name, root, caches[name], workers))
            print(results["prepare"][-1], flush=True)
    caches["ct_small (real CT, 122x101x30)"] = tmp / "cache-ct"
    results["prepare"].append(bench_prepare("ct_small (real CT, 122x101x30)", CT_SMALL, tmp / "cache-ct", 1))
    print(results["prepare"][-1], flush=True)

    for name in list(caches)[:2] + list(caches)[2:]:
        for size in (1024, 512):
            results["pipeline"].append(bench_pipeline(name, caches[name], size, 8, 2, nb))
            print(results["pipeline"][-1], flush=True)

    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Data throughput ({cpu_line()}, {results['machine']['cpus']} cores, {results['machine']['platform']})",
        "",
        "## prepare (NIfTI -> slice cache)",
        "",
        "| dataset | workers | volumes | ROIs | seconds | ROIs/s | volumes/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dataset']} | {r['workers']} | {r['volumes']} | {r['rois']} | {r['seconds']} | "
        f"{r['rois_per_s']} | {r['volumes_per_s']} |"
        for r in results["prepare"]
    ]
    lines += [
        "",
        "## grain training pipeline (prompt simulation + SAM 2 resize/normalise, batch 8, 2 threads)",
        "",
        "| cache | image size | samples/s | batches | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dataset']} | {r['image_size']} | {r['samples_per_s']} | {r['batches']} | {r['seconds']} |"
        for r in results["pipeline"]
    ]
    (out / "data.md").write_text("\n".join(lines) + "\n")
    print((out / "data.md").read_text())


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
