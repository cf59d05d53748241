"""Frozen-encoder outputs, computed once per (volume, slice) and reused across epochs and runs.

The image encoder (Hiera + FPN neck), conv_s0/conv_s1 and no_mem_embed are frozen in SafeClick
training (paper sec. 3), so their outputs for a slice never change: several ROIs (one per label
value) share a slice, and every epoch revisits every slice. They are stored as float16 .npy
files, memory-mapped when read:

    ROOT/<key>/image_embed.npy  [N, E, E, 256]    (the decoder's 1/16 features + no_mem_embed)
    ROOT/<key>/high_res_0.npy   [N, 4E, 4E, 32]   (conv_s0 output)
    ROOT/<key>/high_res_1.npy   [N, 2E, 2E, 64]   (conv_s1 output)
    ROOT/<key>/block.npy        [N, h, w, c]      (SafeClick's raw Hiera block, when E1 needs it)
    ROOT/<key>/index.json       key, the (volume, slice) of each row, timing
    ROOT/<key>/COMPLETE         written last: a folder without it is an interrupted build

`key` is a SHA-256 of every frozen encoder parameter, the image size, the kept block, the storage
dtype and the identity of the data cache (volumes.json, rois.npy, the preprocessing config and
each volume file's size and mtime): a new checkpoint, another resolution or a re-prepared
dataset gives a new key, so a stale cache is never read. Old keys stay on disk until deleted.
At 1024 px a slice costs ~11 MB (tiny) in float16; at 128 px ~0.2 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safeclick_jax.data import pipeline, roi_index
from safeclick_jax.models.safeclick import is_frozen_encoder_path
from safeclick_jax.models.sam2 import encode_image

FORMAT = 1
NAMES = ("image_embed", "high_res_0", "high_res_1", "block")


def encoder_fingerprint(model: nnx.Module) -> str:
    h = hashlib.sha256()
    for path, var in sorted(nnx.state(model).flat_state(), key=lambda kv: tuple(map(str, kv[0]))):
        if is_frozen_encoder_path(path):
            a = np.asarray(var[...])
            h.update("/".join(map(str, path)).encode() + str(a.shape).encode() + str(a.dtype).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def data_fingerprint(cache_dir) -> str:
    d = Path(cache_dir)
    h = hashlib.sha256()
    h.update((d / "volumes.json").read_bytes())
    h.update((d / "rois.npy").read_bytes())
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    h.update(json.dumps(summary.get("config"), sort_keys=True).encode())
    for v in json.loads((d / "volumes.json").read_text()):
        st = (d / v["image_file"]).stat()
        h.update(f"{v['image_file']}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(model, data_cache_dir, image_size: int, keep_block: int | None, dtype: str) -> str:
    parts = [
        f"format={FORMAT}",
        f"size={image_size}",
        f"block={keep_block}",
        f"dtype={dtype}",
        f"encoder={encoder_fingerprint(model)}",
        f"data={data_fingerprint(data_cache_dir)}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


class EmbeddingCache:
    """Read side: `features(roi_ids)` -> dict of numpy arrays (storage dtype) for a batch."""

    def __init__(self, directory, data_cache_dir):
        self.directory = Path(directory)
        self.index = json.loads((self.directory / "index.json").read_text())
        self.arrays = {
            n: np.load(self.directory / f"{n}.npy", mmap_mode="r")
            for n in NAMES
            if (self.directory / f"{n}.npy").exists()
        }
        rois = pipeline.Cache(data_cache_dir).rois
        row_of = {(v, s): i for i, (v, s) in enumerate(self.index["slices"])}
        # roi_id -> row (-1: slice not cached, e.g. a test ROI); padding rows of eval batches
        # (roi_id 0, valid False) read row 0 and are masked by the caller.
        self.row_of_roi = np.array([row_of.get((int(r["volume_id"]), int(r["slice"])), -1) for r in rois], np.int64)

    def __len__(self):
        return len(self.index["slices"])

    def rows(self, roi_ids, strict: bool = True) -> np.ndarray:
        rows = self.row_of_roi[np.asarray(roi_ids)]
        if strict and (rows < 0).any():
            raise KeyError(f"ROIs {np.asarray(roi_ids)[rows < 0][:5].tolist()} have no cached embedding")
        return np.maximum(rows, 0)

    def features(self, roi_ids, strict: bool = True) -> dict:
        rows = self.rows(roi_ids, strict)
        order = np.argsort(rows, kind="stable")  # sorted reads from the memory map
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return {n: np.asarray(a[rows[order]])[inv] for n, a in self.arrays.items()}


def slices_of(data_cache_dir, splits) -> list[tuple[int, int]]:
    rois = pipeline.Cache(data_cache_dir).rois
    keep = np.isin(rois["split"], [roi_index.SPLIT_CODE[s] for s in splits])
    return sorted({(int(r["volume_id"]), int(r["slice"])) for r in rois[keep]})


def build(
    model: nnx.Module,
    data_cache_dir,
    image_size: int,
    keep_block: int | None,
    root=None,
    splits=("train", "val"),
    batch_size: int = 8,
    dtype: str = "float16",
    log=print,
) -> EmbeddingCache:
    """The cache of `model`'s frozen encoder over the slices of `splits`: reused when its key
    exists, else computed (in fixed-size batches, one compiled program) and written atomically."""
    root = Path(root or Path(data_cache_dir) / "embeddings")
    t0 = time.perf_counter()
    key = cache_key(model, data_cache_dir, image_size, keep_block, dtype)
    final = root / key
    if (final / "COMPLETE").exists():
        cache = EmbeddingCache(final, data_cache_dir)
        log(f"embedding cache: reusing {final} ({len(cache)} slices, key {time.perf_counter() - t0:.1f} s)")
        return cache
    slices = slices_of(data_cache_dir, splits)
    if not slices:
        raise ValueError(f"{data_cache_dir}: no ROI in splits {splits}")
    log(f"embedding cache: computing {len(slices)} slices at {image_size} px -> {final}")
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data = pipeline.Cache(data_cache_dir)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, images):
        f = encode_image(nnx.merge(graphdef, state), images, keep_block=keep_block)
        out = {
            "image_embed": f["image_embed"],
            "high_res_0": f["high_res_feats"][0],
            "high_res_1": f["high_res_feats"][1],
        }
        if keep_block is not None:
            out["block"] = f["block"]
        return jax.tree.map(lambda x: x.astype(dtype), out)

    arrays = None
    t1 = time.perf_counter()
    for start in range(0, len(slices), batch_size):
        chunk = slices[start : start + batch_size]
        imgs = np.zeros((batch_size, image_size, image_size, 3), np.float32)
        for i, (v, s) in enumerate(chunk):
            imgs[i] = pipeline.sam2_image(np.asarray(data.volume_arrays(v)[0][s]), image_size)
        out = jax.device_get(encode(state, jnp.asarray(imgs)))
        if arrays is None:
            arrays = {
                n: np.lib.format.open_memmap(
                    tmp / f"{n}.npy", mode="w+", dtype=dtype, shape=(len(slices),) + a.shape[1:]
                )
                for n, a in out.items()
            }
        for n, a in out.items():
            arrays[n][start : start + len(chunk)] = a[: len(chunk)]
    for a in arrays.values():
        a.flush()
    seconds = time.perf_counter() - t1
    (tmp / "index.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "key": key,
                "image_size": image_size,
                "keep_block": keep_block,
                "dtype": dtype,
                "data_cache": str(Path(data_cache_dir).resolve()),
                "splits": list(splits),
                "slices": [list(s) for s in slices],
                "seconds": seconds,
                "slices_per_s": len(slices) / max(seconds, 1e-9),
            }
        )
    )
    (tmp / "COMPLETE").write_text("ok\n")
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same key first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"embedding cache: {len(slices)} slices in {seconds:.1f} s ({len(slices) / max(seconds, 1e-9):.1f} slices/s)")
    return EmbeddingCache(final, data_cache_dir)
