"""The HTTP API (/api/...): one APIRouter. Each route takes its request model (app/requests.py),
validated by FastAPI, and the session its URL names (the `Live` dependency: 404 when there is
none). Voxel indices are those of the input file (as in `python -m safeclick_jax.segment`). Every
compute call runs under the session's lock and the server's compute lock in a worker thread;
progress of a propagation is pushed as server-sent events (GET .../events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import shutil
import threading
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Callable

import nibabel as nib
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from safeclick_jax.app.persist import checksum
from safeclick_jax.app.requests import EditObject, NewObject, ObjectChoice, ObjectInPath, OpenVolume, Prompt
from safeclick_jax.app.sessions import (
    BadInput,
    CannotResume,
    Session,
    SessionStore,
    autosave_path,
    named,
    safe_path,
)
from safeclick_jax.data import dicom
from safeclick_jax.data.preprocess import NORMALIZATIONS
from safeclick_jax.data.volume_file import MAX_BYTES, SERIES_SUFFIX, read_label_map, read_volume, volume_suffix
from safeclick_jax.inference.geometry import voxel_index

log = logging.getLogger("safeclick_jax.app")


@dataclasses.dataclass
class AppState:
    """What the routes share: the engine factory, the data folder, the sessions (their `compute`
    lock runs one model call at a time: the CPU is shared by every session) and the limits."""

    engines: Callable  # engines(): a new engine (VolumePredictor interface) per session
    data_dir: Path
    store: SessionStore
    max_voxels: int
    max_bytes: int = MAX_BYTES
    model_name: str | None = None
    ready: threading.Event | None = None  # set once the model is compiled
    status: dict = dataclasses.field(default_factory=lambda: {"state": "ready", "error": None})

    @property
    def compute(self) -> threading.Lock:
        return self.store.compute

    def timed(self, s: Session, fn):
        """fn() under the session's and the compute lock -> (result, milliseconds)."""
        t0 = time.perf_counter()
        with s.lock, self.compute:
            out = fn()
        return out, round((time.perf_counter() - t0) * 1000.0, 1)

    def read(self, path: Path, name: str):
        """The volume file, its header checked against the limits before any voxel is read."""
        return named(read_volume, path, name, max_voxels=self.max_voxels, max_bytes=self.max_bytes)

    def wake(self, s: Session) -> None:
        """Gives a freed session its engine back: the volume read (its checksum checked), the
        recorded interactions replayed one per hold of the compute lock (`s.resume` counts
        them), then its slices encoded in the background. CannotResume (409) keeps the state."""
        if s.live:
            return
        with s.lock:
            if s.live:
                return
            s.check_volume()
            self.store.make_room(keep=s)
            vol = self.read(s.path, s.name)
            engine = self.engines()
            entries = list(s.interactions)
            s.resume.update(done=0, total=len(entries), running=True)
            try:
                with self.compute:
                    engine.set_volume(vol, axis=s.axis, normalization=s.normalization)
                for i, entry in enumerate(entries):
                    with self.compute:
                        engine.replay([entry])
                    s.resume["done"] = i + 1
            except ValueError as e:
                raise CannotResume(f"session {s.id}: interaction {s.resume['done']} does not replay ({e})") from None
            finally:
                s.resume["running"] = False
            s.engine, s.image, s.interactions = engine, vol.image, []
        threading.Thread(target=self.encode_slices, args=(s, engine), daemon=True).start()

    def label_map(self, s: Session):
        """The session's label map: the engine's, or the one on disk while it is freed."""
        if not s.live:
            lab = self.store.stored_labels(s)
            if lab is not None:
                s.check_volume()
                return lab
            self.wake(s)
        with s.lock, self.compute:
            if s.engine is not None:
                return s.engine.label_map()
        return self.label_map(s)  # freed meanwhile: its label map was written first

    def encode_slices(self, s: Session, engine) -> None:
        """After a volume opens: compiles the steps that depend on its size, then encodes its
        slices (from the middle outwards, as many as the feature cache holds), so a click runs
        only the decoder. One step per hold of the locks: a request waits for at most one."""
        n = engine.num_slices
        order = sorted(range(n), key=lambda t: abs(t - n // 2))[: engine.cache_info()["capacity_slices"]]
        try:
            for step in [engine.compile_volume_steps] + [partial(engine.encode_slice, t) for t in order]:
                with s.lock, self.compute:
                    if s.engine is not engine:  # the session was closed or freed
                        return
                    step()
        except Exception:  # a click encodes its slice itself; the page keeps working
            log.exception("encoding the slices of %s failed", s.name)


def app_state(request: Request) -> AppState:
    return request.app.state.ctx


State = Annotated[AppState, Depends(app_state)]


def stored_session(sid: str, st: State) -> Session:
    s = st.store.get(sid)
    if s is None:
        raise HTTPException(404, f"no session {sid!r} on this server (it never existed, or was closed)")
    return s


def live_session(sid: str, st: State, request: Request):
    """The session with its engine (a freed one is woken first); after a request that changes
    it (any method but GET) succeeded, its state is written to disk before the answer leaves."""
    s = stored_session(sid, st)
    with st.store.using(s):
        st.wake(s)
        yield s
        if request.method != "GET":
            st.store.save(s)


Stored = Annotated[Session, Depends(stored_session)]  # the session's state only (no engine needed)
Live = Annotated[Session, Depends(live_session, scope="function")]


def known(s: Session, o: int | None) -> int | None:
    """An object of the session (None: all objects)."""
    if o is not None and o not in s.objects:
        raise BadInput(f"unknown object {o}; objects are {sorted(s.objects)}")
    return o


router = APIRouter(prefix="/api")


@router.get("/health")
def health(st: State):
    if st.ready is not None and st.ready.is_set() and st.status["state"] == "loading":
        st.status["state"] = "ready"
    return {
        "status": "ok",
        "model": st.model_name,
        "state": st.status["state"],
        "error": st.status["error"],
        "sessions": len(st.store),
    }


@router.get("/files")
def files(st: State):
    root = st.data_dir.resolve()
    out = []
    for p in sorted(root.rglob("*")):
        try:
            rel = str(p.relative_to(root))
            if p.is_dir() and dicom.is_series(p) and safe_path(st.data_dir, rel):  # a DICOM series folder
                out.append({"path": rel, "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file())})
            elif (
                p.is_file()
                and p.name.lower().endswith((".nii", ".nii.gz", SERIES_SUFFIX))
                and safe_path(st.data_dir, rel)
            ):
                out.append({"path": rel, "bytes": p.stat().st_size})
        except (BadInput, OSError):
            continue
    return {"files": out}


# --- volumes ------------------------------------------------------------------------------------

# the two bodies POST /api/volumes takes, for the OpenAPI schema (the route reads the request itself)
OPEN_BODY = {
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


@router.post("/volumes", openapi_extra=OPEN_BODY)
async def open_volume(request: Request, st: State):
    """A volume from --data-dir (JSON: OpenVolume) or uploaded (multipart `file`, with an
    optional `normalization` form field)."""
    if st.ready is not None and not st.ready.is_set():
        raise HTTPException(503, "the model is still compiling; try again in a moment")
    sid, work = st.store.new_workdir()
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            req = OpenVolume.model_validate({k: v for k, v in form.items() if k == "normalization"})
            up = form.get("file")
            if up is None or not hasattr(up, "filename"):
                raise BadInput("multipart upload without a `file` field")
            name, source = Path(up.filename or "").name, None
            series = name.lower().endswith(SERIES_SUFFIX)  # a .zip of a DICOM series
            path = work / ("input" + (SERIES_SUFFIX if series else volume_suffix(name)))
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
            path = source = safe_path(st.data_dir, req.path)
            series = dicom.is_series(source)  # a DICOM series folder or .zip
            if not series:
                volume_suffix(source.name)
                if not source.is_file():
                    raise BadInput(f"path {req.path!r}: no such file in the data folder")
        vol = await asyncio.to_thread(st.read, path, name)
        if series:  # the session keeps the series as a NIfTI on its own grid (viewer, downloads, resume)
            path = work / "input.nii.gz"
            await asyncio.to_thread(nib.save, vol.image, str(path))
        await asyncio.to_thread(st.store.make_room)
        engine = st.engines()

        def start():
            with st.compute:
                engine.set_volume(vol, axis=req.axis, normalization=req.normalization)
            engine.add_object(1)
            return checksum(path)

        sha = await asyncio.to_thread(start)
        geometry = {
            "shape": [int(v) for v in vol.image.shape[:3]],
            "spacing": [float(v) for v in vol.image.header.get_zooms()[:3]],
            "affine": np.asarray(vol.image.affine).tolist(),
        }
        s = Session(
            sid, name, path, work, source, sha, req.axis, req.normalization, engine.normalization,
            int(engine.num_slices), geometry, engine=engine, image=vol.image,
        )  # fmt: skip
        s.objects[1] = {"name": "object 1", "visible": True}
        st.store.add(s)
        threading.Thread(target=st.encode_slices, args=(s, engine), daemon=True).start()
        return {**s.describe()}
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@router.get("/volumes/{sid}")
def describe(s: Stored):
    """The session (live or freed: `live`; `resume`: interactions replayed while it wakes)."""
    return s.describe()


@router.post("/volumes/{sid}/resume")
def resume(s: Stored, st: State):
    """Starts waking a freed session in the background (the page, on reload); GET
    /api/volumes/{id} shows `resume` {"done", "total"} meanwhile. Its volume is checked now."""
    if not s.live:
        s.check_volume()
        threading.Thread(target=_wake_logged, args=(st, s), daemon=True).start()
    return s.describe()


def _wake_logged(st: AppState, s: Session) -> None:
    try:
        with st.store.using(s):
            st.wake(s)
    except Exception as e:  # the next request that needs the engine answers it
        log.warning("resuming session %s failed: %s", s.id, e)


@router.get("/volumes/{sid}/image.nii.gz")
def image(s: Stored):
    if not s.live:
        s.check_volume()
    if s.path.name.lower().endswith(".nii.gz"):
        return FileResponse(s.path, media_type="application/gzip", filename="image.nii.gz")
    return Response(gzip.compress(s.path.read_bytes(), 1), media_type="application/gzip")


@router.delete("/volumes/{sid}")
def close(s: Stored, st: State):
    """Closes the session: its engine and its state on disk are gone."""
    with s.lock:
        st.store.delete(s.id)
    return {"deleted": s.id}


# --- prompts ------------------------------------------------------------------------------------


@router.post("/volumes/{sid}/prompts")
async def prompt(body: Prompt, s: Live, st: State):
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

    def run():
        s.engine.add_prompt(t, obj_id=o, **kw)
        return s.engine.label_slice(t)  # the plane k of the label map along `axis`

    mask, ms = await asyncio.to_thread(st.timed, s, run)
    return slice_answer(s, o, axis, k, mask, ms)


def slice_answer(s: Session, o: int, axis: int, k: int, mask, ms: float) -> dict:
    """The answer to a prompt: object o's mask on plane k of `axis` (its label map there)."""
    s.objects.setdefault(o, {"name": f"object {o}", "visible": True})
    return {
        "object": o,
        "axis": axis,
        "slice": int(k),
        "mask": (mask == o).astype(int).tolist(),
        "voxels": int((mask == o).sum()),
        "ms": ms,
    }


@router.post("/volumes/{sid}/propagate")
async def propagate(s: Live, st: State, body: ObjectChoice | None = None):
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

    lab, ms = await asyncio.to_thread(st.timed, s, run)
    return {
        "voxels": {str(o): int((lab == o).sum()) for o in sorted(s.objects)},
        "progress": {k: v for k, v in s.progress.items() if k != "running"},
        "ms": ms,
    }


@router.get("/volumes/{sid}/events")
async def events(s: Stored):
    """Server-sent events: `data: {"done", "total", "running"}` every 0.2 s while a propagation
    runs (and once when none does)."""

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


@router.post("/volumes/{sid}/undo")
async def undo(s: Live, st: State, body: ObjectChoice | None = None):
    return await _history(s, st, body, "undo")


@router.post("/volumes/{sid}/redo")
async def redo(s: Live, st: State, body: ObjectChoice | None = None):
    return await _history(s, st, body, "redo")


async def _history(s: Session, st: AppState, body: ObjectChoice | None, what: str):
    o = known(s, body.object if body else None)
    fn = getattr(s.engine, what)
    msg, ms = await asyncio.to_thread(st.timed, s, lambda: fn(o))
    return {what: msg, "ms": ms}


# --- objects ------------------------------------------------------------------------------------


@router.post("/volumes/{sid}/objects")
def add_object(s: Live, st: State, body: NewObject | None = None):
    body = body or NewObject()
    o, _ = st.timed(s, lambda: s.engine.add_object(body.object))
    s.objects.setdefault(o, {"name": body.name or f"object {o}", "visible": True})
    return {"object": o, **s.objects[o]}


@router.patch("/volumes/{sid}/objects/{o}")
def edit_object(o: ObjectInPath, body: EditObject, s: Live):
    known(s, o)
    if body.name is not None:
        s.objects[o]["name"] = body.name
    if body.visible is not None:
        s.objects[o]["visible"] = body.visible
    return {"object": o, **s.objects[o]}


@router.post("/volumes/{sid}/objects/{o}/clear")
def clear_object(o: ObjectInPath, s: Live, st: State):
    known(s, o)
    _, ms = st.timed(s, lambda: s.engine.reset_object(o))
    return {"object": o, "ms": ms}


@router.delete("/volumes/{sid}/objects/{o}")
def delete_object(o: ObjectInPath, s: Live, st: State):
    known(s, o)
    _, ms = st.timed(s, lambda: s.engine.remove_object(o))
    del s.objects[o]
    return {"deleted": o, "ms": ms}


# --- label maps ---------------------------------------------------------------------------------


@router.get("/volumes/{sid}/labels.nii.gz")
def labels(s: Stored, st: State, visible: bool = False):
    """The label map (input affine and header); `?visible=true` leaves hidden objects out. A
    freed session answers from its state on disk, without waking."""
    hide = [o for o, v in s.objects.items() if not v["visible"]] if visible else []
    with st.store.using(s):
        img = s.labels_image(st.label_map(s), hide)
    return Response(gzip.compress(img.to_bytes(), 1), media_type="application/gzip")


@router.get("/volumes/{sid}/overlay/{stamp}/labels.nii.gz", include_in_schema=False)
def overlay(s: Stored, st: State, stamp: str):
    """The page's overlay: visible objects only; `stamp` defeats the browser cache."""
    return labels(s, st, visible=True)


@router.post("/volumes/{sid}/labels")
async def upload_labels(request: Request, s: Live, st: State):
    """Start from a label map: a multipart `file` (.nii/.nii.gz) on the volume's grid."""
    form = await request.form()
    up = form.get("file")
    if up is None or not hasattr(up, "filename"):
        raise BadInput("multipart upload without a `file` field")
    path = s.workdir / ("labels" + volume_suffix(Path(up.filename or "").name))
    path.write_bytes(await up.read())
    lab = await asyncio.to_thread(named, read_label_map, path, str(up.filename), s.engine.volume, st.max_voxels)
    path.unlink()  # the label map is in the interactions now
    # every labelled slice becomes a mask prompt, so the label map shows the upload as it is
    ids, ms = await asyncio.to_thread(st.timed, s, lambda: s.engine.set_labels(lab, slices="all"))
    s.objects = {o: s.objects.get(o, {"name": f"object {o}", "visible": True}) for o in ids}
    return {"objects": ids, "ms": ms}


@router.post("/volumes/{sid}/save")
def save(s: Stored, st: State):
    """Writes the label map beside the input in the data folder: NAME_labels.nii.gz (for a DICOM
    series folder or zip NAME, on the series' grid)."""
    if s.source is None:
        raise BadInput("an uploaded volume has no place in the data folder; use Download")
    out = autosave_path(s.source)
    with st.store.using(s):
        nib.save(s.labels_image(st.label_map(s)), str(out))
    return {"saved": str(out.relative_to(st.data_dir.resolve()))}
