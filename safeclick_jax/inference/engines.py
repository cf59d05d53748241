"""One engine per session from a model loaded once (the web app's sessions; a session that is
freed drops its engine, and calling the factory again makes a fresh one).

    engines = EngineFactory("ckpt/sam2.1_t")   # or EngineFactory(load_model(...))
    p = engines()                              # a VolumePredictor
"""

from __future__ import annotations

import numpy as np

from safeclick_jax.inference.loader import LoadedModel, load_model
from safeclick_jax.inference.session import VolumePredictor


class EngineFactory:
    """A model loaded once; calling it makes one engine: a VolumePredictor holding one session's
    volume, features, objects and history. Every engine shares the model's weights and compiled
    steps (which do not depend on the volume's size); dropping an engine frees the rest, and
    calling the factory again makes a fresh one."""

    def __init__(self, model: LoadedModel | str, memory_checkpoint: str | None = None, memory: str = "required", **kw):
        """model: a LoadedModel, or a model directory loaded with `memory_checkpoint` / `memory`.
        kw: VolumePredictor options (fixed_memory_slots, cache_bytes, ...)."""
        if not isinstance(model, LoadedModel):
            model = load_model(model, memory_checkpoint=memory_checkpoint, memory=memory)
        if model.memory is None:
            raise ValueError(f"{model.directory}: loaded without its memory path (memory='none')")
        self.loaded, self.engine_options = model, kw
        self.name = str(model.description.get("kind", "model")) + ":" + model.directory
        self.memory_note = model.memory_note

    def __call__(self):
        m = self.loaded
        return VolumePredictor(m.network, m.memory, m.description, **self.engine_options)

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
