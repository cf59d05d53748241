"""Training checkpoints with orbax's CheckpointManager: WORKDIR/checkpoints/<step>/{state,meta}.

`state`: the TrainState pytree (trainable params, optimizer state, step, PRNG key), saved
asynchronously; `meta`: JSON with the step, epoch, the grain iterator state (so a restart reads
exactly the batches an uninterrupted run would), the best validation Dice so far and its step.
Kept: the last `keep` checkpoints plus the one with the best `val_dice` (orbax preservation
policies). orbax writes each step to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact and the partial one is ignored.

A checkpoint that is on disk but does not restore (a truncated or missing file, arrays of another
shape or dtype than the config's, unreadable metadata) is renamed to `<step>.damaged` (never
deleted) by `restore_newest`, which then tries the next older one. A save that fails (disk full,
permission denied, a file in the way) raises SaveError; the earlier checkpoints stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from safeclick_jax import parallel


class SaveError(RuntimeError):
    """A checkpoint could not be written; the checkpoints saved before it are intact."""


class NoCheckpointError(RuntimeError):
    """Checkpoints exist but none of them restores (all were moved aside as damaged)."""


def _one_line(e: BaseException) -> str:
    from safeclick_jax.checkpoint import describe_restore_error

    return describe_restore_error(e)


class Checkpointer:
    def __init__(self, directory, keep: int = 3, keep_best: bool = True):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise SaveError(f"{self.directory} is a file, not a folder: move it away (checkpoints are written there)")
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
        """Starts an asynchronous save; a failure (of this one or of the previous one, which
        finishes in the background) raises SaveError."""
        metrics = {"val_dice": float(val_dice)} if val_dice is not None else None
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=True,
            )
        except Exception as e:
            raise self._save_error(step, e) from None

    def _save_error(self, step, e: BaseException) -> SaveError:
        kept = sorted(s for s in self._steps_on_disk() if s != step)
        cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return SaveError(
            f"saving checkpoint step {step} to {self.directory} failed ({cause[:300]}); the earlier "
            f"checkpoints {kept} are intact. Free disk space or fix the folder's permissions, then "
            "restart with the same --workdir to resume"
        )

    def _steps_on_disk(self) -> list[int]:
        try:
            return [int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()]
        except OSError:
            return []

    def _check_shapes(self, step: int, like_state) -> None:
        """Raises ValueError naming the first array whose stored shape or dtype differs from the
        config's (orbax would cast dtypes silently)."""
        from safeclick_jax.checkpoint import quiet_orbax

        with quiet_orbax():
            md = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        # by name: orbax stores tuples / named tuples of optax states as lists / dicts
        name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
        stored = {name(p): m for p, m in jax.tree_util.tree_flatten_with_path(getattr(md, "tree", md))[0]}
        for path, x in jax.tree_util.tree_flatten_with_path(like_state)[0]:
            if name(path) not in stored:
                raise ValueError(f"array {name(path)} is not in the checkpoint (another model or config)")
            m = stored[name(path)]
            if tuple(m.shape) != tuple(x.shape) or np.dtype(m.dtype) != np.dtype(x.dtype):
                raise ValueError(
                    f"array {name(path)} is {np.dtype(m.dtype).name}{list(m.shape)}, the config needs "
                    f"{np.dtype(x.dtype).name}{list(x.shape)} (another model or config)"
                )

    def move_aside(self, step: int) -> Path:
        """Renames <step> to <step>.damaged (.damaged.1, ... when taken); process 0 renames."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.damaged"
        i = 0
        while dst.exists():
            i += 1
            dst = self.directory / f"{step}.damaged.{i}"
        if jax.process_index() == 0:
            src.rename(dst)
        parallel.sync(f"checkpoint_move_aside_{step}")
        self.manager.reload()
        return dst

    def restore_newest(self, like_state, log=print):
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        Each failing one is moved aside with a one-line message. Every process tries each restore
        and all take the same decision (a restore is collective). NoCheckpointError when
        checkpoints existed but none restored."""
        tried = []
        while True:
            steps = sorted(self.all_steps())
            # process 0's newest step on every process: each lists the directory on its own
            newest = parallel.agreed(steps[-1] if steps else -1)
            if newest < 0:
                break
            try:
                self._check_shapes(newest, like_state)
                state, meta = self.restore(newest, like_state)
                if int(meta.get("step", -1)) != newest or "data_iter" not in meta:
                    raise ValueError(f"meta names step {meta.get('step')} and data_iter={'data_iter' in meta}")
                cause = None
            except Exception as e:  # orbax/tensorstore: ValueError, OSError, KeyError, ...
                cause = _one_line(e)
            if parallel.all_true(cause is None):
                return newest, state, meta
            cause = cause or "it does not restore on another process"
            dst = self.move_aside(newest)
            tried.append(newest)
            log(f"checkpoint step {newest} does not restore ({cause}); moved to {dst}")
        if tried:
            raise NoCheckpointError(
                f"no checkpoint in {self.directory} restores (steps {tried} were moved aside as *.damaged). "
                f"To start afresh, use a new --workdir or move {self.directory} away; a *.damaged folder "
                "can be inspected or deleted by hand"
            )
        return None

    def restore(self, step: int, like_state):
        """(state with like_state's structure, shardings and dtypes, meta dict)."""
        from safeclick_jax.checkpoint import quiet_orbax

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        with quiet_orbax():
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        return out["state"], out["meta"]

    def wait(self, step: int | None = None):
        """Waits for the background save; SaveError (naming `step`) when it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step if step is not None else self.latest_step(), e) from None

    def close(self):
        self.wait()
        self.manager.close()
