"""A session's state on disk, so that no work is lost to a reload, an idle timeout, the cap on
live sessions or a server restart (docs/app.md, "Sessions and state").

One folder per session under --state-dir, two files, each replaced atomically (written to a
temporary file in the same folder, flushed, then renamed over the old one):

- state.json, rewritten after every change: the volume reference (path and SHA-256 of the file),
  how it was opened (axis, normalization), the objects with their names and visibility, and the
  engine's interactions (inference/interactions.py: every call that changed the objects, as
  JSON; VolumePredictor.replay rebuilds the objects, their undo / redo histories and the label
  map from them exactly). New kinds of prompt serialise themselves there; nothing here knows them.
- labels.npz: the label map and the number of interactions it reflects. Composing the whole
  label map costs up to a second on a large volume, so it is written behind the interactions
  (`LabelWriter`, once a session has been quiet for a moment, and always before its engine is
  freed); one that lags behind state.json is not used (the session replays instead).

An upload is kept in the session's folder (input.nii / input.nii.gz); a volume of --data-dir is
referenced by its path.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DEFAULT_STATE_DIR = "~/.cache/safeclick_jax/sessions"
FORMAT = 1  # state.json's layout
STATE, LABELS = "state.json", "labels.npz"
log = logging.getLogger("safeclick_jax.app")


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds either its old or its new content, never a part (a crash, kill -9 or full
    disk in between leaves the old one)."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checksum(path: Path) -> str:
    """SHA-256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_state(folder: Path, state: dict) -> None:
    write_atomic(folder / STATE, json.dumps({"format": FORMAT, **state}, separators=(",", ":")).encode())


def load_state(folder: Path) -> dict:
    """state.json of a session folder; ValueError naming the file when it is not one we wrote."""
    path = folder / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable session state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a session state of format {FORMAT}")
    return state


def save_labels(folder: Path, labels: np.ndarray, interactions: int) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels.astype(np.uint8), interactions=np.int64(interactions))
    write_atomic(folder / LABELS, buf.getvalue())


def load_labels(folder: Path, interactions: int) -> np.ndarray | None:
    """The stored label map when it reflects exactly `interactions` interactions, else None."""
    try:
        with np.load(folder / LABELS) as z:
            if int(z["interactions"]) == interactions:
                return z["labels"]
    except (OSError, ValueError, KeyError):
        pass
    return None


class LabelWriter:
    """A thread that writes sessions' label maps behind their interactions: `touch(key, write)`
    schedules `write()` for when `key` has seen no new touch for `quiet_s` seconds; `flush(key)`
    runs a pending write now (None: every pending one). A failed write is logged; the
    interactions on disk still restore the session."""

    def __init__(self, quiet_s: float):
        self.quiet_s = quiet_s
        self._pending: dict = {}  # key -> (time of the last touch, write)
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, daemon=True, name="label-writer").start()

    def touch(self, key, write) -> None:
        with self._cond:
            self._pending[key] = (time.monotonic(), write)
            self._cond.notify()

    def forget(self, key) -> None:
        with self._cond:
            self._pending.pop(key, None)

    def flush(self, key=None) -> None:
        with self._cond:
            keys = list(self._pending) if key is None else [key]
            writes = [self._pending.pop(k)[1] for k in keys if k in self._pending]
        for write in writes:
            self._write(write)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [k for k, (t, _) in self._pending.items() if now - t >= self.quiet_s]
                writes = [self._pending.pop(k)[1] for k in due]
                if not writes:
                    first = min((t for t, _ in self._pending.values()), default=None)
                    self._cond.wait(None if first is None else max(0.01, first + self.quiet_s - now))
                    continue
            for write in writes:
                self._write(write)

    @staticmethod
    def _write(write):
        try:
            write()
        except Exception:
            log.exception("writing a label map failed")
