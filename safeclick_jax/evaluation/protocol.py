"""The paper's robustness protocol: every ROI of a split under the ten prompt conditions of
Table 2, for one or more models, with identical prompts for every model.

    rois = RoiSet(cache_dir, "test", seed=0)                  # ROIs, grouped by slice, + prompts
    models = [EvalModel.load("ckpt/sam2.1_t", image_size=1024), ...]
    result = evaluate(models, rois, image_size=1024, batch_size=8)

Prompts. `pipeline.condition_prompt` seeds each prompt by (seed, roi_id, condition), so the
prompts depend on nothing but the seed and the ROI: every model, run, batch size and device count
sees the same ones (they are computed once per run and shared by all models anyway).

Mask choice (the same for every model, SAM 2's own predictor conventions):
* point conditions: one positive click, multimask_output=True, and the mask with the highest
  predicted IoU of SAM 2's three is kept: the usual protocol for a single ambiguous click (SAM,
  SAM 2 and MedSAM evaluations), and what an interactive user of SAM2ImagePredictor gets when
  asking for the best of three.
* box conditions: multimask_output=False (a box is not ambiguous; SAM 2's predictor
  recommends a single mask for it), with SAM 2's stability fallback as in its eval mode.
Prompt tokens come from the shared `safeclick_jax.prompting` (SAM2ImagePredictor's layout): box =
corners with labels 2, 3, then SAM 2's (0, 0) point with label -1; a click = label 1 then the
(0, 0) / -1 point, padded to three tokens with -2 (masked out, results identical to unpadded).

Work layout. Slices, not ROIs, are the unit of encoding: a batch holds `batch_size` slices
(sharded over the `data` axis of a device mesh), each slice is encoded once, and all its ROIs'
ten conditions are decoded from the cached features, `rois_per_call` ROI slots per decoder call.
Dice is computed on the device at the slice's own resolution (metrics.mask_counts), so only
counts come back to the host. Timings per model: encoder seconds per slice, decoder seconds per
prompt, and their sum = the inference time of one interactive prediction (one ROI, one prompt).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from safeclick_jax import checkpoint, parallel, prompting
from safeclick_jax.data import pipeline
from safeclick_jax.data import prompts as prompt_lib
from safeclick_jax.evaluation import metrics
from safeclick_jax.models import registry

CONDITIONS = prompt_lib.CONDITIONS
CONDITION_NAMES = tuple(prompt_lib.condition_name(k, p) for k, p in CONDITIONS)
NUM_POINT = sum(1 for k, _ in CONDITIONS if k == "point")  # conditions 0..4 points, 5..9 boxes
NUM_CONDITIONS = len(CONDITIONS)
assert all(k == "point" for k, _ in CONDITIONS[:NUM_POINT])
assert all(k == "box" for k, _ in CONDITIONS[NUM_POINT:])


# ---------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class EvalModel:
    name: str
    directory: str
    description: dict
    model: nnx.Module

    @property
    def kind(self) -> str:
        return self.description["kind"]

    @property
    def base(self) -> str:
        """SAM 2 configuration name, e.g. 'sam2.1_hiera_t'."""
        return self.description["sam2"]["name"]

    @classmethod
    def load(cls, directory: str, image_size: int | None = None, name: str | None = None):
        """A model directory (or training workdir, via checkpoint.resolve) at `image_size`.

        The image size only changes shapes computed from it (prompt-encoder grid, feature sizes; the
        Hiera position embedding is interpolated), not parameter shapes, so any checkpoint can be
        evaluated at a lower resolution (smoke runs) or at another family's size."""
        from safeclick_jax.inference.loader import load_model

        m = load_model(directory, image_size)
        native = checkpoint.read_description(m.directory)["sam2"]["image_size"]
        if image_size and image_size != native:
            print(f"[evaluate] {m.directory}: trained at {native} px, evaluated at {image_size} px", file=sys.stderr)
        return cls(name or Path(m.directory.rstrip("/")).name, m.directory, m.description, m.network)


# ---------------------------------------------------------------------------------------------
# ROIs, slices and prompts


