"""The segmentation engine behind the web app: one object per browser session.

`EngineFactory(checkpoint)` loads the model once; `factory()` returns a fresh engine for a
session: a safeclick_jax.volume_predictor.VolumePredictor (several objects, undo/redo, label
maps; see its docstring). Every engine shares the model's compiled steps, which do not depend on
the volume's size, so `warm_up` compiles once what every click and propagation of every session
uses.
"""

from __future__ import annotations

import numpy as np

from safeclick_jax.volume_predictor import VolumePredictor


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

    def __call__(self):
        return VolumePredictor(self.model, self.memory, self.description, fixed_memory_slots=True)

    def warm_up(self, progress=print) -> None:
        """Compiles every model step a session uses (on a small volume), so that no click or
        propagation of any volume waits for a compilation: a click on a slice not tracked yet and
        on a tracked one (one point: multimask; more points or a box: single mask), a mask
        prompt, committing prompts to memory and a tracking step."""
        e = self()
        progress("compiling the model (a minute on a small CPU)...")
        vol = np.zeros((32, 32, 4), np.float32)
        vol[8:24, 8:24, :] = 1.0
        e.set_volume(vol, axis=2)
        for t in (1, 2):  # slice 1 not tracked yet, slice 2 tracked by the propagation
            e.add_prompt(t, points=[[16, 16]], labels=[1], obj_id=1)
            e.add_prompt(t, points=[[12, 12]], labels=[0], obj_id=1)
            if t == 1:
                e.propagate()
        e.add_mask(0, vol[:, :, 0].T > 0, obj_id=2)
        e.label_map()
        progress("model compiled")
