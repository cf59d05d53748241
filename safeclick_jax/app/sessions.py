"""Per-browser-tab sessions: one volume, its objects and its state on disk (app/persist.py), and
while it is live an engine. The store keeps every session; what it frees (after idle time, or for
the cap on live sessions, least recently used first) is an engine, never state. A freed session
is woken again by the next request that needs its engine: its volume is read (its checksum
checked) and its interactions replayed."""

from __future__ import annotations

import contextlib
import gzip
import logging
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from safeclick_jax.app import persist
from safeclick_jax.data.volume_file import VolumeError, volume_stem

log = logging.getLogger("safeclick_jax.app")
LOCK_WAIT_S = 2.0  # freeing an idle session waits this long for its background step (encoding a slice)


class BadInput(ValueError):
    """A request the server refuses with 400 and this message."""


class Busy(RuntimeError):
    """Every live session is busy: a new one cannot get an engine now (answered 503)."""


class CannotResume(RuntimeError):
    """A freed session cannot get its engine back (its volume file was deleted or changed, or its
    interactions do not replay): answered 409, the state kept."""


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


def named(fn, path: Path, name: str, *args, **kw):
    """fn(path, ...) of the volume reader, its VolumeError as BadInput naming the file as the
    user knows it (the server's own paths stay private)."""
    try:
        return fn(path, *args, **kw)
    except VolumeError as e:
        raise BadInput(str(e).replace(str(path), name)) from None


@dataclass
class Session:
    id: str
    name: str  # file name shown in the page
    path: Path  # the input file (in the session's folder for uploads, in --data-dir otherwise)
    workdir: Path  # the session's folder under --state-dir
    source: Path | None  # the file in --data-dir it was opened from (for "save beside the input")
    sha256: str  # of the input file when it was opened
    axis: int
    normalization: str  # as asked for (replayed as such)
    mode: str  # the mapping used
    num_slices: int
    geometry: dict  # shape, spacing, affine of the input
    engine: object | None = None  # None while freed
    image: nib.Nifti1Image | None = None  # the input's image (header, affine) while live
    objects: dict = field(default_factory=dict)  # id -> {"name": str, "visible": bool}
    interactions: list = field(default_factory=list)  # the engine's, kept while it is freed
    progress: dict = field(default_factory=lambda: {"done": 0, "total": 0, "running": False})
    resume: dict = field(default_factory=lambda: {"done": 0, "total": 0, "running": False})
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0  # requests using the session now (its engine is not freed under them)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def live(self) -> bool:
        return self.engine is not None

    @property
    def busy(self) -> bool:
        """A request is using it, or a propagation or resume runs (background encoding does not count)."""
        return self.users > 0 or self.progress["running"] or self.resume["running"]

    def history(self) -> list:
        return self.engine.interactions if self.engine is not None else self.interactions

    def describe(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            **self.geometry,
            "axis": self.axis,
            "normalization": self.mode,
            "num_slices": self.num_slices,
            "encoding": self.encoding(),
            "objects": [{"id": k, **v} for k, v in sorted(self.objects.items())],
            "saveable": self.source is not None,
            "live": self.live,
            "resume": dict(self.resume),
        }

    def encoding(self) -> dict:
        """Slices encoded so far of those encoded after opening (as many as the feature cache holds)."""
        engine = self.engine
        if engine is None:
            return {"done": 0, "total": 0}
        info = engine.cache_info()
        return {"done": int(info["cached_slices"]), "total": int(min(engine.num_slices, info["capacity_slices"]))}

    def to_state(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "input": str(self.path),
            "source": None if self.source is None else str(self.source),
            "sha256": self.sha256,
            "axis": self.axis,
            "normalization": self.normalization,
            "mode": self.mode,
            "num_slices": self.num_slices,
            "geometry": self.geometry,
            "objects": [{"id": k, **v} for k, v in sorted(self.objects.items())],
            "interactions": list(self.history()),
        }

    @classmethod
    def from_state(cls, folder: Path, st: dict) -> "Session":
        return cls(
            st["id"],
            st["name"],
            Path(st["input"]),
            folder,
            None if st["source"] is None else Path(st["source"]),
            st["sha256"],
            st["axis"],
            st["normalization"],
            st["mode"],
            st["num_slices"],
            st["geometry"],
            objects={int(o["id"]): {"name": o["name"], "visible": o["visible"]} for o in st["objects"]},
            interactions=st["interactions"],
        )

    def check_volume(self) -> None:
        """The input file is the one the session was opened on; CannotResume otherwise."""
        if not self.path.is_file():
            raise CannotResume(
                f"the volume file {self.name!r} of session {self.id} was deleted; its state is kept: "
                "put the file back to resume it"
            )
        if persist.checksum(self.path) != self.sha256:
            raise CannotResume(
                f"the volume file {self.name!r} of session {self.id} changed on disk since it was opened "
                "(checksum differs); its state is kept: restore the file to resume it, or open the file anew"
            )

    def header_image(self) -> nib.Nifti1Image:
        """The input's image (header and affine; voxels not read)."""
        if self.image is None:
            self.check_volume()
            self.image = nib.load(str(self.path))
        return self.image

    def labels_image(self, lab: np.ndarray, hide=()) -> nib.Nifti1Image:
        """The label map `lab` with the input's affine and header (uint8, objects in `hide` set to 0)."""
        if hide:
            lab = np.where(np.isin(lab, list(hide)), 0, lab)
        image = self.header_image()
        header = image.header.copy()
        header.set_data_dtype(np.uint8)
        out = type(image)(lab.astype(np.uint8), image.affine, header=header)
        out.header.set_slope_inter(1, 0)
        out.header["cal_min"], out.header["cal_max"] = 0, max(1, int(lab.max()))
        return out


