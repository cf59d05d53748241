"""A session's interactions as JSON: what a session is, without its device arrays.

Every call that changes a VolumePredictor's objects appends `{"call": name, "args": {...}}` to
`VolumePredictor.interactions` once it succeeded (a refused call adds nothing); the arguments are
what the call received, resolved (a label map file as its array, a new object's id as chosen).
`VolumePredictor.replay(entries)` applies them to a session on the same volume: the engine is
deterministic, so the objects, their undo / redo histories and the label map come back equal
(tests/test_interactive.py). Arrays are stored as base64 of their zlib-compressed bytes.

Each kind of prompt (click or box, mask, scribble, lasso) is a VolumePredictor method that
records itself with its own arguments (a scribble's stroke, a lasso's contour, not what they
became), listed in RECORDED.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

RECORDED = (
    "add_object",
    "remove_object",
    "reset_object",
    "reset_all",
    "add_prompt",
    "add_mask",
    "add_scribble",
    "add_lasso",
    "set_labels",
    "propagate",
    "undo",
    "redo",
)


def to_json(value):
    """Arguments -> JSON-able values (numpy arrays as {"array", "dtype", "shape"})."""
    if isinstance(value, np.ndarray):
        data = base64.b64encode(zlib.compress(np.ascontiguousarray(value).tobytes(), 1)).decode("ascii")
        return {"array": data, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def from_json(value):
    """Inverse of to_json."""
    if isinstance(value, dict) and set(value) == {"array", "dtype", "shape"}:
        raw = zlib.decompress(base64.b64decode(value["array"]))
        return np.frombuffer(raw, np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if isinstance(value, dict):
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def check_entry(entry, index: int) -> tuple[str, dict]:
    """(call, args) of one entry; ValueError naming the entry when it is not a recorded call."""
    if not isinstance(entry, dict) or not isinstance(entry.get("args"), dict) or entry.get("call") not in RECORDED:
        shown = entry.get("call") if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"interaction {index}: {shown!r} is not a recorded call ({', '.join(RECORDED)})")
    return entry["call"], from_json(entry["args"])
