"""The clip task (variant `full`): the whole SAM 2 (image encoder, memory path, prompt encoder, mask
decoder, and the SafeClick head when there is one) trained on T-slice clips with up to K objects,
as sam2's SAM2Train trains it: clips and prompt plans from data/clips.py, tracking and the
multi-step loss from training/full.py, sam2's optimiser from training/full_optim.py.

The model is the pair (image model, SAM2Memory); what trains is `train.parts`
(full_optim.PARTS). The memory path starts from `init.memory_checkpoint`, else `init.checkpoint`,
else `init.seed` (training/memory_init.py) and is exported trained.

Data: each training volume of the prepared cache is one item per epoch (sam2 samples one clip per
video per epoch): grain draws its clip (clips.sample_clip) and a seed for the batch's prompt plan
with its per-element rng, so a restart reads the same clips and plans (exact resume). Clips are
sharded over the `data` axis with their objects; the plan's per-object prompts travel with their
clip, its decisions (which frames condition, which get corrections) are the same on every
process (the same element index gives the same seed).

Validation (each evaluation, the loop's best checkpoint is the best val Dice): `clip.val_clips`
clips of the prepared `val` split, the same ones every time (clip i from val volume i mod V with
the generator seeded by (eval.seed, i)), each object prompted by one click at its deepest point
on the first frame and tracked through the clip without corrections (clips.validation_plan).
Reported: val Dice (full.final_dice: hard Dice of each object's final mask on each frame,
padding slots left out, averaged over objects and frames) and val loss (full.multistep_loss,
per object). An empty val split (or val_clips 0) trains without validation, the last checkpoint
kept as the best.
"""

from __future__ import annotations

import os
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from safeclick_jax import checkpoint, parallel
from safeclick_jax.data import clips, pipeline
from safeclick_jax.models.memory import SAM2Memory
from safeclick_jax.models.weight_map import state_dict
from safeclick_jax.training import full, full_optim, memory_init, model_init
from safeclick_jax.training import step as step_lib
from safeclick_jax.training import train_state as ts
from safeclick_jax.training.task import ConfigError, Data, Env, Model, Placed, Steps

LOG_KEYS = ("loss", "focal", "dice", "iou", "class", "grad_norm", "lr")
# the plan's per-object prompts, carried per clip ([B, T, K, ...]) so they shard with it
PER_CLIP = ("coords", "labels")


def encoder_weights_present(directory: str) -> bool:
    """Whether a model directory's arrays include the image encoder (orbax metadata only)."""
    import orbax.checkpoint as ocp

    state_dir = os.path.join(os.path.abspath(checkpoint.resolve(directory)), "state")
    with checkpoint.quiet_orbax():
        md = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    tree = getattr(md, "tree", md)
    params = tree.get("params", {}) if isinstance(tree, dict) else {}
    return bool(params.get("image_encoder"))


def num_frames(config) -> tuple[int, str]:
    """clip.num_frames, -1 resolved as data.image_size is (model_init.resolve_image_size)."""
    t = int(config.clip.num_frames)
    if t > 0:
        return t, "set in the config"
    if jax.default_backend() == "cpu":
        return int(config.clip.cpu_num_frames), "auto: CPU backend"
    return int(config.clip.accelerator_num_frames), f"auto: {jax.default_backend()}"


class ClipSample(grain.transforms.RandomMap):
    """volume id -> one clip of it (clips.sample_clip) and the seed of its batch's prompt plan."""

    def __init__(self, cache: pipeline.Cache, frames: int, objects: int, image_size: int, min_pixels: int):
        self.cache, self.frames, self.objects, self.image_size = cache, frames, objects, image_size
        self.min_pixels = min_pixels

    def random_map(self, vid, rng: np.random.Generator):
        # first: then it depends only on the element's index, the same on every process
        plan_seed = rng.integers(2**62)
        image, labels = self.cache.volume_arrays(int(vid))
        name = self.cache.volumes[int(vid)]["image"]
        out = clips.sample_clip(rng, image, labels, self.frames, self.objects, self.image_size, name, self.min_pixels)
        return {"images": out["images"], "masks": out["masks"], "objects": out["valid"], "plan_seed": plan_seed}


