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

from safeclick_jax import parallel
from safeclick_jax.data import pipeline
from safeclick_jax.training import embedding_cache, model_init
from safeclick_jax.training import step as step_lib
from safeclick_jax.training import train_state as ts
from safeclick_jax.training.checkpointing import Checkpointer
from safeclick_jax.training.metrics import MetricsWriter, Progress, plot_curves, read_jsonl


class DivergenceError(RuntimeError):
    """The loss (or gradient) became NaN/Inf; the workdir keeps the last good checkpoint."""


_DISTRIBUTED = False


def _log(*a):
    if jax.process_index() == 0:
        print(*a, flush=True)


def setup_compilation_cache(path: str) -> None:
    """Persistent XLA cache: eager parameter initialisation and the steps compile once per
    machine instead of once per run (minutes on a busy CPU)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def ensure_data(dc, log=_log) -> None:
    """Prepares data.cache_dir from data.roots when absent; generates the embedded synthetic
    dataset first when a root is data.synthetic_root and missing."""
    if (Path(dc.cache_dir) / "rois.npy").exists():
        return
    if jax.process_index() == 0:
        from safeclick_jax.data import prepare, synthetic

        synth = dc.get("synthetic_root")
        for root in dc.roots:
            if not Path(root).exists():
                if synth and os.path.abspath(root) == os.path.abspath(synth):
                    log(f"data: generating the synthetic dataset ({dc.synthetic_volumes} volumes) in {root}")
                    synthetic.write_dataset(root, num_volumes=dc.synthetic_volumes, seed=0)
                else:
                    raise FileNotFoundError(f"data.roots: {root} does not exist")
        log(f"data: preparing {list(dc.roots)} -> {dc.cache_dir}")
        prepare.prepare_dataset(list(dc.roots), dc.cache_dir, dc, progress=False)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare")


def _eval_batches(cache_dir, image_size, local_bs, seed, max_rois, n_val):
    """(dataset, number of batches every process runs): the same count on all processes."""
    ds = pipeline.make_eval_dataset(
        cache_dir, "val", image_size=image_size, batch_size=local_bs, seed=seed, include_image=False
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


def train(config, workdir) -> dict:
    global _DISTRIBUTED
    t_start = time.perf_counter()
    setup_compilation_cache(config.get("compilation_cache_dir", ""))
    if not _DISTRIBUTED:
        _DISTRIBUTED = parallel.maybe_initialize_distributed(_log) or True
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = parallel.make_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    _log(
        f"devices: {n_dev} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{n_proc} process(es); mesh {dict(mesh.shape)}"
    )

    dc = config.data
    ensure_data(dc)
    from safeclick_jax.models.config import get_config as sam2_get

    image_size, why = model_init.resolve_image_size(config, sam2_get(config.model.name))
    _log(f"image_size: {image_size} px ({why})")
    cdt = step_lib.compute_dtype(config)  # validates train.compute_dtype before any heavy work
    _log(
        f"precision: {cdt.name} compute"
        + (", float32 master weights, optimizer and loss" if cdt.name != "float32" else "")
    )
    gbs = int(dc.batch_size)
    if gbs % n_dev or gbs % n_proc:
        raise ValueError(f"data.batch_size={gbs} must be a multiple of the device count {n_dev}")
    lbs = gbs // n_proc

    t0 = time.perf_counter()
    model = model_init.build_model(config, image_size, _log)
    graphdef, params, frozen = ts.split_model(model, config)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    _log(
        f"model: {config.model.kind} on {config.model.name} ({time.perf_counter() - t0:.1f} s to build): "
        f"{n_train:,} trainable / {n_frozen:,} frozen parameters"
    )
    use_block = config.model.kind == "safeclick" and config.model.safeclick.use_e1
    keep_block = model.keep_block if use_block else None

    cache = None
    if config.embed.enabled:
        cache = embedding_cache.build(
            model,
            dc.cache_dir,
            image_size,
            keep_block,
            root=config.embed.root,
            batch_size=int(config.embed.batch_size),
            dtype=config.embed.dtype,
            log=_log,
        )
    del model

    data_cache = pipeline.Cache(dc.cache_dir)
    n_rois = len(data_cache.split_rois("train")) // n_proc
    n_val = len(data_cache.split_rois("val"))
    steps_per_epoch = int(config.train.steps_per_epoch)
    if steps_per_epoch <= 0:
        steps_per_epoch = n_rois // lbs
    if steps_per_epoch <= 0:
        raise ValueError(f"{n_rois} training ROIs per process < batch {lbs}")
    total = int(config.train.total_steps)
    if total <= 0:
        epochs, why_epochs = ts.resolve_epochs(config)
        _log(f"epochs: {epochs} ({why_epochs})")
        total = epochs * steps_per_epoch
    eval_every = max(int(config.eval.every_epochs), 1) * steps_per_epoch
    ckpt_every = int(config.checkpoint.every_steps)
    _log(
        f"schedule: {total} steps = {total / steps_per_epoch:g} epochs x {steps_per_epoch} steps, "
        f"global batch {gbs} ({lbs} per process), {n_rois * n_proc} train / {n_val} val ROIs"
    )

    schedule = ts.learning_rate(config, total)
    optimizer = ts.make_optimizer(config, total)
    state = ts.init_state(params, optimizer, int(config.train.seed))
    fsdp, min_size = bool(config.train.fsdp), int(config.train.fsdp_min_size)
    state_sharding = parallel.param_sharding(mesh, state, fsdp, min_size)
    frozen_sharding = parallel.param_sharding(mesh, frozen, fsdp, min_size)
    if fsdp:
        for name, sh, tree in (("train state", state_sharding, state), ("frozen weights", frozen_sharding, frozen)):
            n_split, n_arrays, frac = parallel.sharded_fraction(sh, tree)
            _log(
                f"fsdp: {name}: {n_split} of {n_arrays} arrays split over {mesh.shape[parallel.DATA_AXIS]} devices, "
                f"{100 * frac:.0f}% of a replica per device"
            )
    state = jax.device_put(state, state_sharding)
    frozen = jax.device_put(frozen, frozen_sharding)

    ds = pipeline.make_dataset_from_config(
        dc, "train", image_size=image_size, batch_size=lbs, include_image=cache is None
    )
    it = pipeline.make_iterator(ds, num_threads=int(dc.num_threads))

    ckpt = Checkpointer(
        workdir / "checkpoints", keep=int(config.checkpoint.keep), keep_best=bool(config.checkpoint.export_best)
    )
    meta = {"step": 0, "epoch": 0, "best_val_dice": None, "best_step": None}
    start = 0
    latest = _agreed(-1 if ckpt.latest_step() is None else ckpt.latest_step())
    latest = None if latest < 0 else latest
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        it.set_state(meta["data_iter"])
        start = int(meta["step"])
        _log(f"resumed from {workdir / 'checkpoints'} step {start} (best val Dice so far {meta.get('best_val_dice')})")
    writer = MetricsWriter(workdir, resume_step=start, enabled=main)

    train_step = step_lib.make_train_step(
        graphdef, optimizer, schedule, config, mesh, keep_block, state_sharding, frozen_sharding
    )
    eval_step = step_lib.make_eval_step(graphdef, config, mesh, keep_block, state_sharding["params"], frozen_sharding)
    eval_ds, eval_batches = _eval_batches(
        dc.cache_dir, image_size, lbs, int(config.eval.seed), int(config.eval.max_rois), n_val
    )
    log_every = max(int(config.train.log_every), 1)
    progress = Progress(total, start, gbs, _log)
    val_history = []

    def save(step_no, val=None):
        meta.update(step=step_no, epoch=step_no // steps_per_epoch, data_iter=it.get_state())
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
                f"stopped. The last good checkpoint is step {good} in {workdir / 'checkpoints'} "
                f"(restarting resumes from it; lower --config.optim.lr or check the data)"
            )
        if s % log_every == 0 or s == total:
            sps, ips = progress.rates(s)
            epoch = (s - 1) // steps_per_epoch + 1
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
    for s in range(start + 1, total + 1):
        batch = next(it)
        gb = parallel.global_batch(step_lib.host_batch(batch, cache), mesh)
        state, m = train_step(state, frozen, gb)
        if config.train.step_delay_s > 0:
            time.sleep(config.train.step_delay_s)
        if pending is not None:
            check(pending)
        pending = (s, m)
        at_eval = s % eval_every == 0 or s == total
        if at_eval or (ckpt_every > 0 and s % ckpt_every == 0):
            check(pending)
            pending = None
        if at_eval:
            t_eval = time.perf_counter()
            val = evaluate(eval_step, state["params"], frozen, mesh, cache, eval_ds, eval_batches)
            epoch = s // steps_per_epoch
            val_history.append(val["val_dice"])
            if meta["best_val_dice"] is None or val["val_dice"] > meta["best_val_dice"]:
                meta.update(best_val_dice=val["val_dice"], best_step=s)
            _log(
                f"eval step {s} epoch {epoch}: val Dice {val['val_dice']:.4f} (clicks "
                f"{val['val_dice_point']:.4f}, boxes {val['val_dice_box']:.4f}; {val['val_samples']} "
                f"ROI x prompt pairs, {time.perf_counter() - t_eval:.1f} s)"
            )
            writer.write({"step": s, "epoch": epoch, **val}, prefix="val")
            save(s, val["val_dice"])
        elif ckpt_every > 0 and s % ckpt_every == 0:
            save(s)
    if pending is not None:
        check(pending)
    loop_s = time.perf_counter() - t_loop
    ckpt.wait()

    # export: the final model, and the best one by val Dice. Every process takes part: gathering
    # FSDP-split weights and orbax saves/restores are collective (process 0 writes the files).
    from safeclick_jax.models.registry import save_model

    frozen_host = _to_host(frozen)
    merged = nnx.merge(graphdef, _to_host(state["params"]), frozen_host)
    save_model(
        str(workdir / "export"), merged, training={"step": total, "config": config.model.name, "image_size": image_size}
    )
    export = {"final": str(workdir / "export")}
    best_step = meta.get("best_step")
    if config.checkpoint.export_best and best_step is not None and _agreed(best_step in ckpt.all_steps()):
        best_state, _ = ckpt.restore(best_step, state)
        merged = nnx.merge(graphdef, _to_host(best_state["params"]), frozen_host)
        save_model(str(workdir / "best"), merged, training={"step": best_step, "val_dice": meta["best_val_dice"]})
        export["best"] = str(workdir / "best")
    ckpt.close()
    writer.close()
    png = plot_curves(workdir / "metrics.jsonl", workdir / "curves.png") if main and config.plot else None
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if "val_dice" in r]
    summary = {
        "steps": total,
        "resumed_from": start,
        "image_size": image_size,
        "global_batch": gbs,
        "devices": n_dev,
        "processes": n_proc,
        "loop_seconds": loop_s,
        "steps_per_s": (total - start) / max(loop_s, 1e-9),
        "wall_seconds": time.perf_counter() - t_start,
        "val_dice_first": rows[0]["val_dice"] if rows else None,
        "val_dice_last": rows[-1]["val_dice"] if rows else None,
        "best_val_dice": meta.get("best_val_dice"),
        "best_step": meta.get("best_step"),
        "export": export,
        "curves": str(png) if png else None,
    }
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
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
