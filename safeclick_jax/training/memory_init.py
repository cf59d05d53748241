"""The memory path (memory encoder, memory attention, object pointer heads, temporal encodings)
written into every training export, so any export is a complete model for volume propagation.

Tasks that do not train it carry it over unchanged from `init.memory_checkpoint`, else from
`init.checkpoint` (a converted SAM 2 keeps it in its model directory's `extra` item, torch-keyed);
without either (random-init runs: tests, the CPU demo) it is initialised from `init.seed`, with a
warning. A memory path taken from a model of another size (its image encoder differs, or its
arrays do not fit this model) is refused before training in one line.
"""

from __future__ import annotations

from flax import nnx, traverse_util

from safeclick_jax import checkpoint
from safeclick_jax.models.config import SAM2Config
from safeclick_jax.models.memory import MemoryConfig, SAM2Memory
from safeclick_jax.models.weight_map import WeightMapError, state_dict

FLAG = "--config.init.memory_checkpoint"


def _encoder_size(sam2: dict) -> tuple:
    h = sam2["hiera"]
    return (int(h["embed_dim"]), tuple(h["stages"]), int(sam2["d_model"]), int(sam2["mem_dim"]))


class MemorySource:
    """Where the export's memory path comes from; `check` (before training) and `extra` (at export)."""

    def __init__(self, where: str | None, flag: str, desc: dict | None, extra: dict | None, seed: int):
        self.where, self.flag, self.desc, self._extra, self.seed = where, flag, desc, extra, seed

    def check(self, cfg: SAM2Config) -> None:
        """ModelDirError (one line) when the memory path does not belong to a model of cfg's size."""
        if self.where is None:
            mem = SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(self.seed))
            self._extra = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in state_dict(mem).items()})
            return
        theirs, ours = _encoder_size(self.desc["sam2"]), _encoder_size(cfg.to_dict())
        if theirs != ours or self.desc["sam2"]["version"] != cfg.version:
            raise checkpoint.ModelDirError(
                f"{self.flag}={self.where}: its memory path belongs to {self.desc['sam2']['name']} "
                f"({self.desc['sam2']['version']}, Hiera embed_dim/stages, d_model, mem_dim {theirs}), this model is "
                f"{cfg.name} ({cfg.version}, {ours}): pass a converted SAM 2 of the same size with {FLAG}"
            )
        try:
            SAM2Memory.from_extra(cfg, self._extra, where=self.where)
        except WeightMapError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise checkpoint.ModelDirError(
                f"{self.flag}={self.where}: its memory path does not fit {cfg.name} ({first[:200]}); "
                f"pass a converted SAM 2 of the same size with {FLAG}"
            ) from None

    def extra(self) -> dict:
        """The torch-keyed nested dict a model directory's `extra` item holds."""
        assert self._extra is not None, "check() first"
        return self._extra


def resolve(config, log) -> MemorySource:
    """The memory path of the config's export: init.memory_checkpoint, else init.checkpoint, else
    random from init.seed. ModelDirError (one line naming the flag) when the named directory has none."""
    init = config.init
    where, flag = init.memory_checkpoint, FLAG
    if not where:
        where, flag = init.checkpoint, "--config.init.checkpoint"
    if not where:
        log(
            f"memory path: RANDOM (init.seed {init.seed}), written into the export so volume propagation runs; "
            f"for a useful one pass a converted SAM 2 with {FLAG}"
        )
        return MemorySource(None, flag, None, None, int(init.seed))
    desc, _, extra = checkpoint.load(where)
    if not extra:
        raise checkpoint.ModelDirError(
            f"{flag}={where}: has no memory path (empty `extra`); pass a converted SAM 2 of the same size with {FLAG}"
        )
    log(f"memory path: carried over from {where} into the export")
    return MemorySource(where, flag, desc, extra, int(init.seed))
