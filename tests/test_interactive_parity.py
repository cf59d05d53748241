"""The multi-object VolumePredictor against the `sam2` package's SAM2VideoPredictor (random
perturbed weights, fp32, 256 px; fixtures of tests/test_volume_predictor.py): two objects clicked
on different slices, a box object and a mask-prompted object in one session, propagated together,
then a corrective click on one of them and a re-propagation from the corrected slice. Mask logits
of every object on every slice, worst slice relative error <= 1e-4."""

from __future__ import annotations

import numpy as np
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from tests.sam2_torch import max_abs, rel_err, torch
from tests.test_volume_predictor import TorchVideo, models, synthetic_volume  # noqa: F401  (fixture)

REL_TOL = 1e-4
N = 7


def ellipse_mask(hw, cy, cx, ry, rx):
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def check(name, got, ref):
    r, a = rel_err(got, ref), max_abs(got, ref)
    print(f"{name}: rel {r:.2e} max-abs {a:.2e}")
    assert r <= REL_TOL, f"{name}: relative error {r:.2e} > {REL_TOL}"
    return r


class TorchMulti(TorchVideo):
    """SAM2VideoPredictor with several objects. Its memory features are stored as bf16; on the CPU
    (no autocast) a slice whose memory holds no object pointer (an object tracked before its
    prompted slice: future pointers are left out) then feeds bf16 to an fp32 linear layer and
    fails, so they are handed on as fp32 holding the same bf16-rounded values (what the Flax bank
    does)."""

    def __init__(self, tm, slices, monkeypatch):
        super().__init__(tm, slices, monkeypatch)
        frame, encode = tm._run_single_frame_inference, tm._run_memory_encoder

        def run_frame(*a, **kw):
            out, masks = frame(*a, **kw)
            if out["maskmem_features"] is not None:
                out["maskmem_features"] = out["maskmem_features"].float()
            return out, masks

        def run_encoder(*a, **kw):
            feats, pos = encode(*a, **kw)
            return feats.float(), pos

        monkeypatch.setattr(tm, "_run_single_frame_inference", run_frame)
        monkeypatch.setattr(tm, "_run_memory_encoder", run_encoder)

    def objects(self):
        return list(self.state["obj_ids"])

    def prompt(self, t, obj, points=None, labels=None, box=None, clear=True):
        with torch.inference_mode():
            _, ids, m = self.tm.add_new_points_or_box(
                self.state, t, obj, points=points, labels=labels, box=box, clear_old_points=clear
            )
        return m[list(ids).index(obj), 0].numpy()

    def mask(self, t, obj, mask):
        with torch.inference_mode():
            _, ids, m = self.tm.add_new_mask(self.state, t, obj, mask)
        return m[list(ids).index(obj), 0].numpy()

    def propagate_all(self, start=None):
        """{obj_id: [N, H, W]} after forward + backward propagation from `start`."""
        out = {}
        with torch.inference_mode():
            for rev in (False, True):
                for f, ids, m in self.tm.propagate_in_video(self.state, start_frame_idx=start, reverse=rev):
                    for i, k in enumerate(ids):
                        out.setdefault(k, {})[f] = m[i, 0].numpy()
        return {k: np.stack([v[f] for f in sorted(v)]) for k, v in out.items()}


def test_multi_object_session_parity(models, monkeypatch):  # noqa: F811
    tm, jp = models
    jp.set_volume(synthetic_volume(n=N), axis=2)
    tv = TorchMulti(tm, np.array(jp.slices), monkeypatch)
    hw = jp.slice_hw

    pt1, pt2, box3 = [[26.0, 21.0]], [[30.0, 24.0]], [15.0, 12.0, 38.0, 32.0]
    mask4 = ellipse_mask(hw, 20, 24, 7, 9)
    check("obj 1 click slice 2", jp.add_prompt(2, pt1, [1], obj_id=1, return_logits=True), tv.prompt(2, 1, pt1, [1]))
    check("obj 2 click slice 4", jp.add_prompt(4, pt2, [1], obj_id=2, return_logits=True), tv.prompt(4, 2, pt2, [1]))
    check("obj 3 box slice 3", jp.add_prompt(3, box=box3, obj_id=3, return_logits=True), tv.prompt(3, 3, box=box3))
    check("obj 4 mask slice 5", jp.add_mask(5, mask4, obj_id=4, return_logits=True), tv.mask(5, 4, mask4))
    assert jp.object_ids == [1, 2, 3, 4]

    ref = tv.propagate_all()  # SAM 2's default start: the earliest prompted slice (2)
    labels = jp.propagate()
    first = {}
    for k in jp.object_ids:
        got = jp.slice_logits(k)
        first[k] = got
        worst = max(check(f"obj {k} slice {t}", got[t], ref[k][t]) for t in range(N))
        print(f"object {k}: worst slice rel {worst:.2e}")

    # the label map: per voxel the object with the highest logit, SAM 2's non-overlap rule
    stack = np.stack([first[k] for k in jp.object_ids])
    expect = np.where(stack.max(0) > 0, np.asarray(jp.object_ids, np.uint8)[stack.argmax(0)], 0).astype(np.uint8)
    np.testing.assert_array_equal(labels, jp.to_input_grid(expect))
    assert len(np.unique(labels)) > 2  # several objects visible

    # correction on a slice object 1 was tracked on, then re-propagation from that slice
    neg = [[31.0, 26.0]]
    check(
        "obj 1 correction slice 4",
        jp.add_prompt(4, neg, [0], obj_id=1, return_logits=True),
        tv.prompt(4, 1, neg, [0], clear=False),
    )
    ref2 = tv.propagate_all(start=4)
    jp.propagate()
    got = jp.slice_logits(1)
    worst = max(check(f"obj 1 re-propagated slice {t}", got[t], ref2[1][t]) for t in range(N))
    print(f"object 1 after the correction: worst slice rel {worst:.2e}")
    for k in (2, 3, 4):  # objects that did not change keep their masks
        np.testing.assert_array_equal(jp.slice_logits(k), first[k])
    assert (ref[1] > NO_OBJ_SCORE).all()
