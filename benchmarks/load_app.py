"""A bounded load test of the web app on loopback: a real server process, SESSIONS clients clicking
and propagating concurrently for SECONDS, then BAD bad requests; then the server is killed with
SIGKILL, restarted on the same state folder, and every session's label map compared with the
one it had.

    python benchmarks/load_app.py [--checkpoint DIR] [--sessions 8] [--seconds 60] [--bad 50]
        [--out benchmarks/results/load_app]

Targets (issue 25): no 5xx answer, no state lost (every label map equal after the restart),
every bad request answered 4xx; reported: the p50 / p95 / max click latency (round trip).
Without --checkpoint a random SAM 2.1 tiny at 128 px is made (torch and sam2 needed), on a
synthetic 64 x 64 x 16 CT; model calls run one at a time, so a click waits behind the others'
propagations: the latency measured is the one a team sharing one CPU server sees.
Writes OUT.json / OUT.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package
KEY = "load-test-key-0123456789"


def random_model(out: Path) -> str:
    """A random SAM 2.1 tiny at 128 px (as the app's tests use), converted to a model directory."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from convert.sam2_to_flax import main as convert_main
    from convert.torch_io import save_torch_state_dict
    from tests.sam2_torch import config_path, numpy_state_dict

    torch.manual_seed(0)
    tm = build_sam2_video_predictor(
        config_path("sam2.1_hiera_t"), ckpt_path=None, device="cpu", hydra_overrides_extra=["++model.image_size=128"]
    )
    with torch.no_grad():  # a click gives a non-empty mask
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(20.0)
    save_torch_state_dict(numpy_state_dict(tm), str(out / "model.pt"))
    assert convert_main(["--checkpoint", str(out / "model.pt"), "--out", str(out / "ckpt"), "--image-size", "128"]) == 0
    return str(out / "ckpt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m safeclick_jax.app` in a subprocess, with an API key."""

    def __init__(self, checkpoint, data, state, work: Path, sessions: int, untrained_memory: bool):
        (work / "key").write_text(KEY)
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "safeclick_jax.app", "--checkpoint", checkpoint, "--data-dir", str(data)]
        self.cmd += ["--state-dir", str(state), "--port", str(self.port), "--max-sessions", str(sessions)]
        self.cmd += ["--api-key-file", str(work / "key"), "--compilation-cache", str(work / "xla")]
        self.cmd += ["--untrained-memory"] if untrained_memory else []
        self.log = work / "server.log"
        self.proc = None

    def start(self, http):
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 600:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited; see {self.log}")
            try:
                if http.get("/api/health").json()["state"] == "ready":
                    return time.perf_counter() - t0
            except Exception:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready in 600 s")

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def labels(http, sid) -> np.ndarray:
    import nibabel as nib

    r = http.get(f"/api/volumes/{sid}/labels.nii.gz")
    r.raise_for_status()
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.content)).dataobj)


def client_loop(http, name, inside, deadline, seed, out):
    """One user: opens the volume, then clicks (a propagation every 5th action) until the deadline."""
    rng = random.Random(seed)
    rec = {"clicks": [], "propagations": [], "statuses": {}, "errors": []}
    out.append(rec)

    def call(method, url, **kw):
        r = http.request(method, url, **kw)
        rec["statuses"][r.status_code] = rec["statuses"].get(r.status_code, 0) + 1
        if r.status_code >= 400:
            rec["errors"].append(f"{method} {url}: {r.status_code} {r.text[:200]}")
        return r

    r = call("POST", "/api/volumes", json={"path": name})
    if r.status_code != 200:
        return
    rec["id"] = sid = r.json()["id"]
    n = 0
    while time.perf_counter() < deadline:
        n += 1
        if n % 5 == 0:
            t = time.perf_counter()
            if call("POST", f"/api/volumes/{sid}/propagate", json={}).status_code == 200:
                rec["propagations"].append(time.perf_counter() - t)
        else:
            i, j, k = inside[rng.randrange(len(inside))]
            t = time.perf_counter()
            body = {"object": 1 + n % 2, "voxel": [int(i), int(j), int(k)], "label": int(n % 7 != 3)}
            if call("POST", f"/api/volumes/{sid}/prompts", json=body).status_code == 200:
                rec["clicks"].append(time.perf_counter() - t)


