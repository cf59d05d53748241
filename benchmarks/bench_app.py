"""Latency of the web app's API on the demo model and example volume (what the page waits for).

    python benchmarks/bench_app.py [--checkpoint workdir/sam2_t/export] [--out benchmarks/results/app]

Times, through FastAPI's test client (the HTTP layer in-process): the model load and compile
(warm_up), opening the example volume, the first click (sent right after the volume opened,
while the server encodes its slices in the background), a second click on another slice, a
third click on the first slice, the first propagation, a correction click after it and the
second propagation. Writes OUT.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="workdir/sam2_t/export")
    p.add_argument("--out", default="benchmarks/results/app")
    a = p.parse_args(argv)
    from fastapi.testclient import TestClient

    from benchmarks.common import cpu_info, cpu_line
    from demo import example_case, example_volume
    from safeclick_jax.app.server import create_app, engine_factory

    rows = {}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    factory = engine_factory(a.checkpoint, untrained_memory=True)
    rows["load model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    factory.warm_up(lambda m: None)
    rows["compile (warm-up)"] = time.perf_counter() - t0
    data = Path(tempfile.mkdtemp())
    path = example_volume(data)
    _, labels, _ = example_case()
    k = labels.shape[2] // 2
    ii, jj = np.nonzero(labels[:, :, k] == 1)
    with TestClient(create_app(factory, data)) as c:

        def timed(name, method, url, **kw):
            t = time.perf_counter()
            r = getattr(c, method)(url, **kw)
            assert r.status_code == 200, r.text
            rows[name] = time.perf_counter() - t
            return r.json()

        v = timed("open volume", "post", "/api/volumes", json={"path": path.name})
        sid = v["id"]
        mid = [int(np.median(ii)), int(np.median(jj)), k]
        prompts = f"/api/volumes/{sid}/prompts"
        timed("first click", "post", prompts, json={"object": 1, "voxel": mid, "label": 1})
        second = [mid[0], mid[1], k + 2]
        timed("second click (another slice)", "post", prompts, json={"object": 1, "voxel": second, "label": 1})
        timed("third click (first slice again)", "post", prompts, json={"object": 1, "voxel": mid, "label": 1})
        timed("first propagation", "post", f"/api/volumes/{sid}/propagate", json={"object": 1})
        other = [mid[0], mid[1], max(0, k - 3)]
        timed("click after propagation", "post", f"/api/volumes/{sid}/prompts", json={"object": 1, "voxel": other})
        timed("second propagation", "post", f"/api/volumes/{sid}/propagate", json={"object": 1})
    result = {
        "checkpoint": a.checkpoint,
        "volume": f"{path.name} {v['shape']}",
        "lscpu": cpu_info(),
        "machine": f"{cpu_line()}, {os.cpu_count()} cores, "
        f"load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} at the end",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": {k: round(s, 3) for k, s in rows.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=2))
    md = [
        f"# Web app latency ({result['date']}, {result['machine']})",
        "",
        f"model {a.checkpoint}, volume {result['volume']}",
        "",
    ]
    md += ["| step | seconds |", "|---|---|"] + [f"| {k} | {s:.2f} |" for k, s in rows.items()]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
