"""The local web app: `python -m safeclick_jax.app [--checkpoint DIR] [--data-dir DIR] [--host H] [--port P]`.

With no --checkpoint it serves the demo: the model `make train` exports (workdir/sam2_t/export,
trained first when absent) and a synthetic abdominal CT (`example_case`) in the data folder. Open
the printed URL in a browser (over SSH: `ssh -L 8000:127.0.0.1:8000 server`, then localhost:8000).
See docs/app.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib

from safeclick_jax import compile_cache

REPO = Path(__file__).resolve().parents[2]
DEMO_WORKDIR = REPO / "workdir" / "sam2_t"
DEMO_DATA = REPO / "workdir" / "app_data"


# The example volume: synthetic abdomen number 15 of seed 0 (safeclick_jax.data.synthetic_abdomen),
# the generator and seed of `make train`'s data, one past the 15 volumes it trains, validates and
# tests on, so the demo model has never seen it.
EXAMPLE_SEED = 15


def example_case():
    """(image int16 HU, labels uint8, affine) of the example volume."""
    from safeclick_jax.data.synthetic_abdomen import make_volume

    return make_volume(EXAMPLE_SEED)


def example_volume(out_dir: Path) -> Path:
    """Writes the example volume (`example_case`) into out_dir once; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "synthetic_abdomen_015.nii.gz"
    if not path.exists():
        image, _, affine = example_case()
        nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def demo_checkpoint() -> Path:
    """The model `make train` exports; trained first when absent."""
    export = DEMO_WORKDIR / "export"
    if not (export / "model.json").exists():
        print(
            f"no trained model in {export}: training the demo model first "
            "(python train.py --config configs/sam2_t.py, about 2 minutes on 2 CPU cores)...",
            flush=True,
        )
        cmd = [sys.executable, "train.py", "--config", "configs/sam2_t.py", "--workdir", str(DEMO_WORKDIR)]
        if subprocess.call(cmd, cwd=REPO) != 0 or not (export / "model.json").exists():
            raise SystemExit(f"error: training the demo model failed; run `{' '.join(cmd)}` to see why")
    return export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m safeclick_jax.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", default=None, help="model directory (default: the demo model of `make train`)")
    p.add_argument("--memory-checkpoint", default=None, help="model directory to take SAM 2's memory path from")
    p.add_argument("--data-dir", default=None, help=f"folder of volumes the page may open (default: {DEMO_DATA})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted (default 1024)")
    p.add_argument("--idle-minutes", type=float, default=30.0, help="a session idle this long is freed (default 30)")
    p.add_argument(
        "--compilation-cache",
        default=compile_cache.DEFAULT_DIR,
        help="folder of JAX's persistent compilation cache: a restart loads the compiled steps ('' disables)",
    )
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    compile_cache.enable(a.compilation_cache)
    import uvicorn

    from safeclick_jax.app.engine import EngineFactory
    from safeclick_jax.app.server import create_app

    demo = a.checkpoint is None
    checkpoint = str(demo_checkpoint()) if demo else a.checkpoint
    data_dir = Path(a.data_dir) if a.data_dir else DEMO_DATA
    if a.data_dir is None:
        example_volume(data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"error: --data-dir {data_dir}: no such folder")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"WARNING: binding {a.host}: anyone who can reach this address can open and segment the volumes "
            f"in {data_dir}; there is no login. Prefer 127.0.0.1 with an SSH tunnel.",
            flush=True,
        )
    print(f"loading the model from {checkpoint} ...", flush=True)
    factory = EngineFactory(checkpoint, a.memory_checkpoint, memory_from_init=demo)
    if factory.memory_note:
        print(f"note: {factory.memory_note}", flush=True)
    ready = threading.Event()
    app = create_app(factory, data_dir, a.max_upload_mb, idle_s=a.idle_minutes * 60, model_name=checkpoint, ready=ready)

    def warm():
        try:
            factory.warm_up(lambda m: print(m, flush=True))
            ready.set()
            print(f"ready: open http://{a.host if ':' not in a.host else f'[{a.host}]'}:{a.port}/", flush=True)
        except Exception as e:  # the page shows it; the server keeps answering
            app.state.status.update(state="failed", error=f"{type(e).__name__}: {e}")
            print(f"error: compiling the model failed: {e}", file=sys.stderr, flush=True)

    threading.Thread(target=warm, daemon=True).start()
    print(
        f"serving http://{a.host}:{a.port}/ (data folder {data_dir}); the page works while the model compiles",
        flush=True,
    )
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
