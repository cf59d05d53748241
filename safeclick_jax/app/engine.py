"""The segmentation engine behind the web app: one object per browser session.

`EngineFactory(checkpoint)` loads the model once; `factory()` returns a fresh engine for a
session with the interface of safeclick_jax.volume_predictor.VolumePredictor (several objects,
undo/redo, label maps; see its docstring). Sessions share the compiled steps: the predictor's
jit-compiled methods take `self` as a static argument, so engines that hash and compare equal by
the factory that made them reuse one compilation instead of compiling per session.
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
        return p

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
