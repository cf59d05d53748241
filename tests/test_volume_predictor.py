"""VolumePredictor against the `sam2` package's SAM2VideoPredictor on the same slices.

The torch side is the real video predictor (build_sam2_video_predictor: binarised memory masks
on prompted frames, dynamic multimask) with random perturbed weights at 256 px; only its frame
loading is replaced (it needs PIL/torchvision paths) by the slices the Flax predictor feeds its
model, preprocessed the same way. `add_all_frames_to_correct_as_cond=True` (a corrected slice
becomes a conditioning slice, the Flax semantics); hole filling is off on both sides because
SAM 2 runs it only with its CUDA extension. The checkpoint goes through the project's converter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F  # noqa: E402

from safeclick_jax.inference import VolumePredictor  # noqa: E402
from safeclick_jax.inference.steps import compile_counts, fill_holes  # noqa: E402
from tests.sam2_torch import config_path, max_abs, numpy_state_dict, rel_err, torch

MODEL = "sam2.1_hiera_t"
SIZE = 256
REL_TOL = 1e-3
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def synthetic_volume(n=7, shape=(44, 52), seed=0):
    """A bright ellipsoid that shrinks away from the middle slice, on noise (X, Y, Z = slices)."""
    rng = np.random.default_rng(seed)
    xx, yy = np.mgrid[: shape[0], : shape[1]]
    vol = rng.normal(100, 20, shape + (n,))
    for z in range(n):
        r = 12 - 1.5 * abs(z - n // 2)
        vol[..., z] += 150 * (((xx - 22) / r) ** 2 + ((yy - 26) / (0.8 * r)) ** 2 < 1)
    return vol.astype(np.int16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sam2.build_sam import build_sam2_video_predictor

    from convert.sam2_to_flax import main as convert_main
    from convert.torch_io import save_torch_state_dict

    torch.manual_seed(0)
    tm = build_sam2_video_predictor(
        config_path(MODEL), ckpt_path=None, device="cpu", hydra_overrides_extra=[f"++model.image_size={SIZE}"]
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, t in tm.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
        # Random weights give random object scores; with a negative one every mask is -1024 and the
        # comparison says nothing, so the object is made present everywhere (the absent path,
        # no_obj_ptr / no_obj_embed_spatial, is covered in test_memory_parity.py).
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(20.0)
    tm.fill_hole_area = 0
    tm.add_all_frames_to_correct_as_cond = True
    tm.eval()
    d = tmp_path_factory.mktemp("vol")
    save_torch_state_dict(numpy_state_dict(tm), str(d / "model.pt"))
    assert convert_main(["--checkpoint", str(d / "model.pt"), "--out", str(d / "ckpt"), "--image-size", str(SIZE)]) == 0
    jp = VolumePredictor.from_checkpoint(str(d / "ckpt"), fill_hole_area=0)
    return tm, jp


class TorchVideo:
    """SAM2VideoPredictor on precomputed frames (its load_video_frames replaced)."""

    def __init__(self, tm, slices_uint8, monkeypatch):
        import sam2.sam2_video_predictor as svp

        x = torch.from_numpy(slices_uint8).float()[:, None].expand(-1, 3, -1, -1) / 255.0
        x = F.interpolate(x, (SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        frames = (x - MEAN) / STD
        h, w = slices_uint8.shape[1:]
        monkeypatch.setattr(svp, "load_video_frames", lambda **kw: (frames, h, w))
        self.tm = tm
        self.state = tm.init_state(video_path="(frames)")

    def prompt(self, t, points=None, labels=None, box=None, clear=True):
        with torch.inference_mode():
            _, _, m = self.tm.add_new_points_or_box(
                self.state, t, 1, points=points, labels=labels, box=box, clear_old_points=clear
            )
        return m[0, 0].numpy()

    def propagate(self):
        out = {}
        with torch.inference_mode():
            for rev in (False, True):
                for f, _, m in self.tm.propagate_in_video(self.state, reverse=rev):
                    out[f] = m[0, 0].numpy()
        return np.stack([out[f] for f in sorted(out)])


def compare(name, got, ref):
    r, a = rel_err(got, ref), max_abs(got, ref)
    agree = float(((got > 0) == (ref > 0)).mean())
    print(
        f"{name}: rel {r:.2e} max-abs {a:.2e}, foreground agreement {agree:.5f}, foreground {int((ref > 0).sum())} px"
    )
    assert r <= REL_TOL, f"{name}: relative error {r:.2e} > {REL_TOL}"
    return r


def test_propagation_parity(models, monkeypatch):
    """One click on the middle slice of 5, forward + backward: logits per slice vs torch."""
    tm, jp = models
    jp.set_volume(synthetic_volume(n=5), axis=2)
    tv = TorchVideo(tm, np.array(jp.slices), monkeypatch)
    pt = [[26.0, 21.0]]
    compare(
        "prompt slice 2 (point)", jp.add_prompt(2, points=pt, labels=[1], return_logits=True), tv.prompt(2, pt, [1])
    )
    ref = tv.propagate()
    # the compiled steps are shared by every predictor (other tests' volumes are in the cache
    # too): count what this adds

    compiled_before = compile_counts()["track"]
    labels = jp.propagate()
    got = jp.slice_logits()
    errs = [compare(f"propagation slice {i}", got[i], ref[i]) for i in range(len(ref))]
    print(f"propagation: worst slice rel {max(errs):.2e}")
    # one compiled step per memory-slot bucket (video.memory_slots: 2, 4 or 6 previous slices)
    assert compile_counts()["track"] - compiled_before <= 3
    assert labels.shape == (44, 52, 5) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, jp.to_input_grid((got > 0).astype(np.uint8)))


@pytest.mark.slow
def test_propagation_parity_several_prompts_and_correction(models, monkeypatch):
    """Point on one slice, box on another, forward + backward, then a corrective negative click
    on a tracked slice (conditioned on memory) and a second propagation."""
    tm, jp = models
    jp.set_volume(synthetic_volume(), axis=2)
    tv = TorchVideo(tm, np.array(jp.slices), monkeypatch)
    pt = [[26.0, 21.0]]
    compare(
        "prompt slice 3 (point)", jp.add_prompt(3, points=pt, labels=[1], return_logits=True), tv.prompt(3, pt, [1])
    )
    box = [15.0, 12.0, 38.0, 32.0]
    compare("prompt slice 5 (box)", jp.add_prompt(5, box=box, return_logits=True), tv.prompt(5, box=box))
    ref = tv.propagate()
    jp.propagate()
    got = jp.slice_logits()
    errs = [compare(f"propagation slice {i}", got[i], ref[i]) for i in range(len(ref))]
    print(f"propagation: worst slice rel {max(errs):.2e}")

    neg = [[30.0, 25.0]]
    compare(
        "correction slice 1 (tracked, negative click)",
        jp.add_prompt(1, points=neg, labels=[0], return_logits=True),
        tv.prompt(1, neg, [0], clear=False),
    )
    ref = tv.propagate()
    jp.propagate()
    got = jp.slice_logits()
    errs = [compare(f"re-propagation slice {i}", got[i], ref[i]) for i in range(len(ref))]
    print(f"re-propagation: worst slice rel {max(errs):.2e}")


def test_fill_holes():
    x = np.full((8, 8), 5.0, np.float32)
    x[2, 2] = -1.0  # a 1-pixel hole
    x[5:, 5:] = -1.0  # a 9-pixel background corner
    y = fill_holes(x, 8)
    assert y[2, 2] == np.float32(0.1) and (y[5:, 5:] == -1).all() and fill_holes(x, 0) is x


def test_memory_slots_pick_existing_tracked_slices():
    """SAM 2's choice of spatial memories for slice t: the tracked (kind 1) slices t -+ 1..6 in the
    direction of travel, at t_pos 7 - distance, padded to 2 / 4 / 6 slots."""
    from safeclick_jax.video import memory_slots

    kind = np.zeros(20, np.int32)
    kind[[9, 10, 12]] = 1  # tracked
    kind[11] = 2  # prompted: a conditioning memory, not a previous-slice one
    idx, tpos, valid = memory_slots(kind, 13, False, 7)  # candidates 7..12
    assert idx[valid].tolist() == [9, 10, 12] and tpos[valid].tolist() == [3, 4, 6] and len(idx) == 4
    idx, tpos, valid = memory_slots(kind, 8, True, 7)  # reverse: candidates 14..9
    assert idx[valid].tolist() == [12, 10, 9] and tpos[valid].tolist() == [3, 5, 6] and len(idx) == 4
    idx, _, valid = memory_slots(kind, 0, False, 7)  # nothing before slice 0
    assert len(idx) == 2 and not valid.any()
    kind[:] = 1
    idx, tpos, valid = memory_slots(kind, 10, False, 7)
    assert valid.all() and idx.tolist() == [4, 5, 6, 7, 8, 9] and tpos.tolist() == [1, 2, 3, 4, 5, 6]
