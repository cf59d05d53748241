"""Interactive 3D inference: the volume engine and what it is built from.

    from safeclick_jax.inference import VolumePredictor, load_model

- session.py: VolumePredictor, one volume's objects, prompts, memory and label maps;
- geometry.py: voxel <-> slice-image coordinates (RAS reorientation, boxes);
- steps.py: the compiled model steps, shared by every session of a model (`compile_counts`);
- history.py: each object's state and its undo / redo;
- prompts.py: one slice's clicks, box or mask, checked (where new kinds of prompt go);
- interactions.py: a session's calls as JSON, replayed by VolumePredictor.replay;
- loader.py: the one model loader (`load_model`);
- engines.py: `EngineFactory`, a model loaded once and one engine per session (the web app);
- limits.py: MAX_OBJECT_ID.

Volume files are read by safeclick_jax.data.volume_file.read_volume. Names are imported on first
use, so `from safeclick_jax.inference.limits import MAX_OBJECT_ID` does not import JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "VolumePredictor": "session",
    "ObjectState": "history",
    "SliceGeometry": "geometry",
    "voxel_index": "geometry",
    "compile_counts": "steps",
    "load_model": "loader",
    "LoadedModel": "loader",
    "EngineFactory": "engines",
    "MAX_OBJECT_ID": "limits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
