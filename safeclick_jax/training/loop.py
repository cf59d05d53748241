"""`train(config, workdir)`: the whole run. train.py is a thin wrapper around it.

The run is a sequence of phases, each returning a named result the next ones take:

    _start      -> task.Env       compilation cache, distributed init, mesh, image size, batch;
                                  the task's bad-input checks (nothing is written before them),
                                  then the workdir, config.json and the data (generated +
                                  prepared when the embedded synthetic default is missing)
    task.build  -> task.Model     model (init checkpoint or random) split into trainable / frozen
    task.data   -> task.Data      training iterator, validation choice
    _schedule   -> Schedule       steps per epoch, total steps, evaluation and checkpoint periods
    _place      -> task.Placed    optimizer state, FSDP / replicated shardings on the devices
    task.steps  -> task.Steps     compiled train step and evaluation
    _resume     -> Resumed        newest checkpoint that restores (or step 0), data iterator state
    _loop       -> Trained        steps with progress lines, metrics.jsonl, TensorBoard,
                                  evaluation + checkpoint each epoch, NaN stop, preemption
    _export     -> dict           WORKDIR/export (and WORKDIR/best): complete models, the memory
                                  path included (task.export_model)
    _summarize  -> dict           curves PNG, WORKDIR/summary.json

The task (config.task.name; training/task.py) is the only part that differs between slice and
clip training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax

from safeclick_jax import compile_cache, parallel
from safeclick_jax.training import step as step_lib
from safeclick_jax.training import train_state as ts
from safeclick_jax.training.checkpointing import Checkpointer, NoCheckpointError, SaveError
from safeclick_jax.training.metrics import MetricsWriter, Progress, plot_curves, read_jsonl
from safeclick_jax.training.task import ConfigError, Data, Env, Model, Placed, Steps, Task

__all__ = ["train", "ensure_data", "ConfigError", "DivergenceError", "ResumeError", "Preempted", "SaveError"]


class DivergenceError(RuntimeError):
    """The loss (or gradient) became NaN/Inf; the workdir keeps the last good checkpoint."""


_DISTRIBUTED = False


def _log(*a):
    if jax.process_index() == 0:
        print(*a, flush=True)


def ensure_data(dc, log=_log) -> None:
    """Prepares data.cache_dir from data.roots when absent; generates the embedded synthetic
    dataset first when a root is data.synthetic_root and missing."""
    if (Path(dc.cache_dir) / "rois.npy").exists():
        return
    if jax.process_index() == 0:
        from safeclick_jax.data import prepare, write_synthetic

        synth = dc.synthetic_root
        for root in dc.roots:
            if not Path(root).exists():
                if synth and os.path.abspath(root) == os.path.abspath(synth):
                    kind = dc.synthetic_kind
                    log(f"data: generating the synthetic {kind} dataset ({dc.synthetic_volumes} volumes) in {root}")
                    write_synthetic(kind, root, num_volumes=dc.synthetic_volumes, seed=0)
                else:
                    raise FileNotFoundError(f"data.roots: {root} does not exist")
        log(f"data: preparing {list(dc.roots)} -> {dc.cache_dir}")
        prepare.prepare_dataset(list(dc.roots), dc.cache_dir, dc, progress=False)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare")


class ResumeError(RuntimeError):
    """Checkpoints exist in the workdir but none restores (they were moved aside)."""


class Preempted(RuntimeError):
    """SIGTERM (or JAX's multi-host preemption sync point): a checkpoint of the current step was saved."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}, checkpoint saved")
        self.step = step


class Preemption:
    """Did the scheduler ask this job to stop? One process: a SIGTERM handler sets a flag. Several
    processes: JAX's preemption sync point when the preemption service runs (it catches SIGTERM
    and picks the same step on every process), else the flag of any process (a collective per
    step). The previous SIGTERM handler is restored by close()."""

    def __init__(self):
        import signal

        self.flag = False
        self.sync_point = False
        self._previous = None
        if jax.process_count() > 1:
            from jax._src import distributed

            self.sync_point = distributed.global_state.preemption_sync_manager is not None
        if not self.sync_point:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.flag
        if self.sync_point:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return parallel.any_true(self.flag)

    def close(self):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Schedule(NamedTuple):
    steps_per_epoch: int
    total: int
    eval_every: int  # steps
    ckpt_every: int  # steps; <= 0: at evaluations only


class Resumed(NamedTuple):
    state: Any
    meta: dict  # step, epoch, data_iter, best_val_dice, best_step
    start: int  # the step the run continues after (0: a fresh run)


class Trained(NamedTuple):
    state: Any
    meta: dict
    loop_s: float


TASKS = ("slices", "clips")


def make_task(config, env: Env) -> Task:
    name = config.task.name
    if name == "slices":
        from safeclick_jax.training.slice_task import SliceTask

        return SliceTask(config, env)
    if name == "clips":
        from safeclick_jax.training.clip_task import ClipTask

        return ClipTask(config, env)
    raise ConfigError(f"task.name {name!r}: expected one of {TASKS}")


def train(config, workdir) -> dict:
    """The whole run (see the module docstring); raises DivergenceError, ResumeError, Preempted,
    checkpointing.SaveError or checkpoint.ModelDirError, which train.py turns into exit codes."""
    t_start = time.perf_counter()
    env, task = _start(config, workdir)
    model = task.build(_log)
    data = task.data(_log)
    sched = _schedule(config, env, data)
    optimizer, lr_schedule = task.optimizer(sched.total, _log)
    placed = _place(config, env, model, optimizer)
    graphdef = model.graphdef
    del model  # its params now live (placed on the devices) in placed.state
    steps = task.steps(graphdef, placed, optimizer, lr_schedule, data)
    ckpt = Checkpointer(
        env.workdir / "checkpoints", keep=int(config.checkpoint.keep), keep_best=bool(config.checkpoint.export_best)
    )
    resumed = _resume(ckpt, placed.state, data.iterator, env)
    writer = MetricsWriter(env.workdir, resume_step=resumed.start, enabled=env.main)
    preemption = Preemption()
    try:
        trained = _loop(config, env, sched, data, steps, ckpt, writer, resumed, placed.frozen, preemption)
    finally:
        preemption.close()
    export = _export(config, env, task, graphdef, trained, placed.frozen, ckpt, sched.total)
    writer.close()
    return _summarize(config, env, sched, data, resumed.start, trained, export, t_start)


def _start(config, workdir) -> tuple[Env, Task]:
    """Compilation cache, distributed init, mesh, image size, precision and batch; the task's
    checks of its inputs; then (nothing is written before) the workdir, config.json and the data."""
    global _DISTRIBUTED
    compile_cache.enable(config.compilation_cache_dir)
    if not _DISTRIBUTED:
        _DISTRIBUTED = parallel.maybe_initialize_distributed(_log) or True
    mesh = parallel.make_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    _log(
        f"devices: {n_dev} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{n_proc} process(es); mesh {dict(mesh.shape)}"
    )
    from safeclick_jax.models.config import get_config as sam2_get
    from safeclick_jax.training import model_init

    image_size, why = model_init.resolve_image_size(config, sam2_get(config.model.name))
    _log(f"image_size: {image_size} px ({why})")
    cdt = step_lib.compute_dtype(config)  # validates train.compute_dtype before any heavy work
    _log(
        f"precision: {cdt.name} compute"
        + (", float32 master weights, optimizer and loss" if cdt.name != "float32" else "")
    )
    gbs = int(config.data.batch_size)
    if gbs % n_dev or gbs % n_proc:
        raise ValueError(f"data.batch_size={gbs} must be a multiple of the device count {n_dev}")
    env = Env(Path(workdir), jax.process_index() == 0, mesh, n_dev, n_proc, image_size, gbs, gbs // n_proc)
    task = make_task(config, env)
    task.check(_log)
    env.workdir.mkdir(parents=True, exist_ok=True)
    if env.main:
        (env.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    ensure_data(config.data)
    return env, task


def _schedule(config, env: Env, data: Data) -> Schedule:
    spe = int(config.train.steps_per_epoch)
    if spe <= 0:
        spe = data.n_train // env.local_batch
    if spe <= 0:
        raise ValueError(f"{data.n_train} training {data.unit} per process < batch {env.local_batch}")
    total = int(config.train.total_steps)
    if total <= 0:
        epochs, why_epochs = ts.resolve_epochs(config)
        _log(f"epochs: {epochs} ({why_epochs})")
        total = epochs * spe
    val_what = {"val": "val", "holdout": "held-out val"}.get(data.val_source, "no val")
    _log(
        f"schedule: {total} steps = {total / spe:g} epochs x {spe} steps, global batch {env.global_batch} "
        f"({env.local_batch} per process), {data.n_train * env.n_proc} train / {data.n_val} {val_what} {data.unit}"
    )
    return Schedule(spe, total, max(int(config.eval.every_epochs), 1) * spe, int(config.checkpoint.every_steps))


def _place(config, env: Env, model: Model, optimizer) -> Placed:
    """The train state (params, optimizer state, step, PRNG key) and the frozen weights on the
    devices, replicated or FSDP-split (parallel.param_sharding)."""
    state = ts.init_state(model.params, optimizer, int(config.train.seed))
    fsdp, min_size = bool(config.train.fsdp), int(config.train.fsdp_min_size)
    state_sharding = parallel.param_sharding(env.mesh, state, fsdp, min_size)
    frozen_sharding = parallel.param_sharding(env.mesh, model.frozen, fsdp, min_size)
    if fsdp:
        parts = (("train state", state_sharding, state), ("frozen weights", frozen_sharding, model.frozen))
        for name, sh, tree in parts:
            n_split, n_arrays, frac = parallel.sharded_fraction(sh, tree)
            _log(
                f"fsdp: {name}: {n_split} of {n_arrays} arrays split over {env.mesh.shape[parallel.DATA_AXIS]} "
                f"devices, {100 * frac:.0f}% of a replica per device"
            )
    return Placed(
        jax.device_put(state, state_sharding),
        jax.device_put(model.frozen, frozen_sharding),
        state_sharding,
        frozen_sharding,
    )


def _resume(ckpt: Checkpointer, state, iterator, env: Env) -> Resumed:
    """The newest checkpoint that restores (damaged ones are moved aside) and the data iterator
    with it; every process takes the same decision."""
    meta = {"step": 0, "epoch": 0, "best_val_dice": None, "best_step": None}
    try:
        found = ckpt.restore_newest(state, log=_log)
    except NoCheckpointError as e:
        raise ResumeError(str(e)) from None
    if found is None:
        return Resumed(state, meta, 0)
    _, state, meta = found
    iterator.set_state(meta["data_iter"])
    start = int(meta["step"])
    _log(f"resumed from {env.workdir / 'checkpoints'} step {start} (best val Dice so far {meta['best_val_dice']})")
    return Resumed(state, meta, start)


def _loop(config, env: Env, sched: Schedule, data: Data, steps: Steps, ckpt, writer, resumed: Resumed, frozen,
          preemption: Preemption) -> Trained:  # fmt: skip
    """Steps start+1 .. total with progress lines, evaluation and checkpoints."""
    total, spe = sched.total, sched.steps_per_epoch
    log_every = max(int(config.train.log_every), 1)
    delay = float(config.debug.step_delay_s)
    progress = Progress(total, resumed.start, env.global_batch, _log)
    meta, state = dict(resumed.meta), resumed.state

    def save(step_no, val=None):
        meta.update(step=step_no, epoch=step_no // spe, data_iter=data.iterator.get_state())
        if data.val_source is None:  # no validation: the newest checkpoint is the best
            meta.update(best_step=step_no)
        ckpt.save(step_no, state, dict(meta), val)

    pending = None  # metrics of the previous step, read one step late so the host never stalls the device

    def check(p):
        s, m = p
        m = jax.device_get(m)
        if not bool(m["finite"]):
            ckpt.wait()
            good = ckpt.latest_step()
            writer.close()
            raise DivergenceError(
                f"loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}: training "
                f"stopped. The last good checkpoint is step {good} in {env.workdir / 'checkpoints'} "
                f"(restarting resumes from it; lower --config.optim.lr or check the data)"
            )
        if s % log_every == 0 or s == total:
            sps, ips = progress.rates(s)
            epoch = (s - 1) // spe + 1
            _log(progress.line(s, epoch, m, sps))
            row = {k: float(m[k]) for k in steps.log_keys}
            writer.write({"step": s, "epoch": epoch, **row, "steps_per_s": sps, "images_per_s": ips})

    t_loop = time.perf_counter()
    for s in range(resumed.start + 1, total + 1):
        state, m = steps.train(state, frozen, next(data.iterator))
        if delay > 0:
            time.sleep(delay)
        if pending is not None:
            check(pending)
        pending = (s, m)
        at_eval = s % sched.eval_every == 0 or s == total
        at_ckpt = at_eval or (sched.ckpt_every > 0 and s % sched.ckpt_every == 0)
        stop = preemption.reached(s) and s < total
        if at_ckpt or stop:
            check(pending)
            pending = None
        if at_eval and steps.evaluate is not None:
            val = _validate(env, sched, data, steps, writer, s, state, frozen, meta)
            save(s, val)
        elif at_ckpt or stop:
            save(s)
        if stop:
            ckpt.wait(s)
            writer.close()
            raise Preempted(s)
    if pending is not None:
        check(pending)
    loop_s = time.perf_counter() - t_loop
    ckpt.wait()
    return Trained(state, meta, loop_s)


def _validate(env: Env, sched: Schedule, data: Data, steps: Steps, writer, s: int, state, frozen, meta) -> float:
    """Evaluates, logs and records step s; updates meta's best; returns the val Dice."""
    t_eval = time.perf_counter()
    val = steps.evaluate(state["params"], frozen)
    epoch = s // sched.steps_per_epoch
    if meta["best_val_dice"] is None or val["val_dice"] > meta["best_val_dice"]:
        meta.update(best_val_dice=val["val_dice"], best_step=s)
    flag = " on the training hold-out" if data.val_source == "holdout" else ""
    details = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" if isinstance(v, float) else f"{k.removeprefix('val_')} {v}"
                        for k, v in val.items() if k != "val_dice")  # fmt: skip
    _log(
        f"eval step {s} epoch {epoch}: val Dice{flag} {val['val_dice']:.4f} ({details}; "
        f"{time.perf_counter() - t_eval:.1f} s)"
    )
    writer.write({"step": s, "epoch": epoch, **val, "val_source": data.val_source}, prefix="val")
    return val["val_dice"]


def _export(config, env: Env, task: Task, graphdef, trained: Trained, frozen, ckpt: Checkpointer, total: int) -> dict:
    """WORKDIR/export (final model) and WORKDIR/best (best by val Dice, or the last without
    validation), each a complete model: the task's memory path goes into its `extra` item. Every
    process takes part: gathering FSDP-split weights and orbax saves/restores are collective
    (process 0 writes the files)."""
    from safeclick_jax.models.registry import save_model

    meta = trained.meta
    frozen_host = parallel.to_host(frozen)
    # the intensity mapping of the training data, which VolumePredictor.set_volume's 'auto' applies
    data = {
        "normalization": str(config.data.normalization),
        "percentiles": [float(p) for p in config.data.percentiles],
        "ct_window": [float(v) for v in config.data.ct_window],
    }

    def write(name, state, training):
        model, extra = task.export_model(graphdef, parallel.to_host(state["params"]), frozen_host)
        try:
            save_model(str(env.workdir / name), model, extra=extra, training=training)
        except OSError as e:
            raise SaveError(f"writing the model to {env.workdir / name} failed ({type(e).__name__}: {e})") from None
        return str(env.workdir / name)

    training = {"step": total, "config": config.model.name, "image_size": env.image_size, "task": task.name}
    export = {"final": write("export", trained.state, {**training, "data": data})}
    best_step = meta["best_step"]
    if config.checkpoint.export_best and best_step is not None:
        best_state = None
        if best_step == total:
            best_state = trained.state
        elif parallel.agreed(best_step in ckpt.all_steps()):
            try:
                ckpt._check_shapes(best_step, trained.state)
                best_state, _ = ckpt.restore(best_step, trained.state)
                cause = None
            except Exception as e:
                from safeclick_jax.checkpoint import describe_restore_error

                cause = describe_restore_error(e)
            if not parallel.agreed(cause is None):
                dst = ckpt.move_aside(best_step)
                _log(f"best checkpoint step {best_step} does not restore ({cause}); moved to {dst}; no best/ written")
                best_state = None
        if best_state is not None:
            export["best"] = write(
                "best", best_state, {**training, "step": best_step, "val_dice": meta["best_val_dice"], "data": data}
            )
    ckpt.close()
    return export


def _summarize(config, env: Env, sched: Schedule, data: Data, start: int, trained: Trained, export: dict,
               t_start: float) -> dict:  # fmt: skip
    """curves.png, WORKDIR/summary.json and the final line."""
    meta, total, loop_s = trained.meta, sched.total, trained.loop_s
    png = plot_curves(env.workdir / "metrics.jsonl", env.workdir / "curves.png") if env.main and config.plot else None
    rows = [r for r in read_jsonl(env.workdir / "metrics.jsonl") if "val_dice" in r]
    summary = {
        "task": config.task.name,
        "steps": total,
        "resumed_from": start,
        "image_size": env.image_size,
        "global_batch": env.global_batch,
        "devices": env.n_dev,
        "processes": env.n_proc,
        "loop_seconds": loop_s,
        "steps_per_s": (total - start) / max(loop_s, 1e-9),
        "wall_seconds": time.perf_counter() - t_start,
        "val_source": data.val_source,
        "val_dice_first": rows[0]["val_dice"] if rows else None,
        "val_dice_last": rows[-1]["val_dice"] if rows else None,
        "best_val_dice": meta["best_val_dice"],
        "best_step": meta["best_step"],
        "export": export,
        "curves": str(png) if png else None,
    }
    if env.main:
        (env.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(
        f"done: {total} steps in {loop_s:.1f} s ({summary['steps_per_s']:.2f} steps/s); val Dice "
        f"{summary['val_dice_first']} -> {summary['val_dice_last']}; model in {export['final']}"
    )
    return summary
