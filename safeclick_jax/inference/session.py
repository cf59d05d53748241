"""VolumePredictor: interactive 3D segmentation of several structures with SAM 2's memory.

    p = VolumePredictor.from_checkpoint("ckpt/sam2.1_t")
    p.set_volume("ct.nii.gz", axis=2)                             # or a 3D array
    p.add_prompt(40, points=[[120, 88]], labels=[1], obj_id=1)    # slice 40, (x = column, y = row)
    p.add_prompt(52, box=[100, 70, 150, 120], obj_id=2)           # a second structure
    labels = p.propagate()                                        # uint8 label map, values = ids
    p.add_prompt(47, points=[[130, 95]], labels=[0], obj_id=1)    # correction on a tracked slice
    labels = p.propagate()                                        # re-tracks object 1 from slice 47
    p.undo()                                                      # the propagation, then the click

Slices are video frames for SAM2VideoPredictor's semantics (sam2 1.1.0, which runs every object
alone with batch size 1; `add_all_frames_to_correct_as_cond=True`: every prompted slice becomes
a conditioning slice). Each object has its own prompts and memory bank (safeclick_jax/video.py);
all objects share the slice features, encoded once per slice and kept on the host
(safeclick_jax/feature_cache.py), so a correction costs only tracking steps.

- Prompts on a slice accumulate (a box replaces them, SAM 2 puts a box first) and the slice's
  previous logits are fed back as the mask prompt. A slice not yet tracked for that object is
  decoded without memory, a tracked one with the memory of the other slices.
- `add_mask` is SAM 2's add_new_mask: the binary mask becomes the slice's output (logits +-10)
  without memory, and its object pointer comes from the decoder with the mask as dense prompt.
- `set_labels` starts from a label map: each label is an object whose largest slice (most
  voxels) is its mask prompt (`slices="all"`: every labelled slice; see docs/interactive.md).
- `propagate()` commits the new prompts to memory (binarised masks) and tracks the objects that
  changed, from one start slice (default: the earliest slice prompted since their last
  propagation, SAM 2's default) forward to the end and backward to slice 0, or at most
  `max_slices` each way (propagate_in_video's start_frame_idx / max_frame_num_to_track). Slices
  outside that range, and objects that did not change, keep their masks.
- `label_map()` composes the objects with SAM 2's non-overlap rule
  (SAM2Base._apply_non_overlapping_constraints): a voxel belongs to the object with the highest
  logit when that logit is > 0 (ties: the lower id). It is applied to the output only, not to
  what the memory encoder sees (SAM 2's default, non_overlap_masks=False), so every object's
  tracking equals SAM 2's for that object.
- `undo` / `redo` step through an object's interactions (a click or box, a mask, a propagation,
  a reset); without an id, through the last call over all objects (inference/history.py).

Geometry (inference/geometry.py): a volume is reoriented to RAS and sliced like the data
pipeline, so the model sees slices as in training; `voxel_to_slice` maps a voxel index (i, j, k)
of the input array/file to the slice images. Results are returned in the input's voxel grid.
Intensities are normalised to [0, 1] like the data pipeline (percentile clipping, or a CT
window), quantised to 8 bits and fed as SAM 2's RGB input (bilinear antialiased resize).

Compilation: the model steps (inference/steps.py) are shared by every predictor of the same
model and independent of the volume's size; with `fixed_memory_slots` each compiles once.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safeclick_jax import prompting, video
from safeclick_jax.data.preprocess import (
    CT_WINDOW,
    PERCENTILES,
    axis_index,
    normalize_intensity,
    resolve_mode,
    to_slices,
    to_uint8,
)
from safeclick_jax.data.volume_file import Volume, check_array, integer_labels, read_label_map, read_volume
from safeclick_jax.feature_cache import FeatureCache, available_host_bytes
from safeclick_jax.inference import steps
from safeclick_jax.inference.geometry import IDENTITY_ORNT, SliceGeometry
from safeclick_jax.inference.history import History, ObjectState
from safeclick_jax.inference.interactions import check_entry, to_json
from safeclick_jax.inference.limits import MAX_OBJECT_ID
from safeclick_jax.inference.prompts import SlicePrompt, binary_mask, clicks_and_box, lasso_mask, scribble_points
from safeclick_jax.models.memory import SAM2Memory

MIN_COND_SLOTS = 4  # with fixed_memory_slots: prompted slices in memory before a recompile


class VolumePredictor:
    def __init__(
        self,
        model: nnx.Module,
        memory: SAM2Memory,
        description: dict | None = None,
        fill_hole_area: int = 8,
        cache_bytes: int | None = None,
        fixed_memory_slots: bool = False,
    ):
        self.model, self.memory = model, memory
        # True: memory slots padded to one size (MIN_COND_SLOTS prompted slices, num_maskmem - 1
        # previous ones), so each step compiles once; for small models, where compiling costs
        # seconds and attending to masked slots almost nothing (the web app's demo)
        self.fixed_memory_slots = fixed_memory_slots
        self.description = description or {}
        self.cfg = model.cfg
        graphdef, state = nnx.split((model, memory))
        self.model_key, self.state = steps.ModelKey.of(graphdef), jax.device_put(state)
        self.fill_hole_area = fill_hole_area  # SAM2VideoPredictor's default (build_sam.py)
        s = self.cfg.image_size
        image = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
        shapes = jax.eval_shape(lambda st, im: steps.encode(self.model_key, st, im), self.state, image)
        per_slice = [x for k, v in shapes.items() if k != "pos" for x in jax.tree.leaves(v)]  # pos: stored once
        self.bytes_per_slice = int(sum(x.size * x.dtype.itemsize for x in per_slice))
        self._cache = None
        self.set_cache_budget(cache_bytes)
        self.slices = None  # uint8 [N, H, W]: the slice images the model sees (set_volume)
        self.geometry: SliceGeometry | None = None
        self.volume: Volume | None = None
        self.normalization = None  # the intensity mapping of the current volume (set_volume)
        self.interactions: list[dict] = []  # every call that changed the objects (inference/interactions.py)

    @classmethod
    def from_checkpoint(
        cls, directory: str, memory_checkpoint: str | None = None, cache_bytes: int | None = None, **kw
    ) -> "VolumePredictor":
        """`memory_checkpoint`: take the memory path from another model directory (e.g. the SAM 2
        base of a SafeClick export that was saved without it)."""
        from safeclick_jax.inference.loader import load_model

        m = load_model(directory, memory_checkpoint=memory_checkpoint, memory="required")
        return cls(m.network, m.memory, m.description, cache_bytes=cache_bytes, **kw)

    def set_cache_budget(self, cache_bytes: int | None) -> None:
        """Host memory for slice features (None: the whole volume, at most half the free memory).
        A budget below one slice is refused."""
        if cache_bytes is not None:
            if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, np.integer)):
                raise ValueError(f"cache_bytes must be an integer number of bytes, got {cache_bytes!r}")
            if cache_bytes < self.bytes_per_slice:
                raise ValueError(
                    f"cache_bytes {cache_bytes} is smaller than one slice's features ({self.bytes_per_slice} bytes)"
                )
        self._cache_request = None if cache_bytes is None else int(cache_bytes)
        if self._cache is not None:
            self._cache.budget_bytes = self._cache_budget(self.num_slices)
            while len(self._cache._entries) > self._cache.capacity:
                self._cache._entries.popitem(last=False)

    def _cache_budget(self, num_slices: int) -> int:
        if self._cache_request is not None:
            return self._cache_request
        return max(self.bytes_per_slice, min(num_slices * self.bytes_per_slice, available_host_bytes() // 2))

    def cache_info(self) -> dict:
        """bytes_per_slice, budget_bytes, capacity_slices, cached_slices, cached_bytes, hits, misses, evictions."""
        if self._cache is None:
            return {
                "bytes_per_slice": self.bytes_per_slice,
                "budget_bytes": self._cache_request,
                "cached_slices": 0,
                "hits": 0,
                "misses": 0,
            }
        return self._cache.info()

    # --- volume ---------------------------------------------------------------------------------

    def set_volume(
        self,
        volume,
        axis=2,
        volume_index: int | None = None,
        normalization: str = "auto",
        ct_window=None,
    ) -> None:
        """volume: a 3D array (any numeric dtype), a volume file path, or a Volume that
        data.volume_file.read_volume returned. axis: slicing axis of the input's voxel grid
        (0/1/2). normalization: 'auto', 'percentile' (0.5-99.5 %) or 'ct_window' (ct_window =
        (level, width) in HU, default 40, 400). 'auto' uses what the model's training data used
        when its model.json records it (a training export does), else the CT window for a volume
        in Hounsfield units and percentile clipping otherwise (preprocess.looks_like_ct). The mode
        used is `self.normalization`. Removes every object; slice features are encoded when first
        needed and cached."""
        resolve_mode(normalization)  # a bad name is refused before the file is read
        if isinstance(volume, (str, os.PathLike)):
            volume = read_volume(volume, volume_index)
        elif not isinstance(volume, Volume):
            data = check_array(volume)
            volume = Volume(data, np.eye(4), (1.0, 1.0, 1.0), "array", IDENTITY_ORNT, None)
        axis = axis_index(axis)
        data = volume.data
        trained = self.description.get("training", {}).get("data", {})
        if normalization == "auto":
            normalization = trained.get("normalization", "auto")
        mode = resolve_mode(normalization, data=data)
        window = tuple(float(v) for v in (ct_window or trained.get("ct_window") or CT_WINDOW))
        if len(window) != 2 or not window[1] > 0:
            raise ValueError(f"ct_window {ct_window!r}: expected (level, width) with width > 0")
        percentiles = trained.get("percentiles", PERCENTILES)
        image = to_uint8(normalize_intensity(data, mode, percentiles, window))
        geometry = SliceGeometry(volume.ornt, data.shape, axis)
        self.normalization = mode
        self.volume, self.geometry = volume, geometry
        self.slices = to_slices(image, geometry.ras_axis)
        self.num_slices, self.slice_hw = geometry.num_slices, geometry.slice_hw
        self._cache = FeatureCache(
            self._encode_slice, self.num_slices, self.bytes_per_slice, self._cache_budget(self.num_slices)
        )
        self._history = History()
        self.interactions = []

    @property
    def input_shape(self) -> tuple:
        """The voxel grid of the input (array or file) that label maps use."""
        self._require_volume()
        return self.geometry.input_shape

    def _require_volume(self):
        if self.slices is None:
            raise RuntimeError("set a volume with .set_volume(...) first")

    def voxel_to_slice(self, ijk) -> tuple[int, float, float]:
        """Voxel index (i, j, k) of the input grid -> (slice index, x, y) on the slice images."""
        self._require_volume()
        return self.geometry.voxel_to_slice(ijk)

    def to_input_grid(self, slices: np.ndarray) -> np.ndarray:
        """A [N, H, W] stack in slice orientation -> the input grid."""
        self._require_volume()
        return self.geometry.to_input_grid(slices)

    # --- compiled steps -------------------------------------------------------------------------

    def encode_slice(self, slice_index: int) -> None:
        """Encodes slice t into the feature cache (if not there yet): a click or tracking step on
        it then runs only the decoder (the web app encodes a volume's slices in the background)."""
        self._cache.get(self._check_slice(slice_index))

    def compile_volume_steps(self) -> None:
        """Compiles the small steps that depend on this volume's size (resizes to the slice size,
        gathers from and writes to the memory bank) by running them on zeros, so the first click
        and propagation on it do not wait for them (the model steps compile once per model)."""
        self._require_volume()
        e, mc, hw = self.cfg.embedding_size, self.memory.mc, self.slice_hw
        t = self.num_slices // 2
        low = np.zeros((1, 4 * e, 4 * e), np.float32)
        steps.resize(jnp.asarray(low), hw)
        next(self._upsample_chunks(low))
        steps.mask_to_input(jnp.zeros(hw, bool), self.cfg.image_size)
        steps.model_input(jnp.asarray(self.slices[t]), self.cfg.image_size)
        obj = self._new_object_state()
        obj.bank["masks"][t].block_until_ready()  # label_slice reads one slice
        self.memory_inputs(obj, t, False, self._cond_slots([t]))
        bank = jax.tree.map(jnp.copy, obj.bank)  # propagate works on a copy
        f = jnp.zeros((1, e, e, mc.mem_dim), jnp.bfloat16)
        ptr, score = jnp.zeros((1, mc.d_model), jnp.float32), jnp.zeros((1, 1), jnp.float32)
        for kind in (1, 2):  # tracked, prompted
            bank = steps.write(bank, jnp.int32(t), f, ptr, kind, jnp.asarray(low), score)
        jax.block_until_ready(bank)

    def _encode_slice(self, t: int) -> dict:
        return steps.encode(
            self.model_key, self.state, steps.model_input(jnp.asarray(self.slices[t]), self.cfg.image_size)
        )

    def slice_features(self, slice_index: int) -> dict:
        """Slice t's image features (from the feature cache; encoded on a miss)."""
        return self._cache.get(self._check_slice(slice_index))

    def memory_inputs(self, obj: ObjectState, t: int, reverse: bool, cond_slots=None) -> tuple:
        """The memory arguments of steps.prompt / steps.track for slice t: its bank entries
        (gathered by a step compiled per volume size) and where they sit."""
        cond_idx, cond_valid = self._cond_slots(obj.cond) if cond_slots is None else cond_slots
        prev = self._memory_slots(obj.kind, t, reverse)
        ti, rev = jnp.int32(t), jnp.asarray(reverse)
        entries = steps.bank_entries(obj.bank, ti, rev, cond_idx, prev[0], self.memory.mc.max_obj_ptrs_in_encoder)
        return entries, ti, rev, cond_idx, cond_valid, prev

    def _memory_slots(self, kind: np.ndarray, t: int, reverse: bool):
        n = self.memory.mc.num_maskmem
        slots = video.memory_slots(kind, t, reverse, n, min_slots=n - 1 if self.fixed_memory_slots else 1)
        return tuple(jnp.asarray(a) for a in slots)

    def _cond_slots(self, cond: list[int]):
        k = max(1 << max(len(cond) - 1, 0).bit_length(), MIN_COND_SLOTS if self.fixed_memory_slots else 1)
        idx = np.zeros(k, np.int32)
        idx[: len(cond)] = cond
        return jnp.asarray(idx), jnp.asarray(np.arange(k) < len(cond))

    # --- objects --------------------------------------------------------------------------------

    def _new_object_state(self) -> ObjectState:
        e, mc = self.cfg.embedding_size, self.memory.mc
        return ObjectState(
            video.empty_bank(self.num_slices, e, mc.mem_dim, mc.d_model), np.zeros(self.num_slices, np.int32)
        )

    @property
    def object_ids(self) -> list[int]:
        self._require_volume()
        return sorted(self._history.objects)

    def object_state(self, obj_id) -> ObjectState:
        """The object's current prompts and memory (read only: every change goes through a call)."""
        return self._object(obj_id)

    @staticmethod
    def _check_id(obj_id) -> int:
        if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)) or not 1 <= obj_id <= MAX_OBJECT_ID:
            raise ValueError(f"object id {obj_id!r}: must be an integer in 1..{MAX_OBJECT_ID}")
        return int(obj_id)

    def _object(self, obj_id) -> ObjectState:
        self._require_volume()
        k = self._check_id(obj_id)
        if k not in self._history.objects:
            raise ValueError(f"unknown object id {obj_id} (objects: {self.object_ids})")
        return self._history.objects[k]

    def add_object(self, obj_id: int | None = None) -> int:
        """A new, empty object; `obj_id` None takes the lowest free id."""
        self._require_volume()
        if obj_id is None:
            free = [k for k in range(1, MAX_OBJECT_ID + 1) if k not in self._history.objects]
            if not free:
                raise ValueError(f"all {MAX_OBJECT_ID} object ids are in use")
            obj_id = free[0]
        k = self._check_id(obj_id)
        if k in self._history.objects:
            raise ValueError(f"object id {k} exists already (objects: {self.object_ids})")
        self._history.add(k, self._new_object_state())
        self._record("add_object", obj_id=k)
        return k

    def remove_object(self, obj_id) -> None:
        """The object, its prompts, memory, mask and history are gone (not undoable)."""
        self._object(obj_id)
        self._history.remove(int(obj_id))
        self._record("remove_object", obj_id=int(obj_id))

    def reset_object(self, obj_id) -> None:
        """Forgets the object's prompts and memory; the id stays, the reset can be undone."""
        obj = self._object(obj_id)
        if not obj.has_prompts and not obj.tracked:
            return
        self._history.record(int(obj_id), self._history.next_call(), "reset", obj, self._new_object_state())
        self._record("reset_object", obj_id=int(obj_id))

    def reset_all(self) -> None:
        """Removes every object with its prompts, memory and history."""
        self._require_volume()
        self._history = History()
        self._record("reset_all")

    def _record(self, call: str, **args) -> None:
        self.interactions.append({"call": call, "args": to_json(args)})

    def replay(self, interactions, progress=None) -> None:
        """Applies recorded interactions (`interactions` of a session on this same volume, e.g.
        read back from JSON) in order: the objects, histories and label map come back as they
        were. `progress(done, total)` after each. A refused entry stops the replay with its error."""
        self._require_volume()
        entries = [check_entry(e, i) for i, e in enumerate(interactions)]
        for i, (call, args) in enumerate(entries):
            getattr(self, call)(**args)
            if progress is not None:
                progress(i + 1, len(entries))

    # --- history --------------------------------------------------------------------------------

    def undo(self, obj_id=None) -> str:
        """Undoes the object's last interaction (a click or box, a mask, a propagation, a reset);
        without an id, the last call over all objects. Returns what was undone."""
        self._require_volume()
        done = self._history.undo(None if obj_id is None else self._known(obj_id))
        self._record("undo", obj_id=obj_id if obj_id is None else int(obj_id))
        return done

    def redo(self, obj_id=None) -> str:
        """Redoes the last undone interaction (of the object, or over all objects)."""
        self._require_volume()
        done = self._history.redo(None if obj_id is None else self._known(obj_id))
        self._record("redo", obj_id=obj_id if obj_id is None else int(obj_id))
        return done

    def history(self, obj_id) -> list[str]:
        """The object's undoable interactions, oldest first."""
        return self._history.entries(self._known(obj_id))

    def _known(self, obj_id) -> int:
        self._object(obj_id)
        return int(obj_id)

    # --- prompting ------------------------------------------------------------------------------

    def _check_slice(self, slice_index) -> int:
        self._require_volume()
        if isinstance(slice_index, bool) or not isinstance(slice_index, (int, np.integer)):
            raise ValueError(f"slice index {slice_index!r} must be an integer")
        t = int(slice_index)
        if not 0 <= t < self.num_slices:
            raise ValueError(f"slice {slice_index} outside the volume (0..{self.num_slices - 1})")
        return t

    def _prepare_object(self, obj_id):
        """(id, state, created): the object of a prompt, created when new (not stored yet)."""
        self._require_volume()
        k = self._check_id(obj_id)
        if k in self._history.objects:
            return k, self._history.objects[k], False
        return k, self._new_object_state(), True

    def _install(self, k: int, created: bool, what: str, before: ObjectState, after: ObjectState):
        if created:
            self._history.add(k, before)
        self._history.record(k, self._history.next_call(), what, before, after)

    def add_prompt(
        self,
        slice_index: int,
        points=None,
        labels=None,
        box=None,
        obj_id: int = 1,
        clear: bool = False,
        return_logits: bool = False,
    ) -> np.ndarray:
        """Prompts one slice for object `obj_id` (created when new); returns its mask [H, W]
        (bool, or logits). points [P,2] (x, y) with labels [P] (1 foreground, 0 background); box
        (x0, y0, x1, y1) replaces the slice's earlier prompts (SAM 2 puts a box first); points
        add to them unless `clear`."""
        t = self._check_slice(slice_index)
        k, obj, created = self._prepare_object(obj_id)
        given = clicks_and_box(points, labels, box, self.slice_hw, t)
        n = 0 if given.points is None else len(given.points)
        what = f"box on slice {t}" if box is not None else f"click{'s' if n > 1 else ''} on slice {t}"
        low, new = self._prompt_state(obj, t, given, box is None and not clear)
        self._install(k, created, what, obj, new)
        self._record(
            "add_prompt", slice_index=t, points=given.points, labels=given.labels, box=given.box, obj_id=k, clear=clear
        )
        out = np.asarray(steps.resize(low, self.slice_hw))[0]
        return out if return_logits else out > 0

    def _prompt_state(self, obj: ObjectState, t: int, given: SlicePrompt, accumulate: bool):
        """(low-res logits, the object's new state) after the prompt `given` on slice t, added to
        the slice's earlier clicks when `accumulate`."""
        coords, labs = given.tokens()
        if accumulate and t in obj.points:
            old_c, old_l = obj.points[t]
            coords, labs = np.concatenate([old_c, coords]), np.concatenate([old_l, labs])

        h, w = self.slice_hw
        is_init = t not in obj.tracked
        reverse = obj.tracked.get(t, False)
        prev = self._previous_logits(obj, t)
        s = self.cfg.image_size
        c, lab = prompting.sam2_tokens(
            points=(coords * np.array([s / w, s / h], np.float32))[None], point_labels=labs[None]
        )
        m = 4 * self.cfg.embedding_size
        mask_in = np.zeros((1, m, m, 1), np.float32) if prev is None else np.clip(prev, -32, 32)[None, :, :, None]
        low, ptr, score = steps.prompt(
            self.model_key,
            self.state,
            self._cache.get(t),
            None if is_init else self.memory_inputs(obj, t, reverse),
            jnp.asarray(c),
            jnp.asarray(lab),
            jnp.asarray(mask_in),
            jnp.asarray([prev is not None]),
            coords.shape[0] <= 1,  # SAM 2's multimask for 0..1 points (a box is 2)
        )
        low = jnp.asarray(steps.fill_holes(np.asarray(low[0]), self.fill_hole_area))[None]
        new = obj.copy()
        new.points[t] = (coords, labs)
        new.masks.pop(t, None)
        new.pending[t] = (low, ptr, score)
        return low, new

    def add_scribble(self, slice_index: int, stroke, label: int = 1, obj_id: int = 1, return_logits: bool = False):
        """A freehand stroke on slice t, foreground (label 1) or background (0): points [N, 2]
        (x, y), N >= 2. It becomes a click of that label at its midpoint by arc length
        (prompts.scribble_points; docs/interactive.md says why), added to the slice's clicks.
        Returns the object's mask on the slice."""
        t = self._check_slice(slice_index)
        k, obj, created = self._prepare_object(obj_id)
        if isinstance(label, bool) or label not in (0, 1):
            raise ValueError(f"scribble label {label!r}: 1 (foreground) or 0 (background)")
        pts = scribble_points(stroke, self.slice_hw, t)
        given = clicks_and_box(pts, np.full(len(pts), label, np.int32), None, self.slice_hw, t)
        low, new = self._prompt_state(obj, t, given, True)
        kind = "background scribble" if label == 0 else "scribble"
        self._install(k, created, f"{kind} on slice {t}", obj, new)
        self._record("add_scribble", slice_index=t, stroke=np.asarray(stroke, np.float64), label=int(label), obj_id=k)
        out = np.asarray(steps.resize(low, self.slice_hw))[0]
        return out if return_logits else out > 0

    def add_lasso(self, slice_index: int, contour, obj_id: int = 1, return_logits: bool = False) -> np.ndarray:
        """A closed freehand contour on slice t (points [N, 2], x, y): the pixels it encloses
        (prompts.lasso_mask) are the slice's mask prompt, as add_mask. Returns the object's mask
        on the slice."""
        t = self._check_slice(slice_index)
        k, obj, created = self._prepare_object(obj_id)
        mask = lasso_mask(contour, self.slice_hw, t)
        out, new = self._mask_state(obj, t, mask)
        self._install(k, created, f"lasso on slice {t}", obj, new)
        self._record("add_lasso", slice_index=t, contour=np.asarray(contour, np.float64), obj_id=k)
        return out if return_logits else out > 0

    def add_mask(self, slice_index: int, mask, obj_id: int = 1, return_logits: bool = False) -> np.ndarray:
        """A binary mask [H, W] (slice-image orientation) as the prompt of slice t for object
        `obj_id` (SAM 2's add_new_mask: it replaces the slice's clicks and becomes its output).
        Returns the object's mask on the slice."""
        t = self._check_slice(slice_index)
        k, obj, created = self._prepare_object(obj_id)
        out, new = self._mask_state(obj, t, mask)
        self._install(k, created, f"mask on slice {t}", obj, new)
        self._record("add_mask", slice_index=t, mask=binary_mask(mask, self.slice_hw, "mask"), obj_id=k)
        return out if return_logits else out > 0

    def _mask_state(self, obj: ObjectState, t: int, mask, what: str | None = None):
        m = binary_mask(mask, self.slice_hw, what or f"mask for slice {t}")
        hr = np.asarray(steps.mask_to_input(jnp.asarray(m), self.cfg.image_size))
        low, ptr, score = steps.mask_prompt(
            self.model_key, self.state, self._cache.get(t), jnp.asarray(hr, jnp.float32)[None, ..., None]
        )
        low = jnp.asarray(steps.fill_holes(np.asarray(low[0]), self.fill_hole_area))[None]
        new = obj.copy()
        new.points.pop(t, None)
        new.masks[t] = hr
        new.pending[t] = (low, ptr, score)
        return np.asarray(steps.resize(low, self.slice_hw))[0], new

    def set_labels(self, label_map, slices: str = "largest") -> list[int]:
        """Starts from an existing segmentation: a 3D integer label map on the input grid (array,
        or a volume file with the volume's shape and affine) whose labels 1..255 become objects
        with those ids, each with a mask prompt on its largest slice (`slices="all"`: on every
        slice it covers). Replaces every object; one undo step per object. -> the object ids."""
        self._require_volume()
        if slices not in ("largest", "all"):
            raise ValueError(f"slices={slices!r}: use 'largest' or 'all'")
        if isinstance(label_map, (str, os.PathLike)):
            lab, where = read_label_map(label_map, self.volume), str(label_map)
        else:
            lab, where = np.asarray(label_map), "label map"
            if lab.shape != self.input_shape:
                raise ValueError(f"{where} has shape {lab.shape}; the volume is {self.input_shape}")
            lab = integer_labels(lab, where)
        ids = np.unique(lab)
        ids = ids[ids != 0]
        out_of_range = ids[(ids < 0) | (ids > MAX_OBJECT_ID)]
        if out_of_range.size:
            raise ValueError(f"{where}: labels must be in 0..{MAX_OBJECT_ID}, got {out_of_range[:5].tolist()}")
        if ids.size == 0:
            raise ValueError(f"{where} is empty (no label > 0)")
        stack = self.geometry.to_slice_stack(lab.astype(np.int32))
        states = {}
        for k in ids.astype(int).tolist():
            obj = self._new_object_state()
            area = (stack == k).sum((1, 2))
            chosen = [int(np.argmax(area))] if slices == "largest" else np.nonzero(area)[0].tolist()
            for t in chosen:
                _, obj = self._mask_state(obj, t, stack[t] == k, f"label {k} on slice {t}")
            states[k] = obj
        self._history = History()
        call = self._history.next_call()
        for k, obj in states.items():
            self._history.add(k, self._new_object_state())
            what = (
                "mask on slice " + ",".join(str(t) for t in sorted(obj.pending))
                if len(obj.pending) < 4
                else f"masks on {len(obj.pending)} slices"
            )
            self._history.record(k, call, f"{what} (initial labels)", self._history.objects[k], obj)
        self._record("set_labels", label_map=lab.astype(np.uint8), slices=slices)
        return sorted(states)

    def _previous_logits(self, obj: ObjectState, t: int):
        if t in obj.pending:
            return np.asarray(obj.pending[t][0][0])
        if obj.kind[t] != 0:
            return steps.fill_holes(np.asarray(obj.bank["masks"][t]), self.fill_hole_area)
        return None

    # --- propagation ----------------------------------------------------------------------------

    def propagate(self, obj_ids=None, start: int | None = None, max_slices: int | None = None, progress=None):
        """Commits new prompts to memory and tracks the objects `obj_ids` (default: every object
        prompted since its last propagation) from slice `start` (default: the earliest slice
        they were prompted on since then) forward to the last slice and backward to slice 0, at
        most `max_slices` slices beyond `start` each way. `progress(done, total)` after every
        slice. One undo step per object. Returns label_map()."""
        self._require_volume()
        asked = {"obj_ids": obj_ids, "start": start, "max_slices": max_slices}  # what replay passes again
        objects = self._history.objects
        if start is not None:
            self._check_slice(start)
        if max_slices is not None:
            if isinstance(max_slices, bool) or not isinstance(max_slices, (int, np.integer)) or max_slices < 0:
                raise ValueError(f"max_slices {max_slices!r} must be an integer >= 0")
        if obj_ids is None:
            ids = [k for k in self.object_ids if objects[k].changed_slices()]
            if not ids and start is not None:
                ids = [k for k in self.object_ids if objects[k].has_prompts]
            if not ids:
                if not any(o.has_prompts for o in objects.values()):
                    raise RuntimeError("no prompts: add a point, box or mask with .add_prompt / .add_mask first")
                return self.label_map()
        else:
            ids = sorted({int(self._check_id(k)) for k in np.atleast_1d(obj_ids).tolist()})
            for k in ids:
                if not self._object(k).has_prompts:
                    raise ValueError(f"object {k} has no prompts to propagate")
        if start is None:
            changed = [t for k in ids for t in objects[k].changed_slices()]
            start = min(changed) if changed else min(t for k in ids for t in objects[k].cond)
        start = self._check_slice(start)
        n = self.num_slices if max_slices is None else int(max_slices)
        order = [(t, False) for t in range(start, min(start + n, self.num_slices - 1) + 1)]
        if start > 0:
            order += [(t, True) for t in range(start, max(start - n, 0) - 1, -1)]

        work = {}
        for k in ids:
            obj = objects[k].copy()
            obj.bank = jax.tree.map(jnp.copy, obj.bank)  # the undo step keeps the old bank
            for t, (low, ptr, score) in sorted(obj.pending.items()):
                f = steps.memory_features(self.model_key, self.state, self._cache.get(t), low, score)
                obj.bank = steps.write(obj.bank, jnp.int32(t), f, ptr, 2, low, score)
                obj.kind[t] = 2
                if t not in obj.cond:
                    obj.cond.append(t)
            obj.pending = {}
            obj.cond.sort()
            work[k] = (obj, self._cond_slots(obj.cond))
        # progress counts slices: the start slice is visited twice (forward, then backward)
        done, total = set(), len({t for t, _ in order})
        for t, reverse in order:
            feats = None
            for k in ids:
                obj, cond_slots = work[k]
                if t not in obj.cond:
                    feats = self._cache.get(t) if feats is None else feats
                    memory = self.memory_inputs(obj, t, reverse, cond_slots)
                    f, ptr, low, score = steps.track(self.model_key, self.state, feats, memory)
                    obj.bank = steps.write(obj.bank, jnp.int32(t), f, ptr, 1, low, score)
                    obj.kind[t] = 1
                obj.tracked[t] = reverse
            done.add(t)
            if progress is not None:
                progress(len(done), total)
        call = self._history.next_call()
        span = f"slices {min(t for t, _ in order)}..{max(t for t, _ in order)}"
        for k in ids:
            self._history.record(k, call, f"propagation from slice {start} ({span})", objects[k], work[k][0])
        self._record("propagate", **asked)
        return self.label_map()

    # --- results --------------------------------------------------------------------------------

    def _low_logits(self, obj: ObjectState, slices=None) -> np.ndarray:
        """[n, 4E, 4E] low-res logits of one object on `slices` (default: all), holes filled;
        NO_OBJ_SCORE where it has none."""
        slices = range(self.num_slices) if slices is None else slices
        m = 4 * self.cfg.embedding_size
        bank = np.asarray(obj.bank["masks"]) if len(slices) > 1 else None  # one slice: read only that one
        out = np.full((len(slices), m, m), video.NO_OBJ_SCORE, np.float32)
        for i, t in enumerate(slices):
            if t in obj.pending:
                out[i] = np.asarray(obj.pending[t][0][0])
            elif obj.kind[t] != 0:
                low = bank[t] if bank is not None else np.asarray(obj.bank["masks"][t])
                out[i] = steps.fill_holes(low, self.fill_hole_area)
        return out

    def _upsample_chunks(self, low: np.ndarray, chunk: int = 16):
        """Yields (first slice, logits [c, H, W]) at slice resolution, one compiled shape."""
        for i in range(0, low.shape[0], chunk):
            part = low[i : i + chunk]
            c = part.shape[0]
            if c < chunk:
                part = np.concatenate([part, np.zeros((chunk - c,) + part.shape[1:], np.float32)])
            yield i, np.asarray(steps.resize(jnp.asarray(part), self.slice_hw))[:c]

    def slice_logits(self, obj_id: int = 1) -> np.ndarray:
        """One object's current mask logits of every slice at slice resolution [N, H, W] (holes
        filled), in slice order and orientation (the slice images of `add_prompt`)."""
        obj = self._object(obj_id)
        out = np.empty((self.num_slices,) + self.slice_hw, np.float32)
        for i, part in self._upsample_chunks(self._low_logits(obj)):
            out[i : i + part.shape[0]] = part
        return out

    def object_mask(self, obj_id) -> np.ndarray:
        """bool mask of one object on the input grid, before the overlap rule."""
        return self.geometry.to_input_grid(self.slice_logits(obj_id) > 0)

    def slice_label_map(self, slices=None) -> np.ndarray:
        """uint8 [n, H, W] label map of `slices` (default: all) in slice orientation (see label_map)."""
        self._require_volume()
        slices = list(range(self.num_slices)) if slices is None else [self._check_slice(t) for t in slices]
        ids = self.object_ids
        out = np.zeros((len(slices),) + self.slice_hw, np.uint8)
        if not ids:
            return out
        lows = [self._low_logits(self._history.objects[k], slices) for k in ids]
        active = np.nonzero(np.any([(low > 0).any((1, 2)) for low in lows], axis=0))[0]
        if active.size == 0:
            return out
        best = np.full((len(active),) + self.slice_hw, -np.inf, np.float32)
        arg = np.zeros((len(active),) + self.slice_hw, np.uint8)
        for k, low in zip(ids, lows):
            for i, part in self._upsample_chunks(low[active]):
                sl = slice(i, i + part.shape[0])
                better = part > best[sl]  # strict: a tie keeps the lower id
                best[sl] = np.where(better, part, best[sl])
                arg[sl] = np.where(better, k, arg[sl])
        out[active] = np.where(best > 0, arg, 0)
        return out

    def label_slice(self, slice_index: int) -> np.ndarray:
        """The label map of one slice, as the plane of the input grid it is (label_map()'s values
        on that plane; the slicing axis dropped): what a click changes, without composing the
        whole volume."""
        return self.geometry.plane(self.geometry.to_input_grid(self.slice_label_map([slice_index])))

    def label_map(self) -> np.ndarray:
        """uint8 label map on the input's voxel grid (0 background, values = object ids), the
        current state including prompted, not yet propagated slices. Overlaps: SAM 2's
        non-overlap rule, the object with the highest logit keeps the voxel."""
        return self.geometry.to_input_grid(self.slice_label_map())
