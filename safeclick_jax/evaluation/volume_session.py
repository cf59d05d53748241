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

All labels of a case are objects of one session when the engine is multi-object
(`add_object`); a single-object engine runs each label alone (its prompts replayed on a fresh
state, then propagated) and the labels are merged by the highest logit, SAM 2's overlap rule.

Intensities: the cached uint8 slices are handed over unchanged (a 0..255 window maps them to
themselves), so the model sees what it was trained on.
"""

from __future__ import annotations

import numpy as np

from safeclick_jax.data.preprocess import from_slices, to_slices
from safeclick_jax.evaluation import interactive, noc

IDENTITY_WINDOW = (127.5, 255.0)  # level, width: [0, 255] -> [0, 1] -> uint8 unchanged


def load_network(directory: str, image_size: int | None = None, memory_checkpoint: str | None = None):
    """(model, description, extra) of a model directory, evaluated at `image_size` (shapes derived
    from it only, as protocol.EvalModel.load); extra (the memory path) from memory_checkpoint when given."""
    from safeclick_jax import checkpoint
    from safeclick_jax.models import registry

    directory = checkpoint.resolve(directory)
    desc, params, extra = checkpoint.load(directory)
    desc = {**desc, "sam2": dict(desc["sam2"])}
    if image_size:
        desc["sam2"]["image_size"] = int(image_size)
    model = registry.build(desc, abstract=True)
    checkpoint.assign_params(model, params, where=directory)
    if memory_checkpoint is not None:
        _, _, extra = checkpoint.load(checkpoint.resolve(memory_checkpoint))
    return model, desc, extra


def volume_model(name: str, directory: str, image_size=None, memory_checkpoint=None) -> interactive.InteractiveModel:
    from safeclick_jax.models.memory import SAM2Memory
    from safeclick_jax.volume_predictor import VolumePredictor

    model, desc, extra = load_network(directory, image_size, memory_checkpoint)
    predictor = VolumePredictor(
        model, SAM2Memory.from_extra(model.cfg, extra, where=memory_checkpoint or directory), desc
    )
    return interactive.InteractiveModel(name, lambda case, labels: EngineSession(predictor, case, labels))


class EngineSession:
    def __init__(self, predictor, case: interactive.Case, labels: list[int]):
        if max(labels) > 255:
            raise ValueError(f"{case.name}: label {max(labels)} is above the engine's object ids 1..255")
        self.p, self.case, self.labels = predictor, case, labels
        self.multi = hasattr(predictor, "add_object")
        self.p.set_volume(
            from_slices(case.image, case.axis), axis=case.axis, normalization="ct_window", ct_window=IDENTITY_WINDOW
        )
        self.z_range = {}  # label -> (z0, z1) of its box
        self.history = {lab: [] for lab in labels}  # single-object engine: the prompts to replay

    def add_box(self, label, box: interactive.Box3D):
        self.z_range[label] = (box.z0, box.z1)
        self._prompt(label, box.z_mid, box=box.box)

    def add_click(self, label, voxel, positive):
        z, row, col = voxel
        self._prompt(label, z, points=[[float(col), float(row)]], labels=[int(bool(positive))])

    def _prompt(self, label, t, **kw):
        if self.multi:
            self.p.add_prompt(t, obj_id=label, **kw)
        else:
            self.history[label].append((t, kw))

    def predict(self) -> np.ndarray:
        if self.multi:
            out = to_slices(np.asarray(self.p.propagate()), self.case.axis).astype(np.int32)
        else:
            out = self._predict_one_by_one()
        for lab, (z0, z1) in self.z_range.items():
            outside = out == lab
            outside[z0 : z1 + 1] = False
            out[outside] = 0
        return out

    def _predict_one_by_one(self) -> np.ndarray:
        best = np.full(self.case.labels.shape, 0.0, np.float32)  # logits <= 0: background
        out = np.zeros(self.case.labels.shape, np.int32)
        for lab in self.labels:
            if not self.history[lab]:
                continue
            self.p.reset_prompts()
            for t, kw in self.history[lab]:
                self.p.add_prompt(t, **kw)
            self.p.propagate()
            logits = self.p.slice_logits()
            win = logits > best
            out[win], best[win] = lab, logits[win]
        return out


def click_model(name: str, directory: str, image_size=None) -> noc.ClickModel:
    from safeclick_jax.predictor import ImagePredictor

    model, desc, _ = load_network(directory, image_size)
    predictor = ImagePredictor(model, desc)
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
