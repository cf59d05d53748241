"""grain pipelines over a prepared cache (see prepare.py), for training and evaluation.

Training:
  ds = make_dataset(cache_dir, "train", image_size=1024, batch_size=8, seed=0)
  it = make_iterator(cache_dir, "train", ...)   # grain DatasetIterator: get_state() / set_state()
  batch = next(it)

Every batch is a dict of numpy arrays (B batch, S image_size):
  image        float32 [B, S, S, 3]  SAM 2 input: uint8/255 -> bilinear antialiased resize to S x S
                                     -> 3 channels -> (x - MEAN) / STD
  mask         uint8   [B, S, S]     ground truth 0/1 at input resolution (nearest resize)
  point_coords float32 [B, 1, 2]     (x, y) in input pixels (x = column)
  point_labels int32   [B, 1]        1: positive click
  box          float32 [B, 4]        (x0, y0, x1, y1) in input pixels
  prompt_type  int32   [B]           0 point, 1 box (both prompts are always filled)
  prompt_param float32 [B]           displacement fraction (point) or scale (box)
  roi_id       int32   [B]           row in the cache's rois.npy
Evaluation batches (make_eval_dataset) add condition int32 [B] (index into prompts.CONDITIONS)
and valid bool [B] (False on padding rows of the last batch).

Prompts are simulated on the raw (cache-resolution) mask and then mapped to input pixels the way
SAM 2's predictor maps them: x * S / W, y * S / H (SAM 2 resizes to a square, no padding).
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import grain
import jax
import numpy as np

from safeclick_jax.data import prompts, roi_index
from safeclick_jax.image import IMAGE_MEAN, IMAGE_STD

MEAN = np.asarray(IMAGE_MEAN, np.float32)
STD = np.asarray(IMAGE_STD, np.float32)
_NPY_OPEN_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Reading the cache


class Cache:
    """The cache of `prepare`: ROI table, volume metadata, memory-mapped slice arrays."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        for name in ("volumes.json", "rois.npy"):
            if not (self.cache_dir / name).exists():
                raise FileNotFoundError(
                    f"{self.cache_dir / name} missing: run "
                    f"`python -m safeclick_jax.data.prepare --out {self.cache_dir}` first"
                )
        self.volumes = json.loads((self.cache_dir / "volumes.json").read_text())
        self.rois = np.load(self.cache_dir / "rois.npy")
        self._arrays = {}

    def __getstate__(self):  # memory maps are reopened lazily in another process
        return {**self.__dict__, "_arrays": {}}

    def split_rois(self, split: str | None) -> np.ndarray:
        if split is None:
            return self.rois
        if split not in roi_index.SPLIT_CODE:
            raise ValueError(f"split {split!r}: expected one of {roi_index.SPLITS}")
        return self.rois[self.rois["split"] == roi_index.SPLIT_CODE[split]]

    def split_counts(self) -> dict[str, int]:
        """ROIs per split, e.g. {'train': 120, 'val': 0, 'test': 30}."""
        return {name: int((self.rois["split"] == code).sum()) for name, code in roi_index.SPLIT_CODE.items()}

    def volume_arrays(self, volume_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8, labels) slices [num_slices, H, W] of one volume, memory-mapped."""
        if volume_id not in self._arrays:
            # grain reads from several threads, and np.load parses the .npy header with
            # ast.literal_eval, which CPython 3.11 < 3.11.8 can corrupt when run concurrently
            # ("SystemError: AST constructor recursion depth mismatch", cpython#106905).
            with _NPY_OPEN_LOCK:
                if volume_id not in self._arrays:
                    v = self.volumes[volume_id]
                    self._arrays[volume_id] = (
                        np.load(self.cache_dir / v["image_file"], mmap_mode="r"),
                        np.load(self.cache_dir / v["label_file"], mmap_mode="r"),
                    )
        return self._arrays[volume_id]

    def roi(self, row) -> dict:
        """Raw ROI sample: image uint8 [H, W], mask uint8 [H, W] (label == value) and its ids."""
        images, labels = self.volume_arrays(int(row["volume_id"]))
        k = int(row["slice"])
        return {
            "image": np.asarray(images[k]),
            "mask": (labels[k] == row["label"]).astype(np.uint8),
            "roi_id": int(row["roi_id"]),
            "volume_id": int(row["volume_id"]),
            "slice": k,
            "label": int(row["label"]),
            "area": int(row["area"]),
        }


class RoiSource:
    """grain random-access source: element i is the raw ROI sample of the split's i-th ROI."""

    def __init__(self, cache: Cache, split: str | None, rows: np.ndarray | None = None):
        self.cache = cache
        self.rows = cache.split_rois(split) if rows is None else rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.cache.roi(self.rows[i])


