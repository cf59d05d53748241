"""The local web app: `python -m safeclick_jax.app --checkpoint DIR --data-dir DIR [--host H] [--port P]`.

Open the printed URL in a browser (over SSH: `ssh -L 8000:127.0.0.1:8000 server`, then
localhost:8000). The demo (a model trained by `make train`, a synthetic abdominal CT) is
`make app` (demo.py at the top of the repository). See docs/app.md.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from safeclick_jax import compile_cache
from safeclick_jax.app.auth import LOOPBACK, read_key
from safeclick_jax.app.persist import DEFAULT_STATE_DIR
from safeclick_jax.data.volume_file import MAX_BYTES, MAX_VOXELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m safeclick_jax.app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="model directory (make app: the demo model of `make train`)")
    p.add_argument("--memory-checkpoint", default=None, help="model directory to take SAM 2's memory path from")
    p.add_argument(
        "--untrained-memory",
        action="store_true",
        help="a model without SAM 2's memory path propagates with an untrained one (the demo model)",
    )
    p.add_argument("--data-dir", required=True, help="folder of volumes the page may open")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted (default 1024)")
    p.add_argument(
        "--max-voxels", type=int, default=MAX_VOXELS, help=f"largest volume opened, in voxels (default {MAX_VOXELS})"
    )
    p.add_argument(
        "--max-volume-mb",
        type=float,
        default=MAX_BYTES / 2**20,
        help=f"largest voxel data a header may declare (what a .nii.gz decompresses to; default {MAX_BYTES >> 20})",
    )
    p.add_argument(
        "--idle-minutes",
        type=float,
        default=30.0,
        help="a session idle this long frees its engine; its state stays (default 30)",
    )
    p.add_argument("--max-sessions", type=int, default=8, help="live sessions (with an engine) at once (default 8)")
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"folder of every session's state; a restart resumes them (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument("--autosave", action="store_true", help="write each label map beside its input after every change")
    p.add_argument(
        "--api-key-file",
        default=None,
        help="file holding the API key every request must send (Authorization: Bearer KEY); "
        "required with a --host other than loopback",
    )
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

    from safeclick_jax.app.server import create_app, engine_factory
    from safeclick_jax.checkpoint import ModelDirError

    checkpoint = a.checkpoint
    data_dir = Path(a.data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"error: --data-dir {data_dir}: no such folder")
    if a.max_sessions < 1:
        raise SystemExit(f"error: --max-sessions {a.max_sessions}: at least 1")
    key = None
    if a.api_key_file is not None:
        try:
            key = read_key(a.api_key_file)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    elif a.host not in LOOPBACK:
        raise SystemExit(f"error: --host {a.host} serves beyond this machine: give --api-key-file FILE")
    print(f"loading the model from {checkpoint} ...", flush=True)
    try:
        factory = engine_factory(checkpoint, a.memory_checkpoint, untrained_memory=a.untrained_memory)
    except ModelDirError as e:
        raise SystemExit(f"error: {e}") from None
    if factory.memory_note:
        print(f"note: {factory.memory_note}", flush=True)
    ready = threading.Event()
    app = create_app(
        factory,
        data_dir,
        a.max_upload_mb,
        idle_s=a.idle_minutes * 60,
        model_name=checkpoint,
        ready=ready,
        max_voxels=a.max_voxels,
        max_bytes=int(a.max_volume_mb * 2**20),
        state_dir=a.state_dir,
        max_sessions=a.max_sessions,
        autosave=a.autosave,
        api_key=key,
    )

    if len(app.state.store):
        print(f"{len(app.state.store)} sessions of {a.state_dir} resumed (each wakes when next used)", flush=True)

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
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # re-executes once with the host allocator (safeclick_jax/host_memory.py)
    sys.exit(main())
