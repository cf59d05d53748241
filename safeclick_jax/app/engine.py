"""The segmentation engine behind the web app: one object per browser session.

`EngineFactory(checkpoint)` loads the model once; `factory()` returns a fresh engine for a
session with the interface of safeclick_jax.volume_predictor.VolumePredictor (several objects,
undo/redo, label maps; see its docstring). Sessions share the compiled steps: the predictor's
jit-compiled methods take `self` as a static argument, so engines that hash and compare equal by
their model graph reuse one compilation instead of compiling per session.

When the installed VolumePredictor tracks a single object only, `ReplayEngine` provides the
multi-object interface on top of it by replaying each object's interactions.
"""

from __future__ import annotations

import threading

import numpy as np

from safeclick_jax.volume_predictor import VolumePredictor


class SharedCompilePredictor(VolumePredictor):
    """A VolumePredictor whose jit cache key is the factory that made it (one model, one config),
    not its identity. `compile_key` is set before any compiled step runs."""

    def __init__(self, *args, compile_key=None, **kw):
        self.compile_key = compile_key
        super().__init__(*args, **kw)

    def __hash__(self):
        return hash((type(self), id(self.compile_key)))

    def __eq__(self, other):
        return type(other) is type(self) and other.compile_key is self.compile_key is not None


MULTI_OBJECT = hasattr(VolumePredictor, "object_ids")


class EngineFactory:
    """Loads a model directory once; calling it makes one engine (one session's state)."""

    def __init__(self, checkpoint: str, memory_checkpoint: str | None = None, memory_from_init: bool = False):
        from safeclick_jax.models.memory import MemoryConfig, SAM2Memory
        from safeclick_jax.models.registry import load_model

        self.model, self.description, extra = load_model(checkpoint)
        self.name = str(self.description.get("kind", "model")) + ":" + str(checkpoint)
        self.memory_note = None
        if memory_checkpoint is not None:
            _, _, extra = load_model(memory_checkpoint)
        if not extra and memory_from_init:
            from flax import nnx

            # A model trained from scratch (the demo's `make train`) has no trained memory path:
            # propagation then runs with SAM 2's memory modules at their initial weights.
            self.memory = SAM2Memory(MemoryConfig.for_model(self.model.cfg), nnx.Rngs(0))
            self.memory_note = f"{checkpoint} has no memory path; propagation uses an untrained one"
        else:
            self.memory = SAM2Memory.from_extra(self.model.cfg, extra, where=memory_checkpoint or checkpoint)
        self.compile_lock = threading.Lock()

    def __call__(self):
        p = SharedCompilePredictor(self.model, self.memory, self.description, compile_key=self)
        return p if MULTI_OBJECT else ReplayEngine(p)

    def warm_up(self, progress=print) -> None:
        """Compiles the steps once on a small volume so the first session answers quickly."""
        e = self()
        progress("compiling the model (first start only takes longest)...")
        vol = np.zeros((32, 32, 4), np.float32)
        vol[8:24, 8:24, :] = 1.0
        e.set_volume(vol, axis=2)
        e.add_prompt(1, points=[[16, 16]], labels=[1], obj_id=1)
        e.propagate()
        progress("model compiled")


