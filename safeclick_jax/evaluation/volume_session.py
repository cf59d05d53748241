"""The interactive protocols' models on this project's networks.

* `volume_model(...)`: an interactive.InteractiveModel over the volume engine (VolumePredictor, the
  SAM 2 video predictor's memory; SafeClick models use their head on every slice).
* `click_model(...)`: a noc.ClickModel over ImagePredictor (SAM's interactive 2D simulation: all
  clicks of the ROI so far plus the previous low-resolution logits as the mask prompt; three masks
  for the first click, best by predicted IoU, one mask after that).

How a 3D box is given to a 2D-prompted model (the challenge's SAM 2 / MedSAM 2 baselines do the
same): the 2D box on its middle slice, propagated through the volume, and the label kept only
inside the box's z range (the box says the object lies there). Corrective clicks are prompts on
their slice, followed by the engine's re-propagation.

All labels of a case are objects of one session (their overlaps resolved by SAM 2's rule, the
highest logit).

Intensities: the cached uint8 slices are handed over unchanged (a 0..255 window maps them to
themselves), so the model sees what it was trained on.
"""

from __future__ import annotations

import numpy as np

from safeclick_jax.data.preprocess import from_slices, to_slices
from safeclick_jax.evaluation import interactive, noc
from safeclick_jax.inference.limits import MAX_OBJECT_ID
from safeclick_jax.inference.loader import MEMORY_OPTION

IDENTITY_WINDOW = (127.5, 255.0)  # level, width: [0, 255] -> [0, 1] -> uint8 unchanged


def volume_model(
    name: str, directory: str, image_size=None, memory_checkpoint=None, memory_option: str = MEMORY_OPTION
) -> interactive.InteractiveModel:
    from safeclick_jax.inference import VolumePredictor, load_model

    m = load_model(directory, image_size, memory_checkpoint, memory="required", memory_option=memory_option)
    predictor = VolumePredictor(m.network, m.memory, m.description)
    return interactive.InteractiveModel(name, lambda case, labels: EngineSession(predictor, case, labels))


class EngineSession:
    def __init__(self, predictor, case: interactive.Case, labels: list[int]):
        if max(labels) > MAX_OBJECT_ID:
            raise ValueError(f"{case.name}: label {max(labels)} is above the engine's object ids 1..{MAX_OBJECT_ID}")
        self.p, self.case, self.labels = predictor, case, labels
        self.p.set_volume(
            from_slices(case.image, case.axis), axis=case.axis, normalization="ct_window", ct_window=IDENTITY_WINDOW
        )
        self.z_range = {}  # label -> (z0, z1) of its box

    def add_box(self, label, box: interactive.Box3D):
        self.z_range[label] = (box.z0, box.z1)
        self._prompt(label, box.z_mid, box=box.box)

    def add_click(self, label, voxel, positive):
        z, row, col = voxel
        self._prompt(label, z, points=[[float(col), float(row)]], labels=[int(bool(positive))])

    def _prompt(self, label, t, **kw):
        self.p.add_prompt(t, obj_id=label, **kw)

    def predict(self) -> np.ndarray:
        out = to_slices(np.asarray(self.p.propagate()), self.case.axis).astype(np.int32)
        for lab, (z0, z1) in self.z_range.items():
            outside = out == lab
            outside[z0 : z1 + 1] = False
            out[outside] = 0
        return out


def click_model(name: str, directory: str, image_size=None) -> noc.ClickModel:
    from safeclick_jax.inference import load_model
    from safeclick_jax.predictor import ImagePredictor

    m = load_model(directory, image_size)
    predictor = ImagePredictor(m.network, m.description)
    return noc.ClickModel(name, lambda image: ClickSession(predictor, image))


class ClickSession:
    def __init__(self, predictor, image: np.ndarray):
        self.p = predictor
        self.p.set_image(np.repeat(np.asarray(image, np.uint8)[..., None], 3, axis=-1))
        self.points, self.point_labels, self.low_res = [], [], None

    def click(self, rc, positive) -> np.ndarray:
        self.points.append([float(rc[1]), float(rc[0])])
        self.point_labels.append(int(bool(positive)))
        first = len(self.points) == 1
        masks, iou, low = self.p.predict(
            point_coords=self.points,
            point_labels=self.point_labels,
            mask_input=None if self.low_res is None else self.low_res[None],
            multimask_output=first,
        )
        k = int(np.argmax(iou)) if first else 0
        self.low_res = low[k]
        return np.asarray(masks[k], bool)
