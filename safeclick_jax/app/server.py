"""FastAPI app of the web front end: `create_app(engine_factory, data_dir, ...)`.

Voxel indices in requests and responses are those of the input file (as in
`python -m safeclick_jax.segment`). Every compute call runs under the session's lock in a worker
thread; progress of a propagation is pushed as server-sent events (GET .../events).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import shutil
import threading
import time
from functools import partial
from pathlib import Path

import nibabel as nib
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from safeclick_jax.app.requests import (
    EditObject,
    NewObject,
    ObjectChoice,
    ObjectInPath,
    OpenVolume,
    Prompt,
    validation_sentence,
)
from safeclick_jax.app.sessions import BadInput, Session, SessionStore, named
from safeclick_jax.data.preprocess import NORMALIZATIONS
from safeclick_jax.data.volume_file import MAX_VOXELS, read_label_map, read_volume, volume_suffix
from safeclick_jax.inference.geometry import voxel_index

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


def safe_path(data_dir: Path, rel: str) -> Path:
    """`rel` inside data_dir, resolved (symlinks followed); BadInput for anything leaving it."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BadInput(f"path {rel!r}: a file name relative to the data folder is needed")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")):
        raise BadInput(f"path {rel!r}: absolute paths are refused; give a name relative to the data folder")
    if ".." in Path(rel).parts:
        raise BadInput(f"path {rel!r}: '..' is refused")
    root = data_dir.resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise BadInput(f"path {rel!r}: leaves the data folder (symbolic link?)")
    return full