class ClipTask:
    name = "clips"

    def __init__(self, config, env: Env):
        self.config, self.env = config, env
        self.memory = None
        self.val_vids = []  # set by data

    def _volumes(self, split: str) -> list[int]:
        cache = pipeline.Cache(self.config.data.cache_dir)
        return [i for i, v in enumerate(cache.volumes) if v["split"] == split]

    def check(self, log) -> None:
        """Bad input before anything is written: train.parts, the init checkpoint's encoder
        weights, the memory path's model size."""
        config = self.config
        self.parts = ts.check_parts(config, ts.PARTS, self.name)
        self.frames, why = num_frames(config)
        log(f"clips: {self.frames} slices ({why}) x up to {config.clip.max_objects} objects")
        cfg = model_init.model_sam2_config(config, self.env.image_size)  # one line when not a model dir
        if config.init.checkpoint and not encoder_weights_present(config.init.checkpoint):
            raise checkpoint.ModelDirError(
                f"--config.init.checkpoint={config.init.checkpoint}: has no image encoder weights "
                "(params/image_encoder); `full` starts from a whole SAM 2: pass a directory converted "
                "with `python -m convert.sam2_to_flax`"
            )
        self.memory = memory_init.resolve(config, log)
        self.memory.check(cfg)

    def build(self, log) -> Model:
        model = model_init.build_model(self.config, self.env.image_size, log)
        mem = SAM2Memory.from_extra(model.cfg, self.memory.extra(), where="the memory path")
        graphdef, params, frozen = nnx.split((model, mem), full_optim.trainable_filter(self.parts), ...)
        n = lambda s: sum(int(x.size) for x in jax.tree.leaves(s))
        log(
            f"model: {self.config.model.kind} on {self.config.model.name} + memory path: "
            f"{n(params):,} trainable ({', '.join(self.parts)}) / {n(frozen):,} frozen parameters"
        )
        self.params_like = params
        return Model(graphdef, params, frozen)

    def data(self, log) -> Data:
        config, env = self.config, self.env
        cache = pipeline.Cache(config.data.cache_dir)
        vids = self._volumes("train")
        if not vids:
            raise ConfigError(f"{config.data.cache_dir}: the train split has no volume")
        k = int(config.clip.max_objects)
        try:
            for v in vids:
                clips.check_volume(cache.volume_arrays(v)[1], self.frames, k, cache.volumes[v]["image"])
        except clips.ClipError as e:
            raise ConfigError(f"clip.num_frames / clip.max_objects: {e}") from None
        ds = grain.MapDataset.source(np.array(vids, np.int64))
        ds = pipeline._shard(ds, None, None)
        if len(ds) == 0:
            raise ConfigError(f"{config.data.cache_dir}: fewer training volumes ({len(vids)}) than processes")
        seed = int(config.data.shuffle_seed)
        ds = ds.shuffle(seed=seed).repeat(None)
        sample = ClipSample(cache, self.frames, k, env.image_size, int(config.clip.min_object_pixels))
        ds = ds.random_map(sample, seed=seed + 1)
        ds = ds.batch(env.local_batch, drop_remainder=True)
        it = pipeline.make_iterator(ds, num_threads=int(config.data.num_threads))
        self.val_vids = self._volumes("val")
        n_val = int(config.clip.val_clips) if self.val_vids else 0
        if n_val <= 0:
            why = "the validation split is empty" if not self.val_vids else "clip.val_clips is 0"
            log(f"clips: {why}: training WITHOUT validation, the last checkpoint is kept as the best")
            return Data(it, len(vids) // env.n_proc, 0, None, "clips")
        try:
            for v in self.val_vids:
                clips.check_volume(cache.volume_arrays(v)[1], self.frames, k, cache.volumes[v]["image"])
        except clips.ClipError as e:
            raise ConfigError(f"clip.num_frames / clip.max_objects (val split): {e}") from None
        log(
            f"clips: validation on {n_val} fixed clips of {len(self.val_vids)} val volumes, one click per object "
            "on the first frame, no corrections"
        )
        return Data(it, len(vids) // env.n_proc, n_val, "val", "clips")

    def optimizer(self, total_steps: int, log):
        o = self.config.optim
        log(
            f"optimizer: AdamW, lr {o.lr:g} (image encoder x{o.vision_lr_mult:g}, Hiera layer decay "
            f"{o.layer_decay:g}), weight decay {o.weight_decay:g} (none on biases and LayerNorms), clip {o.grad_clip:g}"
        )
        return full_optim.make_optimizer(o, self.params_like, total_steps)

    def steps(self, graphdef, placed: Placed, optimizer, schedule, data: Data) -> Steps:
        config, mesh = self.config, self.env.mesh
        cfg = types.SimpleNamespace(**config.clip.to_dict())
        loss_cfg = types.SimpleNamespace(**config.loss.to_dict())
        drop_path, dropout = float(config.model.drop_path), float(config.model.dropout)
        nan_at = int(config.debug.nan_at_step)
        cdt = step_lib.compute_dtype(config)

        def step(state, frozen, batch, plan):
            plan = {**plan, **_per_object(batch)}
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

            def loss_fn(params):
                model, mem = nnx.merge(graphdef, step_lib.cast_floats(params, cdt), step_lib.cast_floats(frozen, cdt))
                images = batch["images"].astype(cdt)
                loss, (terms, _) = full.clip_loss(
                    model, mem, images, batch["masks"], plan, key, cfg, loss_cfg, drop_path, dropout, batch["objects"]
                )
                return loss, terms

            (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            named = {"focal": terms["mask"], "dice": terms["dice"], "iou": terms["iou"], "class": terms["class"]}
            return step_lib.apply_gradients(optimizer, schedule, nan_at, state, loss, named, grads, state["rng"])

        rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        compiled = jax.jit(
            step,
            in_shardings=(placed.state_sharding, placed.frozen_sharding, shard, rep),
            out_shardings=(placed.state_sharding, rep),
            donate_argnums=(0,),
        )

        def train(state, frozen, batch):
            plan = clips.prompt_plan(np.random.default_rng(int(batch["plan_seed"][0])), _frame_major(batch), cfg)
            return compiled(state, frozen, *_device_inputs(batch, plan, mesh))

        evaluate = None
        if data.val_source is not None:
            evaluate = self._evaluator(graphdef, placed, data.n_val, cfg, loss_cfg, cdt)
        return Steps(train, evaluate, LOG_KEYS)

    def _evaluator(self, graphdef, placed: Placed, n_val: int, cfg, loss_cfg, cdt):
        """(params, frozen) -> {"val_dice", "val_loss", "val_clips", "val_objects"} over the fixed
        validation clips (module docstring); every process runs the same number of batches, slots
        past the last clip are all padding."""
        env, mesh = self.env, self.env.mesh
        cache = pipeline.Cache(self.config.data.cache_dir)
        k, seed = int(self.config.clip.max_objects), int(self.config.eval.seed)
        # the validation forward: frame 0 the one conditioning frame, no correction steps compiled
        val_cfg = types.SimpleNamespace(**{**vars(cfg), "num_correction_pt_per_frame": 0, "num_init_cond_frames": 1})

        def one_clip(i: int) -> dict:
            j = i % n_val  # past the last clip: a copy of one, all padding
            vid = self.val_vids[j % len(self.val_vids)]
            image, labels = cache.volume_arrays(vid)
            rng = np.random.default_rng([seed, j])
            out = clips.sample_clip(rng, image, labels, self.frames, k, env.image_size, cache.volumes[vid]["image"])
            return {"images": out["images"], "masks": out["masks"], "objects": out["valid"] & (i < n_val)}

        def step(params, frozen, batch, plan):
            model, mem = nnx.merge(graphdef, step_lib.cast_floats(params, cdt), step_lib.cast_floats(frozen, cdt))
            masks, objects = batch["masks"], batch["objects"]
            plan = {**plan, **_per_object(batch)}
            out = full.track_clip(model, mem, batch["images"].astype(cdt), masks, plan, jax.random.key(0), val_cfg)
            loss, _ = full.multistep_loss(out, masks, loss_cfg, objects)
            dice_sum, count = full.final_dice(out, masks, objects)
            n_obj = jnp.sum(objects.astype(jnp.float32))
            return {"dice_sum": dice_sum, "count": count, "loss_sum": loss * n_obj, "objects": n_obj}

        rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        params_sharding = placed.state_sharding["params"]
        compiled = jax.jit(step, in_shardings=(params_sharding, placed.frozen_sharding, shard, rep), out_shardings=rep)
        n_batches = -(-n_val // env.global_batch)

        def evaluate(params, frozen):
            tot = {}
            for b in range(n_batches):
                first = b * env.global_batch + jax.process_index() * env.local_batch
                items = [one_clip(first + j) for j in range(env.local_batch)]
                batch = {n: np.stack([x[n] for x in items]) for n in items[0]}
                inputs = _device_inputs(batch, clips.validation_plan(_frame_major(batch)), mesh)
                out = jax.device_get(compiled(params, frozen, *inputs))
                tot = {n: tot.get(n, 0.0) + float(v) for n, v in out.items()}
            return {
                "val_dice": tot["dice_sum"] / max(tot["count"], 1.0),
                "val_loss": tot["loss_sum"] / max(tot["objects"], 1.0),
                "val_clips": n_val,
                "val_objects": int(tot["objects"]),
            }

        return evaluate

    def export_model(self, graphdef, params, frozen):
        model, mem = nnx.merge(graphdef, params, frozen)
        extra = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in state_dict(mem).items()})
        return model, extra


def _frame_major(batch: dict) -> np.ndarray:
    """A host batch's masks [B, T, K, S, S] -> [T, B*K, S, S]: full.py's object order (clip-major)."""
    masks = batch["masks"]
    b, t, k = masks.shape[:3]
    return np.moveaxis(masks, 0, 1).reshape((t, b * k) + masks.shape[3:])


def _device_inputs(batch: dict, plan: dict, mesh):
    """A host batch of clips and its plan -> (the clips with the plan's per-object prompts, [B, T, K,
    ...], sharded over `data`; the plan's decisions, replicated)."""
    b, t, k = batch["masks"].shape[:3]
    plan = dict(plan)
    per_clip = {}
    for n in PER_CLIP:
        x = plan.pop(n)  # [T, B*K, ...] -> [B, T, K, ...]
        per_clip[n] = np.moveaxis(x.reshape((t, b, k) + x.shape[2:]), 1, 0)
    local = {"images": batch["images"], "masks": batch["masks"], "objects": batch["objects"], **per_clip}
    rep = parallel.replicated(mesh)
    glob = {n: jax.make_array_from_process_local_data(rep, np.asarray(v)) for n, v in plan.items()}
    return parallel.global_batch(local, mesh), glob


def _per_object(batch) -> dict:
    """In the step: the per-clip prompts [B, T, K, ...] -> the plan's [T, B*K, ...]."""
    b, t, k = batch["masks"].shape[:3]
    return {n: jnp.moveaxis(batch[n], 0, 1).reshape((t, b * k) + batch[n].shape[3:]) for n in PER_CLIP}