class ReplayEngine:
    """The multi-object engine interface over a single-object VolumePredictor: each object's
    interactions are replayed on the one predictor whenever that object changes."""

    def __init__(self, predictor: VolumePredictor):
        self.p = predictor
        self._actions: dict[int, list] = {}  # object -> [("prompt", kw) | ("mask", ...) | ("propagate",)]
        self._masks: dict[int, np.ndarray] = {}  # object -> bool volume (input grid)
        self._history: list = []  # [(object, action)] for undo, in order
        self._redo: list = []

    def __getattr__(self, name):  # num_slices, slice_hw, voxel_to_slice, ...
        return getattr(self.p, name)

    def set_volume(self, volume, axis=2, **kw):
        self.p.set_volume(volume, axis=axis, **kw)
        self._shape = self.p._in_shape
        self._actions, self._masks, self._history, self._redo = {}, {}, [], []

    @property
    def object_ids(self) -> list[int]:
        return sorted(self._actions)

    def add_object(self, obj_id=None) -> int:
        if obj_id is None:
            obj_id = next(i for i in range(1, 256) if i not in self._actions)
        obj_id = int(obj_id)
        if not 1 <= obj_id <= 255:
            raise ValueError(f"object id {obj_id} outside 1..255")
        self._actions.setdefault(obj_id, [])
        self._masks.setdefault(obj_id, np.zeros(self._shape, bool))
        return obj_id

    def _check(self, obj_id):
        if obj_id not in self._actions:
            raise ValueError(f"unknown object id {obj_id}; objects are {self.object_ids}")

    def remove_object(self, obj_id):
        self._check(obj_id)
        del self._actions[obj_id], self._masks[obj_id]
        self._history = [h for h in self._history if h[0] != obj_id]
        self._redo = [h for h in self._redo if h[0] != obj_id]

    def reset_object(self, obj_id):
        self._check(obj_id)
        self._actions[obj_id] = []
        self._masks[obj_id] = np.zeros(self._shape, bool)

    def reset_all(self):
        for o in self.object_ids:
            self.reset_object(o)

    def _replay(self, actions, progress=None) -> np.ndarray:
        """Runs `actions` on a clean predictor; returns the object's bool volume."""
        self.p.reset_prompts()
        start = actions[0][1] if actions and actions[0][0] == "labels" else None
        mask = np.zeros(self._shape, bool) if start is None else start.copy()
        slices = {}
        for i, a in enumerate(actions):
            if a[0] == "prompt":
                slices[a[1]["slice_index"]] = self.p.add_prompt(**a[1])
            elif a[0] == "propagate":
                last = i == len(actions) - 1
                mask = self.p.propagate(progress=progress if last else None) > 0
                slices = {}
        for t, m in slices.items():
            mask = self._put_slice(mask, t, m)
        last = actions[-1] if actions else None
        self._last_slice = slices.get(last[1]["slice_index"]) if last and last[0] == "prompt" else None
        return mask

    def _put_slice(self, mask, t, m2d):
        sl = np.zeros((self.p.num_slices,) + tuple(self.p.slice_hw), np.uint8)
        sl[t] = m2d
        on_grid = self.p._to_input_grid(sl) > 0
        idx = np.zeros((self.p.num_slices,) + tuple(self.p.slice_hw), np.uint8)
        idx[t] = 1
        region = self.p._to_input_grid(idx) > 0
        out = mask.copy()
        out[region] = on_grid[region]
        return out

    def _apply(self, obj_id, actions, progress=None):
        mask = self._replay(actions, progress)
        self._actions[obj_id], self._masks[obj_id] = actions, mask

    def add_prompt(self, t, points=None, labels=None, box=None, obj_id=1, clear=False, return_logits=False):
        obj_id = self.add_object(obj_id) if obj_id not in self._actions else obj_id
        kw = dict(slice_index=int(t), points=points, labels=labels, box=box, clear=clear)
        actions = self._actions[obj_id] + [("prompt", kw)]
        self._apply(obj_id, actions)
        self._history.append((obj_id, ("prompt", kw)))
        self._redo = []
        return self._last_slice

    def propagate(self, obj_ids=None, progress=None, **_):
        todo = [o for o in (obj_ids or self.object_ids) if any(a[0] == "prompt" for a in self._actions.get(o, []))]
        if obj_ids:
            for o in obj_ids:
                self._check(o)
        if not todo:
            raise ValueError("no prompts to propagate: click on an object first")
        total = len(todo)
        for n, o in enumerate(todo):
            step = None
            if progress is not None:
                step = lambda d, tot, n=n: progress(n * tot + d, total * tot)
            self._apply(o, self._actions[o] + [("propagate",)], step)
            self._history.append((o, ("propagate",)))
        self._redo = []
        return self.label_map()

    def set_labels(self, label_map) -> list[int]:
        lab = np.asarray(label_map)
        if lab.shape != tuple(self._shape):
            raise ValueError(f"label map shape {lab.shape} differs from the volume's {tuple(self._shape)}")
        ids = [int(v) for v in np.unique(lab) if v != 0]
        if any(not 1 <= v <= 255 for v in ids):
            raise ValueError(f"label values must be integers in 0..255, got {ids}")
        self._actions, self._masks, self._history, self._redo = {}, {}, [], []
        for v in ids:
            self._actions[v] = [("labels", lab == v)]
            self._masks[v] = lab == v
        return ids

    def label_map(self) -> np.ndarray:
        out = np.zeros(self._shape, np.uint8)
        for o in self.object_ids:
            out[self._masks[o]] = o
        return out

    def object_mask(self, obj_id) -> np.ndarray:
        self._check(obj_id)
        return self._masks[obj_id].copy()

    def undo(self, obj_id=None) -> str:
        idx = [i for i, h in enumerate(self._history) if obj_id is None or h[0] == obj_id]
        if not idx:
            raise ValueError("nothing to undo" + (f" for object {obj_id}" if obj_id else ""))
        o, action = self._history.pop(idx[-1])
        acts = list(self._actions[o])
        acts.pop(max(i for i, a in enumerate(acts) if a is action))
        self._apply(o, acts)
        self._redo.append((o, action))
        return f"{action[0]} on object {o}"

    def redo(self, obj_id=None) -> str:
        idx = [i for i, h in enumerate(self._redo) if obj_id is None or h[0] == obj_id]
        if not idx:
            raise ValueError("nothing to redo" + (f" for object {obj_id}" if obj_id else ""))
        o, action = self._redo.pop(idx[-1])
        self.add_object(o)
        self._apply(o, self._actions[o] + [action])
        self._history.append((o, action))
        return f"{action[0]} on object {o}"
