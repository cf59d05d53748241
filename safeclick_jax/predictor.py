"""ImagePredictor: the Flax twin of sam2.sam2_image_predictor.SAM2ImagePredictor.

    p = ImagePredictor.from_checkpoint("ckpt/sam2.1_t")
    p.set_image(rgb_uint8)                      # HxWx3, any size
    masks, ious, low_res = p.predict(point_coords=[[x, y]], point_labels=[1])

Same semantics as SAM 2: coordinates in original-image pixels (x = column, y = row), a box is two
corner points with labels 2/3 placed before the clicks, one (0,0) pad point with label -1 follows
them, multimask gives 3 masks, otherwise 1 (with SAM 2's stability fallback). Both encoding and
decoding are jit-compiled; prompts are padded to a fixed length (label -2, masked inside the
decoder so results equal the unpadded computation), so a new click does not recompile.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safeclick_jax import prompting
from safeclick_jax.image import preprocess
from safeclick_jax.models import layers
from safeclick_jax.models.sam2 import PAD_LABEL
from safeclick_jax.prompting import PROMPT_BUCKET  # noqa: F401  (re-exported)

MASK_THRESHOLD = 0.0  # SAM2ImagePredictor's default


def check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


class ImagePredictor:
    def __init__(self, model: nnx.Module, description: dict | None = None):
        self.model = model
        self.description = description or {}
        self.cfg = model.cfg
        self.graphdef, state = nnx.split(model)
        # device arrays once: a model filled from numpy (the converter, tests) would otherwise be
        # copied to the device on every jit call
        self.state = jax.device_put(state)
        self.reset_predictor()

    @classmethod
    def from_checkpoint(cls, directory: str) -> "ImagePredictor":
        from safeclick_jax.inference.loader import load_model

        m = load_model(directory)
        return cls(m.network, m.description)

    def reset_predictor(self):
        self._features = None
        self._orig_hw = None

    # --- jit-compiled pure functions (graphdef is static, state is an argument) ---
    @partial(jax.jit, static_argnums=(0,))
    def _encode(self, state, image):
        model = nnx.merge(self.graphdef, state)
        return model.encode_image(preprocess(image, self.cfg.image_size))

    @partial(jax.jit, static_argnums=(0, 7, 8, 9))
    def _decode(self, state, features, coords, labels, mask_input, has_mask, multimask_output, hw, return_logits):
        """Decoding and SAM 2's post-processing in one program: (masks at the original size,
        thresholded unless return_logits; iou; low-res logits clamped to +-32 as SAM 2 returns them)."""
        model = nnx.merge(self.graphdef, state)
        low_res, iou, _, _ = model.decode(features, coords, labels, mask_input, has_mask, multimask_output)
        # transforms.py postprocess_masks: bilinear, align_corners=False, no antialias.
        masks = layers.resize_bilinear_last2(low_res, hw)
        if not return_logits:
            masks = masks > MASK_THRESHOLD
        return masks, iou, jnp.clip(low_res, -32.0, 32.0)

    def set_image(self, image) -> None:
        image = check_image(image)
        self.reset_predictor()
        self._orig_hw = image.shape[:2]
        self._features = self._encode(self.state, jnp.asarray(image))

    def _prompts(self, point_coords, point_labels, box, normalize_coords):
        """Validated prompts -> (coords [B,P,2] in input pixels, labels [B,P]) padded to a bucket."""
        h, w = self._orig_hw
        s = self.cfg.image_size
        scale = np.array([s / w, s / h], np.float32) if normalize_coords else np.float32(s)
        limit = np.array([w, h], np.float32) if normalize_coords else np.ones(2, np.float32)
        parts_c, parts_l = [], []
        batch = None
        if box is not None:
            box = np.asarray(box, np.float32)
            if box.shape[-1] != 4 or box.ndim not in (1, 2):
                raise ValueError(f"box must have shape (4,) or (B,4) as x0,y0,x1,y1; got {box.shape}")
            box = box.reshape(-1, 2, 2)
            bad = np.nonzero((box[:, 1, 0] < box[:, 0, 0]) | (box[:, 1, 1] < box[:, 0, 1]))[0]
            if bad.size:
                raise ValueError(f"box {box[bad[0]].reshape(-1).tolist()}: needs x1 >= x0 and y1 >= y0")
            self._check_inside(box, limit, "box")
            parts_c.append(box * scale)
            parts_l.append(np.tile(np.array([[2, 3]], np.int32), (box.shape[0], 1)))
            batch = box.shape[0]
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            pc = np.asarray(point_coords, np.float32)
            pl = np.asarray(point_labels, np.int32)
            if pc.ndim == 2:
                pc, pl = pc[None], pl[None]
            if pc.ndim != 3 or pc.shape[-1] != 2 or pl.shape != pc.shape[:2]:
                raise ValueError(
                    f"point_coords must be (N,2) or (B,N,2) with point_labels (N,) or (B,N); "
                    f"got {np.shape(point_coords)} and {np.shape(point_labels)}"
                )
            if not np.isin(pl, (0, 1)).all():
                raise ValueError(f"point_labels must be 0 (background) or 1 (foreground); got {np.unique(pl).tolist()}")
            self._check_inside(pc, limit, "point")
            if batch is not None and pc.shape[0] != batch:
                raise ValueError(f"{pc.shape[0]} point sets but {batch} boxes")
            batch = pc.shape[0]
            parts_c.append(pc * scale)
            parts_l.append(pl)
            if box is not None and parts_c[0].shape[0] == 1 and batch > 1:
                parts_c[0] = np.repeat(parts_c[0], batch, 0)
                parts_l[0] = np.repeat(parts_l[0], batch, 0)
        if batch is None:
            return None, None
        boxes = parts_c[0].reshape(-1, 4) if box is not None else None
        points, labels = (parts_c[-1], parts_l[-1]) if point_coords is not None else (None, None)
        # box corners (2, 3), clicks, SAM 2's (0,0) "not a point" (-1), padding (-2) to the bucket
        return prompting.sam2_tokens(boxes, points, labels)

    @staticmethod
    def _check_inside(xy, limit, what):
        bad = (xy < 0) | (xy > limit)
        if bad.any():
            i = np.argwhere(bad.any(-1))[0]
            raise ValueError(
                f"{what} at {xy[tuple(i)].tolist()} lies outside the image "
                f"(x in [0, {limit[0]:g}], y in [0, {limit[1]:g}])"
            )

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ):
        """Returns numpy (masks [C,H,W], iou_predictions [C], low_res_masks [C,4E,4E]); with a batch of
        B prompts (B>1) the arrays get a leading B axis, as in SAM 2."""
        if self._features is None:
            raise RuntimeError("an image must be set with .set_image(...) before mask prediction")
        coords, labels = self._prompts(point_coords, point_labels, box, normalize_coords)
        m = 4 * self.cfg.embedding_size
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.ndim == 3:
                mask_input = mask_input[None]
            if mask_input.ndim != 4 or mask_input.shape[1:] != (1, m, m):
                raise ValueError(f"mask_input must be (1,{m},{m}) or (B,1,{m},{m}); got {mask_input.shape}")
        if coords is None:
            if mask_input is None:
                raise ValueError("give at least one prompt: point_coords, box or mask_input")
            b = mask_input.shape[0]  # mask only: SAM 2 uses no sparse tokens at all
            coords = np.zeros((b, PROMPT_BUCKET, 2), np.float32)
            labels = np.full((b, PROMPT_BUCKET), PAD_LABEL, np.int32)
        b = coords.shape[0]
        if mask_input is None:
            mask = np.zeros((b, m, m, 1), np.float32)
            has_mask = np.zeros((b,), bool)
        else:
            if mask_input.shape[0] not in (1, b):
                raise ValueError(f"mask_input has batch {mask_input.shape[0]} but there are {b} prompts")
            mask = np.broadcast_to(mask_input.transpose(0, 2, 3, 1), (b, m, m, 1))
            has_mask = np.ones((b,), bool)
        out = self._decode(
            self.state,
            self._features,
            jnp.asarray(coords),
            jnp.asarray(labels),
            jnp.asarray(mask),
            jnp.asarray(has_mask),
            bool(multimask_output),
            tuple(self._orig_hw),
            bool(return_logits),
        )
        masks, iou, low_res = (np.asarray(x) for x in out)
        if b == 1:
            return masks[0], iou[0], low_res[0]
        return masks, iou, low_res