class SessionStore:
    """Every session by id, its state under `root` (one folder each). At most `max_live` have an
    engine; `expire()` frees the engines of those idle longer than `idle_s`. `compute` is the
    lock that runs one model call at a time (label maps written behind are model calls too)."""

    def __init__(
        self,
        root: Path | str | None = None,
        idle_s: float = 1800.0,
        max_live: int = 8,
        quiet_s: float = 1.0,
        autosave: bool = False,
    ):
        self.idle_s, self.max_live, self.autosave = idle_s, max_live, autosave
        self.temporary = root is None  # create_app without a state folder (tests): removed at close
        self.root = Path(tempfile.mkdtemp(prefix="safeclick_app_") if root is None else root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.compute = threading.Lock()
        self.writer = persist.LabelWriter(quiet_s)
        self._closed = threading.Event()
        self._load_all()
        # idle engines are freed without waiting for a request to come
        threading.Thread(target=self._expire_every, args=(min(60.0, max(1.0, idle_s / 4)),), daemon=True).start()

    def _expire_every(self, period_s: float) -> None:
        while not self._closed.wait(period_s):
            try:
                self.expire()
            except Exception:
                log.exception("freeing idle sessions failed")

    def _load_all(self) -> None:
        """The sessions of an earlier run, freed (each wakes when next used)."""
        for folder in sorted(p for p in self.root.iterdir() if (p / persist.STATE).is_file()):
            try:
                s = Session.from_state(folder, persist.load_state(folder))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("session folder %s skipped: %s", folder, e)
                continue
            self._sessions[s.id] = s

    def new_workdir(self) -> tuple[str, Path]:
        sid = secrets.token_urlsafe(12)
        d = self.root / sid
        d.mkdir()
        return sid, d

    def add(self, s: Session) -> None:
        with self._lock:
            self._sessions[s.id] = s
        self.save(s)

    def get(self, sid: str) -> Session | None:
        self.expire()
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None:
                s.last_used = time.monotonic()
            return s

    @contextlib.contextmanager
    def using(self, s: Session):
        """A request uses `s`: its engine is not freed meanwhile."""
        with self._lock:
            s.users += 1
        try:
            yield s
        finally:
            with self._lock:
                s.users -= 1
                s.last_used = time.monotonic()

    def delete(self, sid: str) -> bool:
        with self._lock:
            s = self._sessions.pop(sid, None)
        if s is None:
            return False
        self.writer.forget(sid)
        s.engine = None
        shutil.rmtree(s.workdir, ignore_errors=True)
        return True

    # --- state ------------------------------------------------------------------------------------

    def save(self, s: Session) -> None:
        """After a change: state.json now, the label map (and --autosave's file) once the session
        has been quiet for a moment."""
        with s.lock:
            if self._sessions.get(s.id) is not s:  # deleted meanwhile
                return
            persist.save_state(s.workdir, s.to_state())
        if s.live:
            self.writer.touch(s.id, lambda: self._write_labels(s))

    def _write_labels(self, s: Session) -> None:
        with s.lock, self.compute:
            if s.engine is not None and self._sessions.get(s.id) is s:
                self._store_labels(s, s.engine.label_map())

    def _store_labels(self, s: Session, lab: np.ndarray) -> None:
        persist.save_labels(s.workdir, lab, len(s.history()))
        if self.autosave and s.source is not None:
            persist.write_atomic(autosave_path(s.source), gzip.compress(s.labels_image(lab).to_bytes(), 1))

    def stored_labels(self, s: Session) -> np.ndarray | None:
        """The label map on disk when it is up to date with the session's interactions."""
        return persist.load_labels(s.workdir, len(s.history()))

    def flush(self) -> None:
        """Every label map written behind is written now."""
        self.writer.flush()

    # --- engines ----------------------------------------------------------------------------------

    def free(self, s: Session) -> None:
        """Drops the engine of `s` (its slices, features and memory bank), keeping its state:
        the label map is written first. Call with `s.lock` held."""
        engine = s.engine
        if engine is None:
            return
        self.writer.forget(s.id)
        if self.stored_labels(s) is None:
            with self.compute:
                self._store_labels(s, engine.label_map())
        s.interactions = engine.interactions
        s.engine, s.image = None, None
        s.progress.update(done=0, total=0, running=False)

    def make_room(self, keep: Session | None = None) -> None:
        """Frees engines, least recently used first, until another session may have one; Busy
        when every live session is busy."""
        with self._lock:
            live = sorted((x for x in self._sessions.values() if x.live and x is not keep), key=lambda x: x.last_used)
        while len(live) >= self.max_live:
            for x in live:
                if not x.busy and x.lock.acquire(timeout=LOCK_WAIT_S):
                    try:
                        self.free(x)
                    finally:
                        x.lock.release()
                    live.remove(x)
                    break
            else:
                raise Busy(
                    f"all {self.max_live} live sessions are busy (--max-sessions {self.max_live}); "
                    "try again in a moment"
                )

    def expire(self) -> list[str]:
        """Frees the engines of sessions idle longer than idle_s (their state stays)."""
        now = time.monotonic()
        with self._lock:
            old = [x for x in self._sessions.values() if x.live and now - x.last_used > self.idle_s]
        freed = []
        for x in old:
            if not x.busy and x.lock.acquire(timeout=LOCK_WAIT_S):
                try:
                    self.free(x)
                    freed.append(x.id)
                finally:
                    x.lock.release()
        return freed

    def live_count(self) -> int:
        return sum(x.live for x in list(self._sessions.values()))

    def __len__(self):
        return len(self._sessions)

    def close(self):
        """At shutdown: every label map written; the state stays (a temporary root is removed)."""
        self._closed.set()
        self.writer.close()
        with self._lock:
            for x in self._sessions.values():
                x.engine = None
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


def autosave_path(source: Path) -> Path:
    """--autosave's file beside the input: NAME_labels.nii.gz (the page's Save writes the same; for a
    DICOM series folder or zip NAME, on the series' grid)."""
    return source.with_name(volume_stem(source) + "_labels.nii.gz")
