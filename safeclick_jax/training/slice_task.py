"""The slice task: SafeClick (or SAM 2's own decoder, `baseline`) trained on single slices with one
click or box each, the paper's recipe. The image encoder is frozen and its features are read from
the embedding cache (training/embedding_cache.py) unless `embed.enabled` is False.

Validation: the prepared `val` split, or (empty split) a hold-out of the training volumes'
last slices, or none, as `eval.when_no_val` says. The export carries the memory path over from
`init.memory_checkpoint` / `init.checkpoint` (training/memory_init.py).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from safeclick_jax import parallel
from safeclick_jax.data import pipeline
from safeclick_jax.training import embedding_cache, memory_init, model_init
from safeclick_jax.training import step as step_lib
from safeclick_jax.training import train_state as ts
from safeclick_jax.training.task import Data, Env, Model, Placed, Steps

LOG_KEYS = ("loss", "focal", "dice", "iou", "class", "grad_norm", "lr")


class SliceTask:
    name = "slices"

    def __init__(self, config, env: Env):
        self.config, self.env = config, env
        self.cache = self.keep_block = None  # set by build
        self.memory = None

    def check(self, log) -> None:
        """Bad input before anything is written: train.parts, the memory path the export will carry."""
        ts.check_parts(self.config, ts.SLICE_PARTS, self.name)
        self.memory = memory_init.resolve(self.config, log)
        self.memory.check(model_init.model_sam2_config(self.config, self.env.image_size))

    def build(self, log) -> Model:
        """Model (init checkpoint or random), its trainable/frozen split and the embedding cache."""
        config, env = self.config, self.env
        t0 = time.perf_counter()
        model = model_init.build_model(config, env.image_size, log)
        graphdef, params, frozen = ts.split_model(model, config)
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
        log(
            f"model: {config.model.kind} on {config.model.name} ({time.perf_counter() - t0:.1f} s to build): "
            f"{n_train:,} trainable / {n_frozen:,} frozen parameters"
        )
        use_block = config.model.kind == "safeclick" and config.model.safeclick.use_e1
        self.keep_block = model.keep_block if use_block else None
        if config.embed.enabled:
            self.cache = embedding_cache.build(
                model,
                config.data.cache_dir,
                env.image_size,
                self.keep_block,
                root=config.embed.root,
                batch_size=int(config.embed.batch_size),
                dtype=config.embed.dtype,
                log=log,
            )
        return Model(graphdef, params, frozen)

    def data(self, log) -> Data:
        dc, env = self.config.data, self.env
        train_rows, self.val_rows, val_source = _choose_validation(self.config, log)
        data_cache = pipeline.Cache(dc.cache_dir)
        n_train = len(data_cache.split_rois("train") if train_rows is None else train_rows)
        n_val = 0
        if val_source is not None:
            n_val = len(data_cache.split_rois("val") if self.val_rows is None else self.val_rows)
        ds = pipeline.make_dataset_from_config(
            dc, "train", image_size=env.image_size, batch_size=env.local_batch, include_image=self.cache is None,
            rows=train_rows,
        )  # fmt: skip
        it = pipeline.make_iterator(ds, num_threads=int(dc.num_threads))
        return Data(it, n_train // env.n_proc, n_val, val_source, "ROIs")

    def optimizer(self, total_steps: int, log):
        o = self.config.optim
        if float(o.head_lr_mult) != 1.0:
            log(
                f"optimizer: SafeClick modules at {o.head_lr_mult:g} x lr "
                f"({o.head_warmup_steps} warm-up steps), SAM 2's decoder at lr {o.lr:g}"
            )
        return ts.make_optimizer(self.config, total_steps), ts.learning_rate(self.config, total_steps)

    def steps(self, graphdef, placed: Placed, optimizer, schedule, data: Data) -> Steps:
        config, env = self.config, self.env
        train_step = step_lib.make_train_step(
            graphdef,
            optimizer,
            schedule,
            config,
            env.mesh,
            self.keep_block,
            placed.state_sharding,
            placed.frozen_sharding,
        )
        cache, mesh = self.cache, env.mesh

        def train(state, frozen, batch):
            return train_step(state, frozen, parallel.global_batch(step_lib.host_batch(batch, cache), mesh))

        evaluate = None
        if data.val_source is not None:
            eval_step = step_lib.make_eval_step(
                graphdef, config, mesh, self.keep_block, placed.state_sharding["params"], placed.frozen_sharding
            )
            ds, n_batches = _eval_batches(config, env, data.n_val, self.val_rows)
            evaluate = lambda params, frozen: _evaluate(eval_step, params, frozen, mesh, cache, ds, n_batches)
        return Steps(train, evaluate, LOG_KEYS)

    def export_model(self, graphdef, params, frozen):
        return nnx.merge(graphdef, params, frozen), self.memory.extra()


def _choose_validation(config, log):
    """(train rows, val rows, val source): rows None = the split as prepared. An empty validation
    split is reported at once and handled as config.eval.when_no_val says."""
    ec, dc = config.eval, config.data
    data_cache = pipeline.Cache(dc.cache_dir)
    counts = data_cache.split_counts()
    if counts["train"] == 0:
        raise ValueError(f"{dc.cache_dir}: the train split has no ROI (ROIs per split: {counts})")
    if counts["val"] > 0:
        return None, None, "val"
    mode = ec.when_no_val
    if mode not in ("holdout", "none"):
        raise ValueError(f"eval.when_no_val={mode!r}: expected 'holdout' or 'none'")
    msg = f"data: the validation split is empty (ROIs per split: {counts})"
    if mode == "holdout":
        rows = data_cache.split_rois("train")
        held = pipeline.holdout_rows(rows, float(ec.holdout_fraction))
        if held.any():
            log(
                f"{msg}: validating on a HOLD-OUT of the training volumes ({int(held.sum())} ROIs on the last "
                f"{float(ec.holdout_fraction):g} of each volume's slices, not trained on; val rows of "
                "metrics.jsonl say val_source=holdout). --config.eval.when_no_val=none trains without validation"
            )
            return rows[~held], rows[held], "holdout"
        msg += "; no volume has two slices to hold one out"
    log(f"{msg}: training WITHOUT validation, the last checkpoint is kept as the best")
    return None, None, None


def _eval_batches(config, env: Env, n_val: int, rows):
    """(dataset, number of batches every process runs): the same count on all processes."""
    ds = pipeline.make_eval_dataset(
        config.data.cache_dir,
        "val",
        image_size=env.image_size,
        batch_size=env.local_batch,
        seed=int(config.eval.seed),
        include_image=False,
        rows=rows,
    )
    max_rois = int(config.eval.max_rois)
    items = n_val * 10 if max_rois < 0 else min(n_val, max_rois) * 10
    per_process = -(-items // env.n_proc)
    return ds, -(-per_process // env.local_batch)


def _evaluate(eval_step, params, frozen, mesh, cache, ds, n_batches) -> dict:
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