def create_app(
    engine_factory,
    data_dir,
    max_upload_mb: float = 1024,
    idle_s: float = 1800.0,
    model_name: str | None = None,
    ready: threading.Event | None = None,
    max_voxels: int = MAX_VOXELS,
) -> FastAPI:
    """engine_factory(): a new engine (VolumePredictor interface) per session. `ready`: set once
    the model is compiled (health reports "loading" until then). `max_voxels`: the largest volume
    opened, checked on the file's header before any voxel is read."""
    data_dir = Path(data_dir)
    store = SessionStore(idle_s=idle_s)
    compute = threading.Lock()  # one model call at a time: the CPU is shared by every session
    app = FastAPI(title="safeclick-jax", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.store = store
    app.add_middleware(UploadLimit, limit=int(max_upload_mb * 2**20))
    status = {"state": "ready" if ready is None else "loading", "error": None}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e):
        return JSONResponse({"detail": validation_sentence(e.errors(), located=True)}, status_code=400)

    @app.exception_handler(ValidationError)
    async def invalid_form(_, e):
        return JSONResponse({"detail": validation_sentence(e.errors())}, status_code=400)

    @app.exception_handler(ValueError)
    async def value_error(_, e):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(Exception)
    async def any_error(_, e):
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    @app.on_event("shutdown")
    def _close():
        store.close()

    def session(sid: str) -> Session:
        s = store.get(sid)
        if s is None:
            raise HTTPException(404, f"no volume {sid!r} (closed, or expired after idle time)")
        return s

    def known(s: Session, o: int | None) -> int | None:
        """An object of the session (None: all objects)."""
        if o is not None and o not in s.objects:
            raise BadInput(f"unknown object {o}; objects are {sorted(s.objects)}")
        return o

    def timed(s: Session, fn):
        t0 = time.perf_counter()
        with s.lock, compute:
            out = fn()
        return out, round((time.perf_counter() - t0) * 1000.0, 1)

    # --- pages ----------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(HERE / "static" / "index.html")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if NIIVUE_DIST.is_dir():
        app.mount("/vendor/niivue", StaticFiles(directory=NIIVUE_DIST), name="niivue")
    else:
        log.warning("niivue is not installed (%s missing): run `make app-setup` (npm ci)", NIIVUE_DIST)

    @app.get("/api/health")
    def health():
        if ready is not None and ready.is_set() and status["state"] == "loading":
            status["state"] = "ready"
        return {
            "status": "ok",
            "model": model_name,
            "state": status["state"],
            "error": status["error"],
            "sessions": len(store),
        }

    app.state.status = status

    @app.get("/api/files")
    def files():
        root = data_dir.resolve()
        out = []
        for p in sorted(root.rglob("*")):
            try:
                rel = str(p.relative_to(root))
                if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")) and safe_path(data_dir, rel):
                    out.append({"path": rel, "bytes": p.stat().st_size})
            except (BadInput, OSError):
                continue
        return {"files": out}

    # --- volumes --------------------------------------------------------------------------------

    @app.post("/api/volumes", openapi_extra=_OPEN_BODY)
    async def open_volume(request: Request):
        """A volume from --data-dir (JSON: OpenVolume) or uploaded (multipart `file`, with an
        optional `normalization` form field)."""
        if ready is not None and not ready.is_set():
            raise HTTPException(503, "the model is still compiling; try again in a moment")
        sid, work = store.new_workdir()
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                form = await request.form()
                req = OpenVolume.model_validate({k: v for k, v in form.items() if k == "normalization"})
                up = form.get("file")
                if up is None or not hasattr(up, "filename"):
                    raise BadInput("multipart upload without a `file` field")
                name, source = Path(up.filename or "").name, None
                path = work / ("input" + volume_suffix(name))
                with open(path, "wb") as f:
                    while chunk := await up.read(1 << 20):
                        f.write(chunk)
            else:
                try:
                    body = await request.json()
                except ValueError:
                    raise BadInput("the request body must be JSON") from None
                req = OpenVolume.model_validate(body)
                name = req.path
                path = source = safe_path(data_dir, req.path)
                volume_suffix(source.name)
                if not source.is_file():
                    raise BadInput(f"path {req.path!r}: no such file in the data folder")
            vol = await asyncio.to_thread(named, read_volume, path, name, max_voxels=max_voxels)
            engine = engine_factory()

            def start():
                with compute:
                    engine.set_volume(vol, axis=req.axis, normalization=req.normalization)

            await asyncio.to_thread(start)
            s = Session(sid, engine, name, path, vol.image, work, source, axis=req.axis)
            s.objects[1] = {"name": "object 1", "visible": True}
            engine.add_object(1)
            store.add(s)
            threading.Thread(target=encode_slices, args=(s, engine), daemon=True).start()
            return {**s.describe()}
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def encode_slices(s: Session, engine) -> None:
        """After a volume opens: compiles the steps that depend on its size, then encodes its
        slices (from the middle outwards, as many as the feature cache holds), so a click runs
        only the decoder. One step per hold of the locks: a request waits for at most one."""
        n = engine.num_slices
        order = sorted(range(n), key=lambda t: abs(t - n // 2))[: engine.cache_info()["capacity_slices"]]
        try:
            for step in [engine.compile_volume_steps] + [partial(engine.encode_slice, t) for t in order]:
                with s.lock, compute:
                    if s.engine is not engine:  # the session was closed
                        return
                    step()
        except Exception:  # a click encodes its slice itself; the page keeps working
            log.exception("encoding the slices of %s failed", s.name)

    @app.get("/api/volumes/{sid}")
    def describe(sid: str):
        return session(sid).describe()

    @app.get("/api/volumes/{sid}/image.nii.gz")
    def image(sid: str):
        s = session(sid)
        if s.path.name.lower().endswith(".nii.gz"):
            return FileResponse(s.path, media_type="application/gzip", filename="image.nii.gz")
        return Response(gzip.compress(s.path.read_bytes(), 1), media_type="application/gzip")

    @app.delete("/api/volumes/{sid}")
    def close(sid: str):
        s = session(sid)
        with s.lock:
            store.delete(sid)
        return {"deleted": sid}

    # --- prompts --------------------------------------------------------------------------------

    @app.post("/api/volumes/{sid}/prompts")
    async def prompt(sid: str, body: Prompt):
        s = session(sid)
        shape = s.image.shape[:3]
        if body.voxel is not None:
            v = voxel_index(body.voxel, shape)
            t, x, y = s.engine.voxel_to_slice(v)
            kw = dict(points=[[x, y]], labels=[body.label])
            axis, k = s.axis, v[s.axis]
        else:
            axis, k = (s.axis if body.axis is None else body.axis), body.slice
            if axis != s.axis:
                raise BadInput(f"axis {axis!r}: boxes go on the slicing axis of this volume ({s.axis})")
            if not 0 <= k < shape[axis]:
                raise BadInput(f"slice {k!r}: an integer in 0..{shape[axis] - 1} is needed")
            t, xy = s.engine.geometry.box_to_slice(body.box, k)
            kw = dict(box=xy)
        o = body.object
        s.objects.setdefault(o, {"name": f"object {o}", "visible": True})

        def run():
            s.engine.add_prompt(t, obj_id=o, **kw)
            return s.engine.label_slice(t)  # the plane k of the label map along `axis`

        mask, ms = await asyncio.to_thread(timed, s, run)
        return {
            "object": o,
            "axis": axis,
            "slice": int(k),
            "mask": (mask == o).astype(int).tolist(),
            "voxels": int((mask == o).sum()),
            "ms": ms,
        }

    @app.post("/api/volumes/{sid}/propagate")
    async def propagate(sid: str, body: ObjectChoice | None = None):
        s = session(sid)
        o = known(s, body.object if body else None)
        ids = None if o is None else [o]
        if s.progress["running"]:
            raise HTTPException(409, "a propagation is already running for this volume")

        def progress(done, total):
            s.progress.update(done=int(done), total=int(total))

        def run():
            s.progress.update(done=0, total=int(s.engine.num_slices), running=True)
            try:
                return s.engine.propagate(obj_ids=ids, progress=progress)
            except RuntimeError as e:  # nothing prompted yet
                raise BadInput(str(e)) from None
            finally:
                s.progress["running"] = False

        lab, ms = await asyncio.to_thread(timed, s, run)
        return {
            "voxels": {str(o): int((lab == o).sum()) for o in sorted(s.objects)},
            "progress": {k: v for k, v in s.progress.items() if k != "running"},
            "ms": ms,
        }

    @app.get("/api/volumes/{sid}/events")
    async def events(sid: str):
        """Server-sent events: `data: {"done", "total", "running"}` every 0.2 s while a
        propagation runs (and once when none does)."""
        s = session(sid)

        async def stream():
            last = None
            for _ in range(36000):
                p = dict(s.progress)
                if p != last:
                    yield f"data: {json.dumps(p)}\n\n"
                    last = p
                if not p["running"] and _ > 25:
                    break
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/api/volumes/{sid}/undo")
    async def undo(sid: str, body: ObjectChoice | None = None):
        return await _history(sid, body, "undo")

    @app.post("/api/volumes/{sid}/redo")
    async def redo(sid: str, body: ObjectChoice | None = None):
        return await _history(sid, body, "redo")

    async def _history(sid: str, body: ObjectChoice | None, what: str):
        s = session(sid)
        o = known(s, body.object if body else None)
        fn = getattr(s.engine, what)
        msg, ms = await asyncio.to_thread(timed, s, lambda: fn(o))
        return {what: msg, "ms": ms}

    # --- objects --------------------------------------------------------------------------------

    @app.post("/api/volumes/{sid}/objects")
    async def add_object(sid: str, body: NewObject | None = None):
        s = session(sid)
        body = body or NewObject()
        o = s.engine.add_object(body.object)
        s.objects.setdefault(o, {"name": body.name or f"object {o}", "visible": True})
        return {"object": o, **s.objects[o]}

    @app.patch("/api/volumes/{sid}/objects/{o}")
    async def edit_object(sid: str, o: ObjectInPath, body: EditObject):
        s = session(sid)
        known(s, o)
        if body.name is not None:
            s.objects[o]["name"] = body.name
        if body.visible is not None:
            s.objects[o]["visible"] = body.visible
        return {"object": o, **s.objects[o]}

    @app.post("/api/volumes/{sid}/objects/{o}/clear")
    def clear_object(sid: str, o: ObjectInPath):
        s = session(sid)
        known(s, o)
        _, ms = timed(s, lambda: s.engine.reset_object(o))
        return {"object": o, "ms": ms}

    @app.delete("/api/volumes/{sid}/objects/{o}")
    def delete_object(sid: str, o: ObjectInPath):
        s = session(sid)
        known(s, o)
        _, ms = timed(s, lambda: s.engine.remove_object(o))
        del s.objects[o]
        return {"deleted": o, "ms": ms}

    # --- label maps -----------------------------------------------------------------------------

    @app.get("/api/volumes/{sid}/labels.nii.gz")
    def labels(sid: str, visible: bool = False):
        """The label map (input affine and header); `?visible=true` leaves hidden objects out."""
        s = session(sid)
        hide = [o for o, v in s.objects.items() if not v["visible"]] if visible else []
        with s.lock:
            img = s.labels_image(hide)
        return Response(_gz(img), media_type="application/gzip")

    @app.get("/api/volumes/{sid}/overlay/{stamp}/labels.nii.gz", include_in_schema=False)
    def overlay(sid: str, stamp: str):
        """The page's overlay: visible objects only; `stamp` defeats the browser cache."""
        return labels(sid, visible=True)

    @app.post("/api/volumes/{sid}/labels")
    async def upload_labels(sid: str, request: Request):
        """Start from a label map: a multipart `file` (.nii/.nii.gz) on the volume's grid."""
        s = session(sid)
        form = await request.form()
        up = form.get("file")
        if up is None or not hasattr(up, "filename"):
            raise BadInput("multipart upload without a `file` field")
        path = s.workdir / ("labels" + volume_suffix(Path(up.filename or "").name))
        path.write_bytes(await up.read())
        lab = await asyncio.to_thread(named, read_label_map, path, str(up.filename), s.engine.volume, max_voxels)
        # every labelled slice becomes a mask prompt, so the label map shows the upload as it is
        ids, ms = await asyncio.to_thread(timed, s, lambda: s.engine.set_labels(lab, slices="all"))
        s.objects = {o: s.objects.get(o, {"name": f"object {o}", "visible": True}) for o in ids}
        return {"objects": ids, "ms": ms}

    @app.post("/api/volumes/{sid}/save")
    def save(sid: str):
        """Writes the label map beside the input in the data folder: NAME_labels.nii.gz."""
        s = session(sid)
        if s.source is None:
            raise BadInput("an uploaded volume has no place in the data folder; use Download")
        stem = s.source.name[: -len(volume_suffix(s.source.name))]
        out = s.source.with_name(stem + "_labels.nii.gz")
        with s.lock:
            nib.save(s.labels_image(), str(out))
        return {"saved": str(out.relative_to(data_dir.resolve()))}

    return app


def _gz(img) -> bytes:
    return gzip.compress(img.to_bytes(), 1)


# the two bodies POST /api/volumes takes, for the OpenAPI schema (the route reads the request itself)
_OPEN_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": OpenVolume.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "normalization": {"type": "string", "enum": list(NORMALIZATIONS)},
                    },
                    "required": ["file"],
                }
            },
        }
    }
}


def engine_factory(checkpoint: str, memory_checkpoint: str | None = None, untrained_memory: bool = False):
    """The app's engines: a VolumePredictor per session, memory slots of one padded size (each
    step compiles once: for small models compiling costs seconds, attending to masked slots
    almost nothing)."""
    from safeclick_jax.inference import EngineFactory

    memory = "untrained" if untrained_memory else "required"
    return EngineFactory(checkpoint, memory_checkpoint, memory, fixed_memory_slots=True)
