"""The one model loader of the predictors, the evaluation, the CLIs and the web app
(inference/engines.py makes one engine per session from what it loads).

    m = load_model("ckpt/sam2.1_t")                                  # network + description
    m = load_model(export, memory_checkpoint="ckpt/sam2.1_t", memory="required")

A model directory (or a training workdir, whose export/ holds its latest model) holds the image
network and, for a converted SAM 2 checkpoint, SAM 2's memory path (memory encoder, memory
attention, object-pointer projections) in its `extra` tensors. Volume propagation needs that
memory path: `memory="required"` takes it from the directory, or from `memory_checkpoint` (e.g. the
SAM 2 base of a SafeClick export saved without it); a directory without it is refused with one
line naming the option to pass. `memory="untrained"` (the demo model of `make train`, trained from
scratch) uses SAM 2's memory modules at their initial weights and says so in `memory_note`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from safeclick_jax import checkpoint
from safeclick_jax.checkpoint import ModelDirError
from safeclick_jax.models import registry
from safeclick_jax.models.memory import MemoryConfig, SAM2Memory

MEMORY_MODES = ("none", "required", "untrained")
MEMORY_OPTION = "--memory-checkpoint DIR (Python: memory_checkpoint=DIR)"


@dataclasses.dataclass
class LoadedModel:
    network: nnx.Module  # SAM2Image or SafeClickModel with the directory's weights
    description: dict  # model.json (with the image size it was loaded at)
    directory: str  # the model directory it was loaded from (a workdir resolved to its export)
    extra: dict  # the directory's extra tensors (SAM 2's memory path of a converted checkpoint)
    memory: SAM2Memory | None = None  # the memory path (memory != "none")
    memory_note: str | None = None  # set when the memory path is untrained


def load_model(
    directory: str,
    image_size: int | None = None,
    memory_checkpoint: str | None = None,
    memory: str = "none",
    memory_option: str = MEMORY_OPTION,
) -> LoadedModel:
    """A model directory -> LoadedModel. `image_size` evaluates the model at another input size
    (only shapes computed from it change: the prompt-encoder grid, feature sizes, the Hiera
    position embedding is interpolated; no parameter shape depends on it). `memory`: "none",
    "required" or "untrained" (module docstring). ModelDirError (one line naming the directory and
    the cause) when a directory does not load; `memory_option` is the option that line names."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}: one of {', '.join(MEMORY_MODES)}")
    directory = checkpoint.resolve(directory)
    desc, params, extra = checkpoint.load(directory)
    desc = {**desc, "sam2": dict(desc["sam2"])}
    if image_size:
        desc["sam2"]["image_size"] = int(image_size)
    try:
        network = registry.build(desc, abstract=True)
    except (TypeError, KeyError, ValueError) as e:
        raise ModelDirError(f"{directory}: model.json does not describe a model ({e})") from None
    checkpoint.assign_params(network, params, where=directory)
    out = LoadedModel(network, desc, directory, extra)
    if memory == "none":
        return out
    where = directory
    if memory_checkpoint is not None:
        where = checkpoint.resolve(memory_checkpoint)
        _, _, mem_extra = checkpoint.load(where)
    else:
        mem_extra = extra
    if _has_tensors(mem_extra):
        out.memory = SAM2Memory.from_extra(network.cfg, mem_extra, where=where)
    elif memory == "untrained":
        # A model trained from scratch (the demo's `make train`) has no trained memory path:
        # propagation then runs with SAM 2's memory modules at their initial weights.
        out.memory = SAM2Memory(MemoryConfig.for_model(network.cfg), nnx.Rngs(0))
        out.memory_note = f"{where} has no memory path; propagation uses an untrained one"
    elif memory_checkpoint is not None:
        raise ModelDirError(
            f"{where}: has no memory/video tensors either; the memory checkpoint must be a converted SAM 2 "
            "model directory (python -m convert.sam2_to_flax)"
        )
    else:
        raise ModelDirError(
            f"{where}: has no memory/video tensors (SAM 2's memory path), which volume propagation needs; "
            f"take them from the model directory of its SAM 2 base with {memory_option}"
        )
    return out


def _has_tensors(tree) -> bool:
    if isinstance(tree, dict):
        return any(_has_tensors(v) for v in tree.values())
    return isinstance(tree, np.ndarray) or hasattr(tree, "shape")
