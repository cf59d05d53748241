"""Per-browser-tab sessions: one volume, one engine, its object list; freed after idle time."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from safeclick_jax.data.volume_file import VolumeError


class BadInput(ValueError):
    """A request the server refuses with 400 and this message."""


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
    engine: object
    name: str  # file name shown in the page
    path: Path  # the input file (in the session's folder for uploads, in --data-dir otherwise)
    image: nib.Nifti1Image
    workdir: Path
    source: Path | None  # the file in --data-dir it was opened from (for "save beside the input")
    axis: int = 2
    objects: dict = field(default_factory=dict)  # id -> {"name": str, "visible": bool}
    progress: dict = field(default_factory=lambda: {"done": 0, "total": 0, "running": False})
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> dict:
        zooms = self.image.header.get_zooms()[:3]
        return {
            "id": self.id,
            "name": self.name,
            "shape": [int(v) for v in self.image.shape[:3]],
            "spacing": [float(v) for v in zooms],
            "affine": np.asarray(self.image.affine).tolist(),
            "axis": self.axis,
            "normalization": self.engine.normalization,
            "num_slices": int(self.engine.num_slices),
            "encoding": self.encoding(),
            "objects": [{"id": k, **v} for k, v in sorted(self.objects.items())],
            "saveable": self.source is not None,
        }

    def encoding(self) -> dict:
        """Slices encoded so far of those encoded after opening (as many as the feature cache holds)."""
        info = self.engine.cache_info()
        return {"done": int(info["cached_slices"]), "total": int(min(self.engine.num_slices, info["capacity_slices"]))}

    def labels_image(self, hide=()) -> nib.Nifti1Image:
        """The label map with the input's affine and header (uint8, objects in `hide` set to 0)."""
        lab = self.engine.label_map()
        if hide:
            lab = np.where(np.isin(lab, list(hide)), 0, lab).astype(np.uint8)
        header = self.image.header.copy()
        header.set_data_dtype(np.uint8)
        out = type(self.image)(lab.astype(np.uint8), self.image.affine, header=header)
        out.header.set_slope_inter(1, 0)
        out.header["cal_min"], out.header["cal_max"] = 0, max(1, int(lab.max()))
        return out


class SessionStore:
    """Sessions by id; `expire()` frees those idle longer than `idle_s` (their engine and files)."""

    def __init__(self, idle_s: float = 1800.0, max_sessions: int = 8):
        self.idle_s, self.max_sessions = idle_s, max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.root = Path(tempfile.mkdtemp(prefix="safeclick_app_"))

    def new_workdir(self) -> tuple[str, Path]:
        sid = secrets.token_urlsafe(12)
        d = self.root / sid
        d.mkdir()
        return sid, d

    def add(self, s: Session) -> None:
        self.expire()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions.values(), key=lambda x: x.last_used)
                self._drop(oldest.id)
            self._sessions[s.id] = s

    def get(self, sid: str) -> Session | None:
        self.expire()
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None:
                s.last_used = time.monotonic()
            return s

    def delete(self, sid: str) -> bool:
        with self._lock:
            return self._drop(sid)

    def _drop(self, sid: str) -> bool:
        s = self._sessions.pop(sid, None)
        if s is None:
            return False
        s.engine = None  # the engine's slices, features and memory bank go with it
        shutil.rmtree(s.workdir, ignore_errors=True)
        return True

    def expire(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            old = [
                k for k, s in self._sessions.items() if now - s.last_used > self.idle_s and not s.progress["running"]
            ]
            for k in old:
                self._drop(k)
        return old

    def __len__(self):
        return len(self._sessions)

    def close(self):
        with self._lock:
            for k in list(self._sessions):
                self._drop(k)
        shutil.rmtree(self.root, ignore_errors=True)