def iter_roi_slices(cache_dir, split: str | None = "test"):
    """Yields raw ROI samples (see Cache.roi) of a split in (volume, slice, label) order."""
    cache = Cache(cache_dir)
    rows = cache.split_rois(split)
    for i in np.lexsort((rows["label"], rows["slice"], rows["volume_id"])):
        yield cache.roi(rows[i])


def load_volume(cache_dir, volume_id: int) -> dict:
    """One cached volume: {'image', 'labels'} as RAS arrays (preprocessed, resampled) + metadata.
    The slices of iter_roi_slices index `axis` of these arrays."""
    from safeclick_jax.data import preprocess

    cache = Cache(cache_dir)
    images, labels = cache.volume_arrays(volume_id)
    summary = json.loads((cache.cache_dir / "summary.json").read_text())
    axis = summary["config"]["axis"]
    return {
        "image": preprocess.from_slices(np.asarray(images), axis),
        "labels": preprocess.from_slices(np.asarray(labels), axis),
        "axis": axis,
        **cache.volumes[volume_id],
    }


# ---------------------------------------------------------------------------------------------
# SAM 2 input transform


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of a 1D linear (triangle) resize with antialiasing.

    Same kernel as torch's interpolate(mode='bilinear', antialias=True, align_corners=False) and
    jax.image.resize(method='linear', antialias=True): the triangle is widened by the downscale
    factor (so every input pixel contributes when shrinking) and weights are renormalised at the
    borders. Upsampling reduces to ordinary bilinear interpolation.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale - 0.5  # output pixel centres in input coords
    src = np.arange(in_size)
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centers[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[H, W] float -> [out_h, out_w] float32, separable antialiased linear resize."""
    image = np.asarray(image, dtype=np.float32)
    return resize_matrix(image.shape[0], out_h) @ image @ resize_matrix(image.shape[1], out_w).T


def resize_nearest(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize sampling at pixel centres (torch's 'nearest-exact')."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def sam2_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """Raw slice (uint8 [H, W], or float in [0, 1]) -> float32 [S, S, 3] SAM 2 model input."""
    x = np.asarray(image)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    # Resizing one channel then replicating equals resizing the 3-channel image: the resize is
    # linear and per channel.
    x = resize_bilinear(x, image_size, image_size)
    # One channel at a time: numpy broadcasting over a trailing axis of 3 is ~2x slower here.
    out = np.empty(x.shape + (3,), np.float32)
    for c in range(3):
        out[..., c] = (x - MEAN[c]) / STD[c]
    return out


def to_input_coords(xy: np.ndarray, orig_hw, image_size: int) -> np.ndarray:
    """Pixel (x, y) pairs (last axis) of an H x W image -> pixels of the S x S model input."""
    h, w = orig_hw
    return np.asarray(xy, dtype=np.float32) * np.array([image_size / w, image_size / h], dtype=np.float32)


def to_input_box(box: np.ndarray, orig_hw, image_size: int) -> np.ndarray:
    return to_input_coords(np.asarray(box).reshape(-1, 2), orig_hw, image_size).reshape(-1)


def _model_sample(sample: dict, prompt: dict, image_size: int, include_image: bool = True) -> dict:
    hw = sample["image"].shape
    out = {
        "mask": resize_nearest(sample["mask"], image_size, image_size).astype(np.uint8),
        "point_coords": to_input_coords(prompt["point"], hw, image_size).reshape(1, 2),
        "point_labels": np.ones((1,), np.int32),
        "box": to_input_box(prompt["box"], hw, image_size).astype(np.float32),
        "prompt_type": np.int32(prompt["prompt_type"]),
        "prompt_param": np.float32(prompt["param"]),
        "roi_id": np.int32(sample["roi_id"]),
    }
    if include_image:  # training from cached image embeddings skips the costly resize/normalise
        out["image"] = sam2_image(sample["image"], image_size)
    return out


class TrainSample(grain.transforms.RandomMap):
    """Per-sample prompt simulation with grain's per-element seeded rng, then the SAM 2 transform."""

    def __init__(
        self,
        image_size: int,
        p_box: float = 0.5,
        point_fraction_range=(0.0, 1.0),
        box_scale_range=(0.5, 1.5),
        grid: bool = False,
        include_image: bool = True,
        point_mode: str = "displaced",
    ):
        self.image_size, self.include_image = image_size, include_image
        self.kw = dict(
            p_box=p_box,
            point_fraction_range=tuple(point_fraction_range),
            box_scale_range=tuple(box_scale_range),
            grid=grid,
            point_mode=point_mode,
        )

    def random_map(self, sample, rng: np.random.Generator):
        prompt = prompts.sample_training_prompt(sample["mask"], rng, **self.kw)
        return _model_sample(sample, prompt, self.image_size, self.include_image)


# ---------------------------------------------------------------------------------------------
# Datasets


def _shard(ds: grain.MapDataset, shard_index: int | None, shard_count: int | None):
    """Disjoint, equal-size shard per JAX process (rows index::count of the ROI list, before the
    shuffle). Equal sizes because every process must step the same number of batches, so up to
    shard_count - 1 ROIs are left out; each process then shuffles its own shard."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    n = len(ds) // shard_count * shard_count
    return ds[:n][shard_index::shard_count]


def make_dataset(
    cache_dir,
    split: str = "train",
    *,
    image_size: int = 1024,
    batch_size: int = 8,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    p_box: float = 0.5,
    point_fraction_range=(0.0, 1.0),
    box_scale_range=(0.5, 1.5),
    prompt_grid: bool = False,
    include_image: bool = True,
    rows: np.ndarray | None = None,
    point_mode: str = "displaced",
) -> grain.MapDataset:
    """Training MapDataset of batches (see module docstring). num_epochs None repeats forever;
    each epoch is reshuffled and gets new prompts. `seed` seeds both shuffle and prompts. `rows`:
    these ROI rows instead of the split's (a held-out part of a split)."""
    cache = Cache(cache_dir)
    ds = grain.MapDataset.source(RoiSource(cache, split, rows))
    if len(ds) == 0:
        raise ValueError(f"{cache_dir}: split {split!r} has no ROI")
    ds = _shard(ds, shard_index, shard_count)
    if len(ds) == 0:
        raise ValueError(f"{cache_dir}: split {split!r} has fewer ROIs than processes")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.random_map(
        TrainSample(image_size, p_box, point_fraction_range, box_scale_range, prompt_grid, include_image, point_mode),
        seed=seed + 1,
    )
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_dataset_from_config(cfg, split: str = "train", **overrides) -> grain.MapDataset:
    """make_dataset with the settings of default_data_config()."""
    kw = dict(
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        seed=cfg.shuffle_seed,
        p_box=cfg.p_box,
        point_fraction_range=tuple(cfg.point_fraction_range),
        box_scale_range=tuple(cfg.box_scale_range),
        prompt_grid=cfg.prompt_grid,
        point_mode=cfg.point_mode,
    )
    kw.update(overrides)
    return make_dataset(cfg.cache_dir, split, **kw)


def holdout_rows(rows: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask over `rows`: per volume, the last `fraction` of its slices that hold ROIs (at
    least one slice, never all of them), so held-out ROIs share no slice with the rest."""
    keep = np.zeros(len(rows), bool)
    for v in np.unique(rows["volume_id"]):
        in_v = rows["volume_id"] == v
        slices = np.unique(rows["slice"][in_v])
        n = min(max(int(round(fraction * len(slices))), 1), len(slices) - 1)
        if n > 0:
            keep |= in_v & np.isin(rows["slice"], slices[-n:])
    return keep


def make_iterator(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
    """Threaded iterator over a MapDataset; checkpoint it with get_state() / set_state()."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


# ---------------------------------------------------------------------------------------------
# Evaluation: the paper's ten prompt conditions per ROI, from a fixed seed


def condition_prompt(mask: np.ndarray, roi_id: int, condition: int, seed: int = 0) -> dict:
    """Prompt of one of prompts.CONDITIONS for one ROI, in raw pixel coordinates.

    The rng is seeded by (seed, roi_id, condition index): independent of the order, batching or
    sharding of evaluation, so every run and every model sees the same prompts.
    """
    kind, param = prompts.CONDITIONS[condition]
    p = prompts.condition_prompt(mask, kind, param, np.random.default_rng([seed, roi_id, condition]))
    p.update(condition=condition, name=prompts.condition_name(kind, param), param=float(param))
    return p


def condition_prompts(mask: np.ndarray, roi_id: int, seed: int = 0) -> list[dict]:
    """The paper's ten conditions for one ROI (see condition_prompt)."""
    return [condition_prompt(mask, roi_id, c, seed) for c in range(len(prompts.CONDITIONS))]


def eval_conditions(cache_dir, split: str = "test", seed: int = 0):
    """Yields each raw ROI sample (see Cache.roi) with 'conditions': condition_prompts(...)."""
    for sample in iter_roi_slices(cache_dir, split):
        sample["conditions"] = condition_prompts(sample["mask"], sample["roi_id"], seed)
        yield sample


class _EvalSource:
    """Element i = (ROI i // 10, condition i % 10) of a split, at model input size."""

    def __init__(self, cache: Cache, split: str, image_size: int, seed: int, include_image: bool = True, rows=None):
        self.cache, self.rows = cache, cache.split_rois(split) if rows is None else rows
        self.image_size, self.seed, self.include_image = image_size, seed, include_image

    def __len__(self):
        return len(self.rows) * len(prompts.CONDITIONS)

    def __getitem__(self, i):
        row, c = divmod(i, len(prompts.CONDITIONS))
        sample = self.cache.roi(self.rows[row])
        p = condition_prompt(sample["mask"], sample["roi_id"], c, self.seed)
        out = _model_sample(sample, p, self.image_size, self.include_image)
        out["condition"] = np.int32(c)
        out["valid"] = np.bool_(True)
        return out


def _pad_batch(batch_size: int):
    def stack(items):
        pad = batch_size - len(items)
        items = list(items) + [{k: np.zeros_like(v) for k, v in items[0].items()}] * pad
        return {k: np.stack([it[k] for it in items]) for k in items[0]}

    return stack


def make_eval_dataset(
    cache_dir,
    split: str = "test",
    *,
    image_size: int = 1024,
    batch_size: int = 8,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    include_image: bool = True,
    rows: np.ndarray | None = None,
) -> grain.MapDataset:
    """Deterministic batches of (ROI, condition) pairs, every batch padded to batch_size (padding
    rows have valid=False), sharded across processes without dropping anything. `rows`: these ROI
    rows instead of the split's."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    ds = grain.MapDataset.source(_EvalSource(Cache(cache_dir), split, image_size, seed, include_image, rows))
    ds = ds[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=False, batch_fn=_pad_batch(batch_size))
