"""Training checkpoints with orbax's CheckpointManager: WORKDIR/checkpoints/<step>/{state,meta}.

`state`: the TrainState pytree (trainable params, optimizer state, step, PRNG key), saved
asynchronously; `meta`: JSON with the step, epoch, the grain iterator state (so a restart reads
exactly the batches an uninterrupted run would), the best validation Dice so far and its step.
Kept: the last `keep` checkpoints plus the one with the best `val_dice` (orbax preservation
policies). orbax writes each step to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact and the partial one is ignored.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


class Checkpointer:
    def __init__(self, directory, keep: int = 3, keep_best: bool = True):
        self.directory = Path(directory).absolute()
        policies = [pp.LatestN(n=keep)]
        if keep_best:  # BestN sorts ascending and keeps the last n: the highest Dice
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m["val_dice"], reverse=False, n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies), cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, val_dice: float | None = None) -> None:
        metrics = {"val_dice": float(val_dice)} if val_dice is not None else None
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, like_state):
        """(state with like_state's structure, shardings and dtypes, meta dict)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
