"""VolumePredictor: click or box on one slice, get the structure through the whole volume.

    p = VolumePredictor.from_checkpoint("ckpt/sam2.1_t")
    p.set_volume("ct.nii.gz", axis=2)                 # or a 3D array
    p.add_prompt(40, points=[[120, 88]], labels=[1])  # slice 40, (x = column, y = row)
    p.add_prompt(40, points=[[130, 95]], labels=[0])  # corrective click, same slice
    p.add_prompt(55, box=[100, 70, 150, 120])         # several slices may be prompted
    labels = p.propagate()                            # uint8 0/1, the input's voxel grid

Slices are treated as video frames with SAM 2's memory (SAM2VideoPredictor's semantics for one
object, with `add_all_frames_to_correct_as_cond=True`: every prompted slice becomes a
conditioning slice; prompts on a slice accumulate and the slice's previous logits are fed back as
the mask prompt). `propagate()` commits the prompted slices to memory (binarised masks), then tracks
forward from the first prompted slice to the end and backward from it to slice 0, as
`propagate_in_video` does. Prompting a slice after propagation corrects it with the memory of the
other slices; propagate again to update the volume.

Geometry: a NIfTI file is reoriented to RAS and sliced like the data pipeline
(safeclick_jax.data.preprocess.to_slices: radiological display orientation), so the model sees
slices as in training. Prompt coordinates of `add_prompt` are on those slice images (x = column,
y = row); `voxel_to_slice` maps a voxel index (i, j, k) of the input array/file to them. `axis`
is an axis of the input's voxel grid. The result is returned in the input's voxel grid.
Intensities are normalised to [0, 1] like the data pipeline (percentile clipping by default, or
a CT window), quantised to 8 bits and fed as SAM 2's RGB input (bilinear antialiased resize).

Compilation: the per-slice step is compiled per volume shape (the memory bank holds one entry
per slice, see safeclick_jax/video.py) and per memory-slot bucket (2, 4 or 6 previous slices:
at most three variants); the prompt decoder once per prompt-length bucket.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import scipy.ndimage
from flax import nnx

from safeclick_jax import video
from safeclick_jax.data import nifti
from safeclick_jax.data.preprocess import axis_index, from_slices, normalize_intensity, to_slices, to_uint8
from safeclick_jax.models.memory import SAM2Memory
from safeclick_jax.models.registry import load_model
from safeclick_jax.models.sam2 import PAD_LABEL
from safeclick_jax.predictor import preprocess

IDENTITY_ORNT = np.array([[0, 1], [1, 1], [2, 1]], np.float64)


def fill_holes(logits: np.ndarray, max_area: int) -> np.ndarray:
    """sam2.utils.misc.fill_holes_in_mask_scores on one [h, w] map: background components
    (logit <= 0, 8-connected) of at most `max_area` pixels get the logit 0.1. SAM 2 runs it with
    a CUDA kernel (and silently skips it without one); here it runs on the host with scipy."""
    if max_area <= 0:
        return logits
    lab, n = scipy.ndimage.label(logits <= 0, structure=np.ones((3, 3), bool))
    if n == 0:
        return logits
    small = np.bincount(lab.ravel()) <= max_area
    small[0] = False
    return np.where(small[lab], np.float32(0.1), logits).astype(np.float32)


def volume_shape(path, volume_index: int | None = None) -> tuple[nib.Nifti1Image, tuple]:
    """(nibabel image, 3D voxel shape) of a NIfTI file, from its header; a 4D file needs
    `volume_index`."""
    img = nifti.read_header(path)
    shape = nifti._squeeze_trailing(img.shape)
    if len(shape) == 4 and volume_index is None:
        raise nifti.VolumeError(
            f"{path}: 4D file of shape {tuple(img.shape)} holds {shape[3]} volumes; "
            "choose one with volume_index (CLI: --volume-index)"
        )
    if len(shape) == 4 and not 0 <= volume_index < shape[3]:
        raise nifti.VolumeError(f"{path}: volume index {volume_index} outside 0..{shape[3] - 1}")
    if len(shape) == 3 and volume_index not in (None, 0):
        raise nifti.VolumeError(f"{path}: volume index {volume_index} given but the file is 3D {tuple(shape)}")
    if len(shape) not in (3, 4):
        raise nifti.VolumeError(f"{path}: {len(shape)}D file of shape {tuple(img.shape)}; a 3D volume is needed")
    return img, tuple(shape[:3])


def read_volume(path, volume_index: int | None = None):
    """A NIfTI file -> (RAS data, orientation of the file's voxel axes, nibabel image)."""
    img, shape = volume_shape(path, volume_index)
    vol = nifti.load_nifti(path, channel=volume_index if len(nifti._squeeze_trailing(img.shape)) == 4 else None)
    return vol.data, nib.orientations.io_orientation(img.affine), img


class VolumePredictor:
    def __init__(self, model: nnx.Module, memory: SAM2Memory, description: dict | None = None, fill_hole_area: int = 8):
        self.model, self.memory = model, memory
        self.description = description or {}
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split((model, memory))
        self.fill_hole_area = fill_hole_area  # SAM2VideoPredictor's default (build_sam.py)
        self._slices = None

    @classmethod
    def from_checkpoint(cls, directory: str, memory_checkpoint: str | None = None, **kw) -> "VolumePredictor":
        """`memory_checkpoint`: take the memory path from another model directory (e.g. the SAM 2
        base of a SafeClick export that was saved without it)."""
        model, desc, extra = load_model(directory)
        where = directory
        if memory_checkpoint is not None:
            _, _, extra = load_model(memory_checkpoint)
            where = memory_checkpoint
        return cls(model, SAM2Memory.from_extra(model.cfg, extra, where=where), desc, **kw)

    # --- volume ---------------------------------------------------------------------------------

    def set_volume(
        self,
        volume,
        axis=2,
        volume_index: int | None = None,
        normalization: str = "percentile",
        ct_window=(40.0, 400.0),
    ) -> None:
        """volume: a 3D array (any numeric dtype) or a NIfTI path. axis: slicing axis of the input's
        voxel grid (0/1/2). normalization: 'percentile' (0.5-99.5 %) or 'ct_window' (level, width)."""
        if isinstance(volume, (str, os.PathLike)):
            data, ornt, _ = read_volume(volume, volume_index)
        else:
            data, ornt = np.asarray(volume), IDENTITY_ORNT
            if data.ndim != 3:
                raise ValueError(f"volume must be 3D, got shape {data.shape}")
            if data.dtype.kind not in "biuf":
                raise ValueError(f"volume has unsupported dtype {data.dtype}")
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise ValueError("volume has NaN or Inf values")
        if min(data.shape) < 1:
            raise ValueError(f"volume is empty: shape {data.shape}")
        axis = axis_index(axis)
        self._ornt = np.asarray(ornt)
        self._ras_axis = int(self._ornt[axis, 0])
        self._ras_shape = data.shape
        self._in_shape = tuple(data.shape[int(o)] for o in self._ornt[:, 0])
        image = to_uint8(normalize_intensity(data, normalization, ct_window=ct_window))
        slices = to_slices(image, self._ras_axis)
        self.num_slices, self.slice_hw = slices.shape[0], tuple(slices.shape[1:])
        self._slices = jnp.asarray(slices)
        self.reset_prompts()

    def _require_volume(self):
        if self._slices is None:
            raise RuntimeError("set a volume with .set_volume(...) first")

    def voxel_to_slice(self, ijk) -> tuple[int, float, float]:
        """Voxel index (i, j, k) of the input grid -> (slice index, x, y) on the slice images."""
        self._require_volume()
        ijk = np.asarray(ijk, np.float64)
        if ijk.shape != (3,):
            raise ValueError(f"a voxel index needs 3 values (i, j, k), got {ijk.tolist()}")
        bad = (ijk < 0) | (ijk > np.asarray(self._in_shape) - 1)
        if bad.any():
            raise ValueError(
                f"point {ijk.tolist()} lies outside the volume (voxel indices 0..n-1 of shape {self._in_shape})"
            )
        ras = np.empty(3)
        for a, (out, flip) in enumerate(self._ornt):
            ras[int(out)] = ijk[a] if flip > 0 else self._in_shape[a] - 1 - ijk[a]
        s = ras[self._ras_axis]
        if abs(s - round(s)) > 1e-6:
            raise ValueError(f"point {ijk.tolist()}: the index along the slicing axis must be an integer")
        p, q = [ax for ax in range(3) if ax != self._ras_axis]
        # to_slices: rows = q reversed, columns = p reversed
        return int(round(s)), float(self._ras_shape[p] - 1 - ras[p]), float(self._ras_shape[q] - 1 - ras[q])

    def _to_input_grid(self, slices: np.ndarray) -> np.ndarray:
        ras = from_slices(slices, self._ras_axis)
        out = np.transpose(ras, [int(o) for o in self._ornt[:, 0]])
        for a, flip in enumerate(self._ornt[:, 1]):
            if flip < 0:
                out = np.flip(out, a)
        return np.ascontiguousarray(out)

    # --- jit-compiled steps (graphdef static, state an argument) ----------------------------------

    @partial(jax.jit, static_argnums=(0,))
    def _encode(self, state, slices, t):
        model, _ = nnx.merge(self.graphdef, state)
        sl = jax.lax.dynamic_index_in_dim(slices, t, 0, keepdims=False)
        return video.encode_frame(
            model, preprocess(jnp.broadcast_to(sl[..., None], sl.shape + (3,)), self.cfg.image_size)
        )

    @partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
    def _track(self, state, bank, feats, t, reverse, cond_idx, cond_valid, prev):
        model, mem = nnx.merge(self.graphdef, state)
        return video.track_step(model, mem, feats, bank, t, reverse, cond_idx, cond_valid, prev, self.cfg.image_size)

    @partial(jax.jit, static_argnums=(0, 13, 14))
    def _prompt(
        self,
        state,
        bank,
        feats,
        t,
        reverse,
        cond_idx,
        cond_valid,
        prev,
        coords,
        labels,
        mask_in,
        has_mask,
        use_memory: bool,
        multimask: bool,
    ):
        model, mem = nnx.merge(self.graphdef, state)
        if use_memory:
            pix = video.condition_features(model, mem, feats, bank, t, reverse, cond_idx, cond_valid, prev)
        else:
            pix = video.no_memory_features(model, feats)
        return video.sam_heads(model, mem, feats, pix, coords, labels, mask_in, has_mask, multimask)

    @partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
    def _commit(self, state, bank, feats, t, low, ptr, obj):
        _, mem = nnx.merge(self.graphdef, state)
        f = video.encode_memory(mem, feats, low, obj, True, self.cfg.image_size)
        return video.write(bank, t, f, ptr, 2, low, obj)

    def _features(self, t: int):
        return self._encode(self.state, self._slices, jnp.int32(t))

    @partial(jax.jit, static_argnums=(0, 2))
    def _resize(self, low, hw):
        # SAM 2's video-resolution output: bilinear, align_corners=False, no antialias
        return jax.image.resize(low, (low.shape[0],) + hw, "linear", antialias=False)

    def _memory_slots(self, t: int, reverse: bool):
        return tuple(jnp.asarray(a) for a in video.memory_slots(self._kind, t, reverse, self.memory.mc.num_maskmem))

    def _cond_slots(self):
        k = 1 << max(len(self._cond) - 1, 0).bit_length()
        idx = np.zeros(k, np.int32)
        idx[: len(self._cond)] = self._cond
        return jnp.asarray(idx), jnp.asarray(np.arange(k) < len(self._cond))

    # --- prompting ------------------------------------------------------------------------------

    def add_prompt(
        self, slice_index: int, points=None, labels=None, box=None, clear: bool = False, return_logits: bool = False
    ) -> np.ndarray:
        """Prompts one slice; returns its mask [H, W] (bool, or logits). points [P,2] (x, y) with
        labels [P] (1 foreground, 0 background); box (x0, y0, x1, y1) replaces the slice's earlier
        prompts (SAM 2 puts a box first); points add to them unless `clear`."""
        self._require_volume()
        t = int(slice_index)
        if not 0 <= t < self.num_slices:
            raise ValueError(f"slice {slice_index} outside the volume (0..{self.num_slices - 1})")
        h, w = self.slice_hw
        limit = np.array([w, h], np.float32)
        new_c, new_l = [], []
        if box is not None:
            b = np.asarray(box, np.float32).reshape(-1)
            if b.shape != (4,):
                raise ValueError(f"box must be (x0, y0, x1, y1), got {np.asarray(box).tolist()}")
            if b[2] < b[0] or b[3] < b[1]:
                raise ValueError(f"box {b.tolist()}: needs x1 >= x0 and y1 >= y0")
            new_c.append(b.reshape(2, 2))
            new_l.append(np.array([2, 3], np.int32))
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if points is not None:
            pc, pl = np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels, np.int32).reshape(-1)
            if pc.shape[0] != pl.shape[0]:
                raise ValueError(f"{pc.shape[0]} points but {pl.shape[0]} labels")
            if not np.isin(pl, (0, 1)).all():
                raise ValueError(f"labels must be 0 (background) or 1 (foreground); got {np.unique(pl).tolist()}")
            new_c.append(pc)
            new_l.append(pl)
        if not new_c:
            raise ValueError("give points (with labels) or a box")
        coords, labs = np.concatenate(new_c), np.concatenate(new_l)
        bad = ((coords < 0) | (coords > limit)).any(-1)
        if bad.any():
            raise ValueError(
                f"prompt at {coords[bad][0].tolist()} lies outside slice {t} (x in [0, {w}], y in [0, {h}])"
            )
        if box is None and not clear and t in self._points:
            old_c, old_l = self._points[t]
            coords, labs = np.concatenate([old_c, coords]), np.concatenate([old_l, labs])
        self._points[t] = (coords, labs)

        is_init = t not in self._tracked
        reverse = self._tracked.get(t, False)
        prev = self._previous_logits(t)
        n = coords.shape[0] + 1  # + SAM's (0,0) pad point
        p = -(-n // video.PROMPT_BUCKET) * video.PROMPT_BUCKET
        s = self.cfg.image_size
        c = np.zeros((1, p, 2), np.float32)
        c[0, : n - 1] = coords * np.array([s / w, s / h], np.float32)
        lab = np.full((1, p), PAD_LABEL, np.int32)
        lab[0, : n - 1] = labs
        lab[0, n - 1] = -1
        m = 4 * self.cfg.embedding_size
        mask_in = np.zeros((1, m, m, 1), np.float32) if prev is None else np.clip(prev, -32, 32)[None, :, :, None]
        cond_idx, cond_valid = self._cond_slots()
        feats = self._features(t)
        low, ptr, obj = self._prompt(
            self.state,
            self._bank,
            feats,
            jnp.int32(t),
            jnp.asarray(reverse),
            cond_idx,
            cond_valid,
            self._memory_slots(t, reverse),
            jnp.asarray(c),
            jnp.asarray(lab),
            jnp.asarray(mask_in),
            jnp.asarray([prev is not None]),
            not is_init,
            coords.shape[0] <= 1,
        )
        low = jnp.asarray(fill_holes(np.asarray(low[0]), self.fill_hole_area))[None]
        self._pending[t] = (low, ptr, obj, feats)
        out = np.asarray(self._resize(low, self.slice_hw))[0]
        return out if return_logits else out > 0

    def _previous_logits(self, t):
        if t in self._pending:
            return np.asarray(self._pending[t][0][0])
        if self._tracked.get(t) is not None or t in self._cond:
            return fill_holes(np.asarray(self._bank["masks"][t]), self.fill_hole_area)
        return None

    def reset_prompts(self) -> None:
        """Forgets every prompt and tracking result of the current volume."""
        self._require_volume()
        e, mc = self.cfg.embedding_size, self.memory.mc
        self._bank = video.empty_bank(self.num_slices, e, mc.mem_dim, mc.d_model)
        self._points = {}  # slice -> (coords [P,2] slice pixels, labels [P])
        self._pending = {}  # slice -> (low [1,4E,4E], ptr, obj, features): prompted, not in memory yet
        self._cond = []  # slices committed as conditioning slices
        self._tracked = {}  # slice -> tracked in reverse?
        self._kind = np.zeros(self.num_slices, np.int32)  # host copy of the bank's `kind`

    # --- propagation ----------------------------------------------------------------------------

    def propagate(self, progress=None) -> np.ndarray:
        """Tracks through the volume -> uint8 0/1 label volume in the input's voxel grid.
        `progress(done, total)` is called after every slice when given."""
        self._require_volume()
        if not self._pending and not self._cond:
            raise RuntimeError("no prompts: add a point or box with .add_prompt(...) first")
        for t, (low, ptr, obj, feats) in sorted(self._pending.items()):
            self._bank = self._commit(self.state, self._bank, feats, jnp.int32(t), low, ptr, obj)
            self._kind[t] = 2
            if t not in self._cond:
                self._cond.append(t)
        self._pending = {}
        self._cond.sort()
        cond_idx, cond_valid = self._cond_slots()
        start = self._cond[0]
        order = [(t, False) for t in range(start, self.num_slices)]
        if start > 0:
            order += [(t, True) for t in range(start, -1, -1)]
        for i, (t, reverse) in enumerate(order):
            if t not in self._cond:
                self._bank = self._track(
                    self.state,
                    self._bank,
                    self._features(t),
                    jnp.int32(t),
                    jnp.asarray(reverse),
                    cond_idx,
                    cond_valid,
                    self._memory_slots(t, reverse),
                )
                self._kind[t] = 1
            self._tracked[t] = reverse
            if progress is not None:
                progress(i + 1, len(order))
        masks = self.slice_logits() > 0
        return self._to_input_grid(masks.astype(np.uint8))

    def slice_logits(self, chunk: int = 16) -> np.ndarray:
        """The current mask logits of every slice at slice resolution [N, H, W] (holes filled),
        in slice order and orientation (the slice images of `add_prompt`)."""
        self._require_volume()
        low = np.asarray(self._bank["masks"])
        for t, (pl, *_) in self._pending.items():
            low[t] = np.asarray(pl[0])
        kind = np.asarray(self._bank["kind"])
        untouched = (kind == 0) & ~np.isin(np.arange(self.num_slices), list(self._pending))
        low = np.stack([fill_holes(x, self.fill_hole_area) for x in low])
        low[untouched] = video.NO_OBJ_SCORE
        out = np.empty((self.num_slices,) + self.slice_hw, np.float32)
        for i in range(0, self.num_slices, chunk):
            part = low[i : i + chunk]
            if part.shape[0] < chunk:  # one compiled shape
                part = np.concatenate([part, np.zeros((chunk - part.shape[0],) + part.shape[1:], np.float32)])
            out[i : i + chunk] = np.asarray(self._resize(jnp.asarray(part), self.slice_hw))[
                : min(chunk, self.num_slices - i)
            ]
        return out