def bad_requests(http, sid, n: int) -> dict:
    """n bad requests of several kinds -> {status: count}."""
    kinds = [
        ("GET", "/api/volumes/never-existed", {}),
        ("POST", "/api/volumes/never-existed/undo", {}),
        ("POST", f"/api/volumes/{sid}/prompts", {"json": {"voxel": [1.5, 1, 1]}}),
        ("POST", f"/api/volumes/{sid}/prompts", {"json": {"voxel": [99999, 0, 0]}}),
        ("POST", f"/api/volumes/{sid}/prompts", {"content": b'{"voxel": [NaN, 1, 1]}'}),
        ("POST", f"/api/volumes/{sid}/prompts", {"json": {"object": 0, "voxel": [1, 1, 1]}}),
        ("POST", "/api/volumes", {"json": {"path": "../etc/passwd"}}),
        ("POST", "/api/volumes", {"json": {"path": "bomb.nii.gz"}}),
        ("POST", "/api/volumes", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("GET", "/api/files", {"headers": {"authorization": "Bearer wrong"}}),
        ("GET", "/api/files", {"headers": {"authorization": ""}}),
        ("PATCH", f"/api/volumes/{sid}/objects/77", {"json": {"name": "x"}}),
    ]
    out = {}
    for i in range(n):
        method, url, kw = kinds[i % len(kinds)]
        kw = dict(kw)
        if "content" in kw and "headers" not in kw:
            kw["headers"] = {"content-type": "application/json"}
        r = http.request(method, url, **kw)
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model directory (default: a random SAM 2.1 tiny, 128 px)")
    p.add_argument("--untrained-memory", action="store_true", help="passed on to the app (the demo model)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--bad", type=int, default=50)
    p.add_argument("--shape", default="64,64,16", help="the synthetic CT's shape")
    p.add_argument("--out", default="benchmarks/results/load_app")
    a = p.parse_args(argv)
    import httpx
    import nibabel as nib

    from safeclick_jax.data.synthetic import make_volume
    from tests.test_volume_file import bomb

    work = Path(tempfile.mkdtemp(prefix="load_app_"))
    data, state = work / "data", work / "state"
    data.mkdir()
    image, truth, affine = make_volume(0, shape=tuple(int(v) for v in a.shape.split(",")))
    nib.save(nib.Nifti1Image(image, affine), str(data / "ct.nii.gz"))
    bomb(data / "bomb.nii.gz", (1500, 1500, 1500))
    inside = np.argwhere(truth > 0)
    checkpoint = a.checkpoint or random_model(work)
    server = Server(checkpoint, data, state, work, a.sessions, a.untrained_memory)
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{server.port}", timeout=600, headers={"authorization": f"Bearer {KEY}"}
    )
    load_before = os.getloadavg()[0]
    start_s = server.start(http)
    recs: list = []
    deadline = time.perf_counter() + a.seconds
    threads = [
        threading.Thread(target=client_loop, args=(http, "ct.nii.gz", inside, deadline, i, recs))
        for i in range(a.sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sids = [r["id"] for r in recs if "id" in r]
    bad = bad_requests(http, sids[0], a.bad)
    before = {sid: labels(http, sid) for sid in sids}
    server.kill9()
    restart_s = server.start(http)
    after = {sid: labels(http, sid) for sid in sids}
    lost = [sid for sid in sids if not np.array_equal(before[sid], after[sid])]
    server.kill9()
    statuses: dict = {}
    for r in recs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    clicks = [x for r in recs for x in r["clicks"]]
    props = [x for r in recs for x in r["propagations"]]
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": round(load_before, 2),
        "sessions": a.sessions,
        "seconds": a.seconds,
        "volume": list(image.shape),
        "model": a.checkpoint or "random sam2.1 tiny, 128 px",
        "server_start_s": round(start_s, 1),
        "restart_after_kill9_s": round(restart_s, 1),
        "clicks": len(clicks),
        "click_p50_s": round(pct(clicks, 50), 3),
        "click_p95_s": round(pct(clicks, 95), 3),
        "click_max_s": round(max(clicks, default=float("nan")), 3),
        "propagations": len(props),
        "propagation_p50_s": round(pct(props, 50), 3),
        "load_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "bad_statuses": {str(k): v for k, v in sorted(bad.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500) + sum(v for k, v in bad.items() if k >= 500),
        "sessions_lost": len(lost),
        "label_maps_nonempty": sum(bool(x.any()) for x in before.values()),
    }
    errs = [e for r in recs for e in r["errors"]][:5]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**res, "first_errors": errs}, indent=1))
    md = [f"| {k} | {v} |" for k, v in res.items()]
    out.with_suffix(".md").write_text("| quantity | value |\n|---|---|\n" + "\n".join(md) + "\n")
    print(json.dumps(res, indent=1))
    if errs:
        print("first errors:", *errs, sep="\n  ")
    ok = (
        res["errors_5xx"] == 0
        and not lost
        and all(400 <= k < 500 for k in bad)
        and len(sids) == a.sessions
        and all(k < 500 for k in statuses)
    )
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