class RoiSet:
    """The ROIs of a split, their slices and their ten prompts (raw pixel coordinates).

    ROIs with an empty mask (no prompt exists) or an area below `min_area` are not evaluated; they
    are counted per dataset in `skipped`. `max_slices` keeps an evenly spaced subset of the slices
    (smoke tests only: 3D Dice then covers only those slices).
    """

    def __init__(self, cache_dir, split: str = "test", seed: int = 0, min_area: int = 0, max_slices: int | None = None):
        self.cache_dir, self.split, self.seed = str(cache_dir), split, seed
        self.cache = pipeline.Cache(cache_dir)
        rows = self.cache.split_rois(split)
        rows = rows[np.lexsort((rows["label"], rows["slice"], rows["volume_id"]))]
        self.dataset_of_volume = {i: Path(v["dataset"]).name or v["dataset"] for i, v in enumerate(self.cache.volumes)}
        self.datasets = sorted({self.dataset_of_volume[int(v)] for v in rows["volume_id"]})
        self.skipped = {d: {"empty": 0, "small": 0} for d in self.datasets}

        slice_keys = sorted({(int(r["volume_id"]), int(r["slice"])) for r in rows})
        if max_slices is not None and max_slices < len(slice_keys):
            pick = np.unique(np.linspace(0, len(slice_keys) - 1, max_slices).round().astype(int))
            keep = {slice_keys[i] for i in pick}
            rows = rows[[(int(r["volume_id"]), int(r["slice"])) in keep for r in rows]]

        kept, areas, points, boxes = [], [], [], []
        for r in rows:
            mask = self.cache.roi(r)["mask"]
            area = int(mask.sum())  # recounted: never trust a table for an empty mask
            ds = self.dataset_of_volume[int(r["volume_id"])]
            if area == 0:
                self.skipped[ds]["empty"] += 1
                continue
            if area < min_area:
                self.skipped[ds]["small"] += 1
                continue
            kept.append(r)
            areas.append(area)
            # Prompts, identical for every model: the clicks of the point conditions, the boxes of
            # the box ones.
            conds = pipeline.condition_prompts(mask, int(r["roi_id"]), seed)
            points.append([p["point"] for p in conds[:NUM_POINT]])
            boxes.append([p["box"] for p in conds[NUM_POINT:]])
        self.rows = np.array(kept, dtype=rows.dtype) if kept else rows[:0]
        n = len(self.rows)
        self.area = np.array(areas, np.int64)  # |G| of each ROI at the slice's resolution
        self.dataset = np.array([self.dataset_of_volume[int(v)] for v in self.rows["volume_id"]], dtype=object)
        self.points = np.array(points, np.float32).reshape(n, NUM_POINT, 2)
        self.boxes = np.array(boxes, np.float32).reshape(n, NUM_CONDITIONS - NUM_POINT, 4)
        # Slices: (volume, slice) -> ROI indices; the largest groups first so that batches hold
        # slices with similar ROI counts (fewer padded decoder slots).
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(self.rows):
            groups.setdefault((int(r["volume_id"]), int(r["slice"])), []).append(i)
        self.slices = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        shapes = [self.cache.volume_arrays(v)[0].shape[1:] for v in {k[0] for k, _ in self.slices}]
        self.max_hw = (max(s[0] for s in shapes), max(s[1] for s in shapes)) if shapes else (1, 1)

    def __len__(self):
        return len(self.rows)

    def gt_voxels(self) -> dict:
        """{(volume_id, label): voxel count of the label in the whole cached volume}."""
        out = {}
        for v in sorted({int(x) for x in self.rows["volume_id"]}):
            labels = np.asarray(self.cache.volume_arrays(v)[1])
            counts = np.bincount(labels.ravel().astype(np.int64))
            for lab in {int(x) for x in self.rows["label"][self.rows["volume_id"] == v]}:
                out[(v, lab)] = int(counts[lab])
        return out

    def prompt_table(self) -> list[dict]:
        """The prompts, one record per ROI and condition (written to prompts.json)."""
        out = []
        for i, r in enumerate(self.rows):
            for c, name in enumerate(CONDITION_NAMES):
                rec = {"roi_id": int(r["roi_id"]), "condition": name}
                if c < NUM_POINT:
                    rec["point"] = [round(float(x), 4) for x in self.points[i, c]]
                else:
                    rec["box"] = [round(float(x), 4) for x in self.boxes[i, c - NUM_POINT]]
                out.append(rec)
        return out

    def batch(self, slice_ids: list[int], image_size: int, batch_size: int, rois_per_call: int) -> dict:
        """Host arrays of one batch of slices, padded to batch_size slices (valid_slice) and to a
        multiple of rois_per_call ROI slots per slice (roi_valid)."""
        s, emb = image_size, image_size // 4  # mask logits are 4E x 4E = S/4
        hm, wm = self.max_hw
        groups = [self.slices[i] for i in slice_ids]
        r_max = max(len(g[1]) for g in groups)
        r_tot = -(-r_max // rois_per_call) * rois_per_call
        b = {
            "image": np.zeros((batch_size, s, s, 3), np.float32),
            "labelmap": np.zeros((batch_size, hm, wm), np.int32),
            "ry": np.zeros((batch_size, hm, emb), np.float32),
            "rx": np.zeros((batch_size, wm, emb), np.float32),
            "roi_label": np.full((batch_size, r_tot), -1, np.int32),
            "roi_index": np.full((batch_size, r_tot), -1, np.int64),
            "points": np.zeros((batch_size, r_tot, NUM_POINT, 2), np.float32),
            "boxes": np.zeros((batch_size, r_tot, NUM_CONDITIONS - NUM_POINT, 4), np.float32),
            "valid_slice": np.zeros((batch_size,), bool),
        }
        for j, ((v, k), idx) in enumerate(groups):
            images, labels = self.cache.volume_arrays(v)
            h, w = images.shape[1:]
            b["image"][j] = pipeline.sam2_image(np.asarray(images[k]), s)
            b["labelmap"][j, :h, :w] = labels[k]
            b["ry"][j] = metrics.bilinear_matrix(emb, h, hm)
            b["rx"][j] = metrics.bilinear_matrix(emb, w, wm)
            b["roi_label"][j, : len(idx)] = self.rows["label"][idx]
            b["roi_index"][j, : len(idx)] = idx
            b["points"][j, : len(idx)] = pipeline.to_input_coords(self.points[idx], (h, w), s)
            b["boxes"][j, : len(idx)] = pipeline.to_input_coords(
                self.boxes[idx].reshape(len(idx), -1, 2, 2), (h, w), s
            ).reshape(len(idx), -1, 4)
            b["valid_slice"][j] = True
        b["pc"], b["pl"], b["bc"], b["bl"] = prompt_tokens(b["points"], b["boxes"])
        return b


# ---------------------------------------------------------------------------------------------
# Device functions


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """Training's 1D `data` mesh over all devices, or over the first num_devices of them."""
    if not num_devices or num_devices == jax.device_count():
        return parallel.make_mesh()
    return jax.make_mesh(
        (num_devices,),
        (parallel.DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )


def prompt_tokens(points: np.ndarray, boxes: np.ndarray):
    """Decoder inputs (coords, labels) for clicks [..., 2] and boxes [..., 4] (input pixels),
    SAM 2's layout from the shared prompting module, 3 tokens each: click -> [(x, y) 1,
    (0, 0) -1, pad -2]; box -> [(x0, y0) 2, (x1, y1) 3, (0, 0) -1]."""
    lead = points.shape[:-1]
    pts = points.reshape(-1, 1, 2)
    pc, pl = prompting.sam2_tokens(points=pts, point_labels=np.ones(pts.shape[:2], np.int32), length=3)
    bc, bl = prompting.sam2_tokens(box=boxes.reshape(-1, 4), length=3)
    return (
        pc.reshape(lead + (3, 2)),
        pl.reshape(lead + (3,)),
        bc.reshape(boxes.shape[:-1] + (3, 2)),
        bl.reshape(boxes.shape[:-1] + (3,)),
    )


class ModelFunctions:
    """jit-compiled encode / decode of one model, state replicated over the mesh."""

    def __init__(self, model: nnx.Module, mesh):
        self.graphdef, state = nnx.split(model)
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(parallel.DATA_AXIS))
        self.state = jax.device_put(state, rep)
        graphdef = self.graphdef

        def encode(state, images):
            return nnx.merge(graphdef, state).encode_image(images)

        def decode(state, features, pc, pl, bc, bl):
            """features of B slices; click tokens pc [B, R, 5, 3, 2] / pl [B, R, 5, 3] and box
            tokens bc / bl (prompt_tokens) -> mask logits [B, R, 10, L, L] (conditions in CONDITIONS
            order) and the kept mask's predicted IoU [B, R, 10]."""
            model = nnx.merge(graphdef, state)
            b, r, npnt = pl.shape[:3]
            nbox = bl.shape[2]
            assert npnt == nbox, "as many point as box conditions"
            n = b * r * npnt
            feats = jax.tree.map(lambda x: jnp.repeat(x, r * npnt, axis=0), features)
            emb = features["image_embed"].shape[1] * 4
            no_mask = jnp.zeros((n, emb, emb, 1), jnp.float32)
            has_mask = jnp.zeros((n,), bool)
            m3, iou3, _, _ = model.decode(feats, pc.reshape(n, -1, 2), pl.reshape(n, -1), no_mask, has_mask, True)
            best = jnp.argmax(iou3, axis=-1)  # highest predicted IoU of the three
            mp = jnp.take_along_axis(m3, best[:, None, None, None], axis=1)[:, 0]
            ip = jnp.take_along_axis(iou3, best[:, None], axis=1)[:, 0]
            m1, iou1, _, _ = model.decode(feats, bc.reshape(n, -1, 2), bl.reshape(n, -1), no_mask, has_mask, False)
            logits = jnp.concatenate([mp.reshape(b, r, npnt, emb, emb), m1[:, 0].reshape(b, r, nbox, emb, emb)], axis=2)
            iou = jnp.concatenate([ip.reshape(b, r, npnt), iou1[:, 0].reshape(b, r, nbox)], axis=2)
            return logits, iou

        self.encode = jax.jit(encode, in_shardings=(rep, data), out_shardings=data)
        self.decode = jax.jit(decode, in_shardings=(rep, data, data, data, data, data), out_shardings=(data, data))


def _counts(logits, labelmap, roi_label, ry, rx):
    """|P & G| and |P| [B, R, C] at each slice's resolution (shared by all models)."""
    gt = labelmap[:, None] == roi_label[:, :, None, None]  # [B, R, H, W]
    return metrics.mask_counts(logits, ry[:, None, None], rx[:, None, None], gt[:, :, None])


# ---------------------------------------------------------------------------------------------
# The evaluation loop


@dataclasses.dataclass
class Result:
    models: list[dict]  # name, directory, kind, base, timing
    rois: RoiSet
    intersection: dict[str, np.ndarray]  # model -> [N, 10] |P & G|
    pred_sum: dict[str, np.ndarray]  # model -> [N, 10] |P|
    iou_pred: dict[str, np.ndarray]  # model -> [N, 10] predicted IoU of the kept mask
    overlays: dict  # (model, roi index) -> logits [10, L, L] float32
    image_size: int
    elapsed_s: float

    @property
    def gt_sum(self) -> np.ndarray:
        return self.rois.area

    def dice(self, model: str) -> np.ndarray:
        """[N, 10] per-ROI 2D Dice (metrics.dice_from_counts)."""
        return metrics.dice_from_counts(self.intersection[model], self.pred_sum[model], self.gt_sum[:, None])

    def dice_3d(self, model: str) -> dict:
        """{(volume_id, label): [10] 3D Dice} (metrics.dice_3d)."""
        keys = list(zip(self.rois.rows["volume_id"].tolist(), self.rows_label()))
        return metrics.dice_3d(self.intersection[model], self.pred_sum[model], keys, self._gt_voxels())

    def rows_label(self):
        return self.rois.rows["label"].tolist()

    def _gt_voxels(self):
        if not hasattr(self, "_gt_vox"):
            self._gt_vox = self.rois.gt_voxels()
        return self._gt_vox


def pick_overlay_rois(rois: RoiSet, count: int) -> list[int]:
    """A few ROIs for the overlay figure: the largest ROI of each label, largest first."""
    best: dict[int, int] = {}
    for i, r in enumerate(rois.rows):
        lab = int(r["label"])
        if lab not in best or r["area"] > rois.rows["area"][best[lab]]:
            best[lab] = i
    order = sorted(best.values(), key=lambda i: -int(rois.rows["area"][i]))
    return order[:count]


def _new_timing() -> dict:
    return {
        "encode_s": 0.0,
        "decode_s": 0.0,
        "slices": 0,
        "prompts": 0,
        "encode_calls": 0,
        "decode_calls": 0,
        "compile_s": 0.0,
    }


class _Accumulator:
    """Per-model counts, predicted IoUs, overlays and timings filled batch by batch."""

    def __init__(self, models: list[EvalModel], n: int, overlay_rois):
        self.inter = {m.name: np.zeros((n, NUM_CONDITIONS), np.int64) for m in models}
        self.psum = {m.name: np.zeros((n, NUM_CONDITIONS), np.int64) for m in models}
        self.ioup = {m.name: np.full((n, NUM_CONDITIONS), np.nan, np.float32) for m in models}
        self.timing = {m.name: _new_timing() for m in models}
        self.overlay_rois = set(overlay_rois)
        self.overlays = {}

    def store(self, name: str, idx, ci, cp, iou, logits):
        ok = idx >= 0
        self.inter[name][idx[ok]] = ci[ok]
        self.psum[name][idx[ok]] = cp[ok]
        self.ioup[name][idx[ok]] = iou[ok]
        for bj, rj in zip(*np.nonzero(ok)):
            if int(idx[bj, rj]) in self.overlay_rois:
                self.overlays[(name, int(idx[bj, rj]))] = np.asarray(logits[bj, rj], np.float32)


def _run_batch(f: ModelFunctions, name: str, host: dict, dev: dict, acc: _Accumulator, counts_fn, first: bool):
    """One model on one batch: encode its slices once, decode every ROI slot group, count."""
    t = acc.timing[name]
    data, rpc = dev["sharding"], dev["rois_per_call"]

    def tokens(c0):  # prompt tokens of ROI slots c0 .. c0 + rois_per_call
        return [jax.device_put(host[k][:, c0 : c0 + rpc], data) for k in ("pc", "pl", "bc", "bl")]

    if first:  # compile outside the timed region (and with the real shapes)
        t0 = time.perf_counter()
        feats = jax.block_until_ready(f.encode(f.state, dev["image"]))
        jax.block_until_ready(f.decode(f.state, feats, *tokens(0)))
        t["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = jax.block_until_ready(f.encode(f.state, dev["image"]))
    t["encode_s"] += time.perf_counter() - t0
    t["encode_calls"] += 1
    t["slices"] += int(host["valid_slice"].sum())
    for c0 in range(0, host["roi_label"].shape[1], rpc):
        idx = host["roi_index"][:, c0 : c0 + rpc]
        if (idx < 0).all():
            continue
        tok = tokens(c0)
        lab = jax.device_put(host["roi_label"][:, c0 : c0 + rpc], data)
        t0 = time.perf_counter()
        logits, iou = jax.block_until_ready(f.decode(f.state, feats, *tok))
        t["decode_s"] += time.perf_counter() - t0
        t["decode_calls"] += 1
        t["prompts"] += int((idx >= 0).sum()) * NUM_CONDITIONS
        ci, cp = counts_fn(logits, dev["labelmap"], lab, dev["ry"], dev["rx"])
        acc.store(name, idx, np.asarray(ci), np.asarray(cp), np.asarray(iou), logits)


def _model_info(m: EvalModel, t: dict, n: int) -> dict:
    enc = t["encode_s"] / max(t["slices"], 1)
    dec = t["decode_s"] / max(t["prompts"], 1)
    return {
        "name": m.name,
        "directory": m.directory,
        "kind": m.kind,
        "base": m.base,
        "native_image_size": m.description.get("sam2", {}).get("image_size"),
        "timing": {
            **t,
            "encode_s_per_slice": enc,
            "decode_s_per_prompt": dec,
            # one interactive prediction: encode its slice once, decode one prompt
            "inference_s_per_roi": enc + dec,
            # throughput of the protocol itself (ROIs x 10 conditions, slices shared)
            "rois_per_s": n / max(t["encode_s"] + t["decode_s"], 1e-12),
        },
    }


def evaluate(
    models: list[EvalModel],
    rois: RoiSet,
    image_size: int,
    batch_size: int = 8,
    rois_per_call: int = 1,
    mesh=None,
    overlay_rois=(),
    progress: bool = True,
    log=None,
) -> Result:
    """Runs every model on every slice of `rois` (see the module docstring)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    mesh = mesh or make_mesh()
    ndev = mesh.devices.size
    if batch_size % ndev:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {ndev} devices")
    if len(rois) == 0:
        raise ValueError(f"{rois.cache_dir}: split {rois.split!r} has no ROI to evaluate")
    data = NamedSharding(mesh, P(parallel.DATA_AXIS))
    counts_fn = jax.jit(_counts, in_shardings=(data,) * 5, out_shardings=(data, data))
    fns = [ModelFunctions(m.model, mesh) for m in models]
    n = len(rois)
    acc = _Accumulator(models, n, overlay_rois)
    batches = [list(range(i, min(i + batch_size, len(rois.slices)))) for i in range(0, len(rois.slices), batch_size)]
    # Same slice count per batch on every call: the last batch is padded (valid_slice False).
    make = lambda ids: rois.batch(ids, image_size, batch_size, rois_per_call)

    t_start = time.perf_counter()
    done_rois = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(make, batches[0])
        for bi in range(len(batches)):
            host = future.result()
            if bi + 1 < len(batches):
                future = pool.submit(make, batches[bi + 1])
            dev = {k: jax.device_put(host[k], data) for k in ("image", "labelmap", "ry", "rx")}
            dev.update(sharding=data, rois_per_call=rois_per_call)
            for m, f in zip(models, fns):
                _run_batch(f, m.name, host, dev, acc, counts_fn, first=bi == 0)
            done_rois += int((host["roi_index"] >= 0).sum())
            if progress:
                el = time.perf_counter() - t_start
                rate = done_rois / el
                eta = (n - done_rois) / rate if rate > 0 else math.inf
                log(
                    f"[evaluate] batch {bi + 1}/{len(batches)}: {done_rois}/{n} ROIs x "
                    f"{NUM_CONDITIONS} conditions x {len(models)} models, {rate:.2f} ROIs/s, "
                    f"eta {eta:.0f} s"
                )
    elapsed = time.perf_counter() - t_start
    model_info = [_model_info(m, acc.timing[m.name], n) for m in models]
    return Result(model_info, rois, acc.inter, acc.psum, acc.ioup, acc.overlays, image_size, elapsed)


def time_base_overhead(model: EvalModel, image_size: int, mesh, batch_size: int, repeats: int = 10) -> dict | None:
    """Inference time per ROI (encode + one box prompt) of a SafeClick model and of its base
    network (the same SAM 2 without the SafeClick head) on the same random input, median of
    `repeats`; None for a plain SAM 2 model. Used when the run has no plain SAM 2 of the same size."""
    base = registry.base_model(model.model)
    if base is None:
        return None
    data = NamedSharding(mesh, P(parallel.DATA_AXIS))
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32), data)
    pts = np.full((batch_size, 1, NUM_POINT, 2), image_size / 2, np.float32)
    box = np.tile(
        np.array([image_size / 4, image_size / 4, 3 * image_size / 4, 3 * image_size / 4], np.float32),
        (batch_size, 1, NUM_POINT, 1),
    )
    tok = [jax.device_put(x, data) for x in prompt_tokens(pts, box)]
    out = {}
    for key, net in (("safeclick", model.model), ("base", base)):
        f = ModelFunctions(net, mesh)
        jax.block_until_ready(f.decode(f.state, f.encode(f.state, images), *tok))
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f.decode(f.state, f.encode(f.state, images), *tok))
            runs.append(time.perf_counter() - t0)
        # one call = batch_size slices x 10 prompts: per ROI = encode/slice + decode/prompt is not
        # separable here, so report the call time per slice (same work for both networks).
        out[key] = float(np.median(runs)) / batch_size
    out["ratio"] = out["safeclick"] / out["base"]
    return out
