"""FastAPI app of the web front end: `create_app(engine_factory, data_dir, ...)` serves the page
and the HTTP API (app/routes.py); `engine_factory(checkpoint)` makes the app's engines.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from safeclick_jax.app import strokes
from safeclick_jax.app.auth import ApiKey
from safeclick_jax.app.requests import validation_sentence
from safeclick_jax.app.routes import AppState, router
from safeclick_jax.app.sessions import Busy, CannotResume, SessionStore, safe_path  # noqa: F401  (safe_path: re-exported)
from safeclick_jax.data.volume_file import MAX_BYTES, MAX_VOXELS

HERE = Path(__file__).parent
NIIVUE_DIST = HERE / "web" / "node_modules" / "@niivue" / "niivue" / "dist"
log = logging.getLogger("safeclick_jax.app")


class UploadLimit:
    """ASGI middleware: a request body above `limit` bytes is answered 413 from its
    Content-Length, or as soon as the streamed body passes the limit, before it is read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = {"detail": f"upload larger than the limit of {self.limit // 2**20} MiB (--max-upload-mb)"}
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await JSONResponse(too_big, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await JSONResponse(too_big, status_code=413)(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(
    engine_factory,
    data_dir,
    max_upload_mb: float = 1024,
    idle_s: float = 1800.0,
    model_name: str | None = None,
    ready: threading.Event | None = None,
    max_voxels: int = MAX_VOXELS,
    max_bytes: int = MAX_BYTES,
    state_dir: str | Path | None = None,
    max_sessions: int = 8,
    autosave: bool = False,
    api_key: str | None = None,
    quiet_s: float = 1.0,
) -> FastAPI:
    """engine_factory(): a new engine (VolumePredictor interface) per session. `ready`: set once
    the model is compiled (health reports "loading" until then). `max_voxels` / `max_bytes`: the
    largest volume opened, checked on the file's header before any voxel is read. `state_dir`:
    the sessions' state (app/persist.py; None: a temporary folder, removed at shutdown); the
    sessions found there are resumed. `max_sessions`: live sessions (with an engine).
    `autosave`: each label map also written beside its input. `api_key`: required on every API
    call (app/auth.py). `quiet_s`: a label map is written once its session is quiet this long."""
    app = FastAPI(title="safeclick-jax", docs_url="/api/docs", openapi_url="/api/openapi.json")
    store = SessionStore(state_dir, idle_s=idle_s, max_live=max_sessions, quiet_s=quiet_s, autosave=autosave)
    st = AppState(engine_factory, Path(data_dir), store, max_voxels, max_bytes, model_name, ready)
    st.status["state"] = "ready" if ready is None else "loading"
    app.state.ctx, app.state.store, app.state.status = st, st.store, st.status
    app.add_middleware(UploadLimit, limit=int(max_upload_mb * 2**20))
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)  # added last: runs first, before any body is read

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e):
        return JSONResponse({"detail": validation_sentence(e.errors(), located=True)}, status_code=400)

    @app.exception_handler(ValidationError)
    async def invalid_form(_, e):
        return JSONResponse({"detail": validation_sentence(e.errors())}, status_code=400)

    @app.exception_handler(Busy)
    async def busy(_, e):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(CannotResume)
    async def cannot_resume(_, e):
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(ValueError)  # BadInput, VolumeError and the engine's refusals
    async def value_error(_, e):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(Exception)
    async def any_error(_, e):
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.on_event("shutdown")
    def _close():
        st.store.close()

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(HERE / "static" / "index.html")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if NIIVUE_DIST.is_dir():
        app.mount("/vendor/niivue", StaticFiles(directory=NIIVUE_DIST), name="niivue")
    else:
        log.warning("niivue is not installed (%s missing): run `make app-setup` (npm ci)", NIIVUE_DIST)
    app.include_router(router)
    app.include_router(strokes.router)
    return app


def engine_factory(checkpoint: str, memory_checkpoint: str | None = None, untrained_memory: bool = False):
    """The app's engines: a VolumePredictor per session, memory slots of one padded size (each
    step compiles once: for small models compiling costs seconds, attending to masked slots
    almost nothing)."""
    from safeclick_jax.inference import EngineFactory, load_model

    memory = "untrained" if untrained_memory else "required"
    option = "--memory-checkpoint DIR (or run it with an untrained one: --untrained-memory)"
    loaded = load_model(checkpoint, memory_checkpoint=memory_checkpoint, memory=memory, memory_option=option)
    return EngineFactory(loaded, fixed_memory_slots=True)
