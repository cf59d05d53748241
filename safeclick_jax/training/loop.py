"""`train(config, workdir)`: the whole run. train.py is a thin wrapper around it.

Order of work: persistent compilation cache, distributed init, data (generated + prepared when the
embedded synthetic default is missing), model (init checkpoint or random), embedding cache,
restore of the latest checkpoint, the step loop (progress lines, metrics.jsonl, TensorBoard),
evaluation + checkpoint each epoch, final export to WORKDIR/export (and WORKDIR/best), curves PNG,
WORKDIR/summary.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from safeclick_jax import compile_cache, parallel
from safeclick_jax.data import pipeline
from safeclick_jax.training import embedding_cache, model_init
from safeclick_jax.training import step as step_lib
from safeclick_jax.training import train_state as ts
from safeclick_jax.training.checkpointing import Checkpointer, NoCheckpointError, SaveError
from safeclick_jax.training.metrics import MetricsWriter, Progress, plot_curves, read_jsonl


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
        from safeclick_jax.data import prepare, synthetic, synthetic_abdomen

        synth = dc.get("synthetic_root")
        for root in dc.roots:
            if not Path(root).exists():
                if synth and os.path.abspath(root) == os.path.abspath(synth):
                    kind = dc.get("synthetic_kind", "smoke")
                    gen = {"smoke": synthetic, "abdomen": synthetic_abdomen}.get(kind)
                    if gen is None:
                        raise ValueError(f"data.synthetic_kind: {kind!r} is none of 'smoke', 'abdomen'")
                    log(f"data: generating the synthetic {kind} dataset ({dc.synthetic_volumes} volumes) in {root}")
                    gen.write_dataset(root, num_volumes=dc.synthetic_volumes, seed=0)
                else:
                    raise FileNotFoundError(f"data.roots: {root} does not exist")
        log(f"data: preparing {list(dc.roots)} -> {dc.cache_dir}")
        prepare.prepare_dataset(list(dc.roots), dc.cache_dir, dc, progress=False)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare")


def _eval_batches(cache_dir, image_size, local_bs, seed, max_rois, n_val, rows=None):
    """(dataset, number of batches every process runs): the same count on all processes."""
    ds = pipeline.make_eval_dataset(
        cache_dir, "val", image_size=image_size, batch_size=local_bs, seed=seed, include_image=False, rows=rows
    )
    items = n_val * 10 if max_rois < 0 else min(n_val, max_rois) * 10
    per_process = -(-items // jax.process_count())
    return ds, -(-per_process // local_bs)


def evaluate(eval_step, params, frozen, mesh, cache, ds, n_batches) -> dict:
    tot = None
    it = iter(ds)
    template = None
    for _ in range(n_batches):
        try:
            b = next(it)
            template = b
        except StopIteration:  # this process has fewer items: an all-padding batch
            b = {k: np.zeros_like(v) for k, v in template.items()}
        hb = step_lib.host_batch(b, cache, strict=False)
        out = jax.device_get(eval_step(params, frozen, parallel.global_batch(hb, mesh)))
        tot = out if tot is None else {k: tot[k] + out[k] for k in tot}
    r = lambda s, c: float(tot[s] / tot[c]) if tot[c] > 0 else float("nan")
    return {
        "val_dice": r("dice_sum", "count"),
        "val_dice_point": r("point_sum", "point_count"),
        "val_dice_box": r("box_sum", "box_count"),
        "val_samples": int(tot["count"]),
    }


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
        from jax.experimental import multihost_utils

        if self.sync_point:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))

    def close(self):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def train(config, workdir) -> dict:
    """The whole run (see the module docstring); raises DivergenceError, ResumeError, Preempted,
    checkpointing.SaveError or checkpoint.ModelDirError, which train.py turns into exit codes."""
    t_start = time.perf_counter()
    run = _start(config, workdir)
    _build(run)
    _plan(run)
    _resume(run)
    preemption = Preemption()
    try:
        loop_s = _loop(run, preemption)
    finally:
        preemption.close()
    export = _export(run)
    return _summarize(run, loop_s, export, t_start)


class _Run:
    """What the steps of `train` share (one object instead of a dozen locals)."""

    def __init__(self, config, workdir):
        self.config, self.workdir = config, Path(workdir)
        self.main = jax.process_index() == 0


def _start(config, workdir) -> _Run:
    """Compilation cache, distributed init, workdir, mesh, data, image size and precision."""
    global _DISTRIBUTED
    compile_cache.enable(config.get("compilation_cache_dir", ""))
    if not _DISTRIBUTED:
        _DISTRIBUTED = parallel.maybe_initialize_distributed(_log) or True
    run = _Run(config, workdir)
    run.workdir.mkdir(parents=True, exist_ok=True)
    if run.main:
        (run.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    run.mesh = parallel.make_mesh()
    run.n_dev, run.n_proc = jax.device_count(), jax.process_count()
    _log(
        f"devices: {run.n_dev} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{run.n_proc} process(es); mesh {dict(run.mesh.shape)}"
    )
    run.dc = dc = config.data
    ensure_data(dc)
    from safeclick_jax.models.config import get_config as sam2_get

    run.image_size, why = model_init.resolve_image_size(config, sam2_get(config.model.name))
    _log(f"image_size: {run.image_size} px ({why})")
    cdt = step_lib.compute_dtype(config)  # validates train.compute_dtype before any heavy work
    _log(
        f"precision: {cdt.name} compute"
        + (", float32 master weights, optimizer and loss" if cdt.name != "float32" else "")
    )
    run.gbs = int(dc.batch_size)
    if run.gbs % run.n_dev or run.gbs % run.n_proc:
        raise ValueError(f"data.batch_size={run.gbs} must be a multiple of the device count {run.n_dev}")
    run.lbs = run.gbs // run.n_proc
    _choose_validation(run)
    return run


def _choose_validation(run: _Run) -> None:
    """run.train_rows / run.val_rows (None: the splits as prepared) and run.val_source. An empty
    validation split is reported at once and handled as config.eval.when_no_val says."""
    ec = run.config.eval
    data_cache = pipeline.Cache(run.dc.cache_dir)
    counts = data_cache.split_counts()
    run.train_rows = run.val_rows = None
    run.val_source = "val"
    if counts["train"] == 0:
        raise ValueError(f"{run.dc.cache_dir}: the train split has no ROI (ROIs per split: {counts})")
    if counts["val"] > 0:
        return
    mode = ec.get("when_no_val", "holdout")
    if mode not in ("holdout", "none"):
        raise ValueError(f"eval.when_no_val={mode!r}: expected 'holdout' or 'none'")
    msg = f"data: the validation split is empty (ROIs per split: {counts})"
    if mode == "holdout":
        rows = data_cache.split_rois("train")
        held = pipeline.holdout_rows(rows, float(ec.get("holdout_fraction", 0.2)))
        if held.any():
            run.train_rows, run.val_rows, run.val_source = rows[~held], rows[held], "holdout"
            _log(
                f"{msg}: validating on a HOLD-OUT of the training volumes ({int(held.sum())} ROIs on the last "
                f"{float(ec.holdout_fraction):g} of each volume's slices, not trained on; val rows of "
                "metrics.jsonl say val_source=holdout). --config.eval.when_no_val=none trains without validation"
            )
            return
        msg += "; no volume has two slices to hold one out"
    run.val_source = None
    _log(f"{msg}: training WITHOUT validation, the last checkpoint is kept as the best")


def _build(run: _Run) -> None:
    """Model (init checkpoint or random), its trainable/frozen split and the embedding cache."""
    config = run.config
    t0 = time.perf_counter()
    model = model_init.build_model(config, run.image_size, _log)
    run.graphdef, run.params, run.frozen = ts.split_model(model, config)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.frozen))
    _log(
        f"model: {config.model.kind} on {config.model.name} ({time.perf_counter() - t0:.1f} s to build): "
        f"{n_train:,} trainable / {n_frozen:,} frozen parameters"
    )
    use_block = config.model.kind == "safeclick" and config.model.safeclick.use_e1
    run.keep_block = model.keep_block if use_block else None
    run.cache = None
    if config.embed.enabled:
        run.cache = embedding_cache.build(
            model,
            run.dc.cache_dir,
            run.image_size,
            run.keep_block,
            root=config.embed.root,
            batch_size=int(config.embed.batch_size),
            dtype=config.embed.dtype,
            log=_log,
        )


def _plan(run: _Run) -> None:
    """Schedule, optimizer, sharded train state, datasets, checkpointer and compiled steps."""
    config, dc, mesh = run.config, run.dc, run.mesh
    data_cache = pipeline.Cache(dc.cache_dir)
    train_rows = data_cache.split_rois("train") if run.train_rows is None else run.train_rows
    n_rois = len(train_rows) // run.n_proc
    run.n_val = (
        0 if run.val_source is None else len(data_cache.split_rois("val") if run.val_rows is None else run.val_rows)
    )
    spe = int(config.train.steps_per_epoch)
    if spe <= 0:
        spe = n_rois // run.lbs
    if spe <= 0:
        raise ValueError(f"{n_rois} training ROIs per process < batch {run.lbs}")
    run.steps_per_epoch = spe
    total = int(config.train.total_steps)
    if total <= 0:
        epochs, why_epochs = ts.resolve_epochs(config)
        _log(f"epochs: {epochs} ({why_epochs})")
        total = epochs * spe
    run.total = total
    run.eval_every = max(int(config.eval.every_epochs), 1) * spe
    run.ckpt_every = int(config.checkpoint.every_steps)
    val_what = {"val": "val", "holdout": "held-out val"}.get(run.val_source, "no val")
    _log(
        f"schedule: {total} steps = {total / spe:g} epochs x {spe} steps, "
        f"global batch {run.gbs} ({run.lbs} per process), {n_rois * run.n_proc} train / {run.n_val} {val_what} ROIs"
    )

    schedule = ts.learning_rate(config, total)
    if float(config.optim.head_lr_mult) != 1.0:
        _log(
            f"optimizer: SafeClick modules at {config.optim.head_lr_mult:g} x lr "
            f"({config.optim.head_warmup_steps} warm-up steps), SAM 2's decoder at lr {config.optim.lr:g}"
        )
    run.optimizer = ts.make_optimizer(config, total)
    state = ts.init_state(run.params, run.optimizer, int(config.train.seed))
    fsdp, min_size = bool(config.train.fsdp), int(config.train.fsdp_min_size)
    run.state_sharding = parallel.param_sharding(mesh, state, fsdp, min_size)
    frozen_sharding = parallel.param_sharding(mesh, run.frozen, fsdp, min_size)
    if fsdp:
        for name, sh, tree in (
            ("train state", run.state_sharding, state),
            ("frozen weights", frozen_sharding, run.frozen),
        ):
            n_split, n_arrays, frac = parallel.sharded_fraction(sh, tree)
            _log(
                f"fsdp: {name}: {n_split} of {n_arrays} arrays split over {mesh.shape[parallel.DATA_AXIS]} devices, "
                f"{100 * frac:.0f}% of a replica per device"
            )
    run.state = jax.device_put(state, run.state_sharding)
    run.frozen = jax.device_put(run.frozen, frozen_sharding)
    del run.params

    ds = pipeline.make_dataset_from_config(
        dc, "train", image_size=run.image_size, batch_size=run.lbs, include_image=run.cache is None, rows=run.train_rows
    )
    run.it = pipeline.make_iterator(ds, num_threads=int(dc.num_threads))
    run.ckpt = Checkpointer(
        run.workdir / "checkpoints", keep=int(config.checkpoint.keep), keep_best=bool(config.checkpoint.export_best)
    )
    run.train_step = step_lib.make_train_step(
        run.graphdef, run.optimizer, schedule, config, mesh, run.keep_block, run.state_sharding, frozen_sharding
    )
    run.eval_step = step_lib.make_eval_step(
        run.graphdef, config, mesh, run.keep_block, run.state_sharding["params"], frozen_sharding
    )
    run.eval_ds = run.eval_batches = None
    if run.val_source is not None:
        run.eval_ds, run.eval_batches = _eval_batches(
            dc.cache_dir,
            run.image_size,
            run.lbs,
            int(config.eval.seed),
            int(config.eval.max_rois),
            run.n_val,
            run.val_rows,
        )


def _resume(run: _Run) -> None:
    """Restores the newest checkpoint that restores (damaged ones are moved aside) and the data
    iterator with it; every process takes the same decision."""
    run.meta = {"step": 0, "epoch": 0, "best_val_dice": None, "best_step": None}
    run.start = 0
    try:
        found = run.ckpt.restore_newest(run.state, log=_log)
    except NoCheckpointError as e:
        raise ResumeError(str(e)) from None
    if found is not None:
        _, run.state, run.meta = found
        run.it.set_state(run.meta["data_iter"])
        run.start = int(run.meta["step"])
        _log(
            f"resumed from {run.workdir / 'checkpoints'} step {run.start} "
            f"(best val Dice so far {run.meta.get('best_val_dice')})"
        )
    run.writer = MetricsWriter(run.workdir, resume_step=run.start, enabled=run.main)


def _loop(run: _Run, preemption: Preemption) -> float:
    """Steps start+1 .. total with progress lines, evaluation and checkpoints; seconds taken."""
    config, ckpt, writer, meta = run.config, run.ckpt, run.writer, run.meta
    total, spe = run.total, run.steps_per_epoch
    log_every = max(int(config.train.log_every), 1)
    progress = Progress(total, run.start, run.gbs, _log)

    def save(step_no, val=None):
        meta.update(step=step_no, epoch=step_no // spe, data_iter=run.it.get_state())
        if run.val_source is None:  # no validation: the newest checkpoint is the best
            meta.update(best_step=step_no)
        ckpt.save(step_no, run.state, dict(meta), val)

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
                f"stopped. The last good checkpoint is step {good} in {run.workdir / 'checkpoints'} "
                f"(restarting resumes from it; lower --config.optim.lr or check the data)"
            )
        if s % log_every == 0 or s == total:
            sps, ips = progress.rates(s)
            epoch = (s - 1) // spe + 1
            _log(progress.line(s, epoch, m, sps))
            writer.write(
                {
                    "step": s,
                    "epoch": epoch,
                    **{k: float(m[k]) for k in ("loss", "focal", "dice", "iou", "class", "grad_norm", "lr")},
                    "steps_per_s": sps,
                    "images_per_s": ips,
                }
            )

    t_loop = time.perf_counter()
    for s in range(run.start + 1, total + 1):
        batch = next(run.it)
        gb = parallel.global_batch(step_lib.host_batch(batch, run.cache), run.mesh)
        run.state, m = run.train_step(run.state, run.frozen, gb)
        if config.train.step_delay_s > 0:
            time.sleep(config.train.step_delay_s)
        if pending is not None:
            check(pending)
        pending = (s, m)
        at_eval = s % run.eval_every == 0 or s == total
        at_ckpt = at_eval or (run.ckpt_every > 0 and s % run.ckpt_every == 0)
        stop = preemption.reached(s) and s < total
        if at_ckpt or stop:
            check(pending)
            pending = None
        if at_eval and run.val_source is not None:
            _validate(run, s, save)
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
    return loop_s


def _validate(run: _Run, s: int, save) -> None:
    t_eval = time.perf_counter()
    meta = run.meta
    val = evaluate(run.eval_step, run.state["params"], run.frozen, run.mesh, run.cache, run.eval_ds, run.eval_batches)
    epoch = s // run.steps_per_epoch
    if meta["best_val_dice"] is None or val["val_dice"] > meta["best_val_dice"]:
        meta.update(best_val_dice=val["val_dice"], best_step=s)
    flag = " on the training hold-out" if run.val_source == "holdout" else ""
    _log(
        f"eval step {s} epoch {epoch}: val Dice{flag} {val['val_dice']:.4f} (clicks "
        f"{val['val_dice_point']:.4f}, boxes {val['val_dice_box']:.4f}; {val['val_samples']} "
        f"ROI x prompt pairs, {time.perf_counter() - t_eval:.1f} s)"
    )
    run.writer.write({"step": s, "epoch": epoch, **val, "val_source": run.val_source}, prefix="val")
    save(s, val["val_dice"])


def _export(run: _Run) -> dict:
    """WORKDIR/export (final model) and WORKDIR/best (best by val Dice, or the last without
    validation). Every process takes part: gathering FSDP-split weights and orbax saves/restores
    are collective (process 0 writes the files)."""
    from safeclick_jax.models.registry import save_model

    config, ckpt, meta = run.config, run.ckpt, run.meta
    frozen_host = _to_host(run.frozen)
    merged = nnx.merge(run.graphdef, _to_host(run.state["params"]), frozen_host)
    # the intensity mapping of the training data, which VolumePredictor.set_volume's 'auto' applies
    data = {
        "normalization": str(config.data.normalization),
        "percentiles": [float(p) for p in config.data.percentiles],
        "ct_window": [float(v) for v in config.data.ct_window],
    }
    try:
        save_model(
            str(run.workdir / "export"),
            merged,
            training={"step": run.total, "config": config.model.name, "image_size": run.image_size, "data": data},
        )
    except OSError as e:
        raise SaveError(f"writing the model to {run.workdir / 'export'} failed ({type(e).__name__}: {e})") from None
    export = {"final": str(run.workdir / "export")}
    best_step = meta.get("best_step")
    if config.checkpoint.export_best and best_step is not None:
        best_state = None
        if best_step == run.total:
            best_state = run.state
        elif _agreed(best_step in ckpt.all_steps()):
            try:
                ckpt._check_shapes(best_step, run.state)
                best_state, _ = ckpt.restore(best_step, run.state)
                cause = None
            except Exception as e:
                from safeclick_jax.checkpoint import describe_restore_error

                cause = describe_restore_error(e)
            if not _agreed(cause is None):
                dst = ckpt.move_aside(best_step)
                _log(f"best checkpoint step {best_step} does not restore ({cause}); moved to {dst}; no best/ written")
                best_state = None
        if best_state is not None:
            merged = nnx.merge(run.graphdef, _to_host(best_state["params"]), frozen_host)
            save_model(
                str(run.workdir / "best"),
                merged,
                training={"step": best_step, "val_dice": meta["best_val_dice"], "data": data},
            )
            export["best"] = str(run.workdir / "best")
    ckpt.close()
    run.writer.close()
    return export


def _summarize(run: _Run, loop_s: float, export: dict, t_start: float) -> dict:
    """curves.png, WORKDIR/summary.json and the final line."""
    meta, total = run.meta, run.total
    png = (
        plot_curves(run.workdir / "metrics.jsonl", run.workdir / "curves.png") if run.main and run.config.plot else None
    )
    rows = [r for r in read_jsonl(run.workdir / "metrics.jsonl") if "val_dice" in r]
    summary = {
        "steps": total,
        "resumed_from": run.start,
        "image_size": run.image_size,
        "global_batch": run.gbs,
        "devices": run.n_dev,
        "processes": run.n_proc,
        "loop_seconds": loop_s,
        "steps_per_s": (total - run.start) / max(loop_s, 1e-9),
        "wall_seconds": time.perf_counter() - t_start,
        "val_source": run.val_source,
        "val_dice_first": rows[0]["val_dice"] if rows else None,
        "val_dice_last": rows[-1]["val_dice"] if rows else None,
        "best_val_dice": meta.get("best_val_dice"),
        "best_step": meta.get("best_step"),
        "export": export,
        "curves": str(png) if png else None,
    }
    if run.main:
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _log(
        f"done: {total} steps in {loop_s:.1f} s ({summary['steps_per_s']:.2f} steps/s); val Dice "
        f"{summary['val_dice_first']} -> {summary['val_dice_last']}; model in {export.get('final')}"
    )
    return summary


def _agreed(value: int) -> int:
    """Process 0's value on every process. Decisions that lead to collectives (a checkpoint
    restore) must agree, and each process's CheckpointManager lists the directory on its own: a
    2-process test hung in a restore that only one process started."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _to_host(tree):
    """numpy copies of a (possibly multi-process, possibly FSDP-split) pytree of jax.Arrays. An
    array whose shards live partly on other processes is all-gathered (collective: every process
    calls this in the same order)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
