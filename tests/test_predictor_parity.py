"""ImagePredictor end to end against the same steps in torch (SAM2ImagePredictor's code path;
its transforms import torchvision, which does not import beside torch 2.13, so the steps are
spelled out with torch.nn.functional, equal to torchvision's Resize(antialias=True))."""

import numpy as np
import pytest
import torch.nn.functional as F  # noqa: E402

from safeclick_jax.predictor import ImagePredictor  # noqa: E402
from tests.sam2_torch import max_abs, rel_err, torch

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class TorchSteps:
    """set_image / _predict of sam2_image_predictor.py with return_logits=True."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def set_image(self, image):
        self.hw = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        s = self.model.image_size
        x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False, antialias=True)
        x = (x - MEAN) / STD
        out = self.model.forward_image(x)
        _, feats, _, sizes = self.model._prepare_backbone_features(out)
        feats[-1] = feats[-1] + self.model.no_mem_embed
        feats = [f.permute(1, 2, 0).view(1, -1, *sz) for f, sz in zip(feats, sizes)]
        self.image_embed, self.high_res = feats[-1], feats[:-1]

    @torch.no_grad()
    def predict(self, points=None, labels=None, box=None, mask_input=None, multimask=True):
        h, w = self.hw
        s = self.model.image_size
        scale = torch.tensor([s / w, s / h])
        concat = None
        if points is not None:
            concat = (
                torch.tensor(points, dtype=torch.float)[None] * scale,
                torch.tensor(labels, dtype=torch.int)[None],
            )
        if box is not None:
            bc = torch.tensor(box, dtype=torch.float).reshape(-1, 2, 2) * scale
            bl = torch.tensor([[2, 3]], dtype=torch.int)
            concat = (bc, bl) if concat is None else (torch.cat([bc, concat[0]], 1), torch.cat([bl, concat[1]], 1))
        mi = None if mask_input is None else torch.from_numpy(mask_input)[None]
        pe = self.model.sam_prompt_encoder
        sparse, dense = pe(points=concat, boxes=None, masks=mi)
        low, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=self.image_embed,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=self.high_res,
        )
        masks = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)
        return masks[0].numpy(), iou[0].numpy(), torch.clamp(low, -32, 32)[0].numpy()


@pytest.fixture(scope="module")
def pair(sam2_tiny_pt, sam2_tiny_dir):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (217, 181, 3), dtype=np.uint8)
    # a smooth bright blob so the masks are not pure noise
    yy, xx = np.mgrid[:217, :181]
    image[(yy - 100) ** 2 + (xx - 90) ** 2 < 40**2] = 230
    t = TorchSteps(sam2_tiny_pt[0])
    t.set_image(image)
    p = ImagePredictor.from_checkpoint(sam2_tiny_dir)
    p.set_image(image)
    return t, p


CASES = {
    "point": dict(points=[[90.0, 100.0]], labels=[1]),
    "points+negative": dict(points=[[90.0, 100.0], [20.5, 30.0], [150.0, 200.0]], labels=[1, 0, 1]),
    "box": dict(box=[50.0, 60.0, 130.0, 140.0]),
    "point+box": dict(points=[[90.0, 100.0]], labels=[1], box=[50.0, 60.0, 130.0, 140.0]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_parity(pair, case, multimask):
    t, p = pair
    kw = CASES[case]
    tm, ti, tl = t.predict(kw.get("points"), kw.get("labels"), kw.get("box"), multimask=multimask)
    jm, ji, jl = p.predict(
        point_coords=kw.get("points"),
        point_labels=kw.get("labels"),
        box=kw.get("box"),
        multimask_output=multimask,
        return_logits=True,
    )
    assert jm.shape == tm.shape and ji.shape == ti.shape and jl.shape == tl.shape
    errs = (rel_err(jm, tm), max_abs(jm, tm), max_abs(ji, ti), rel_err(jl, tl))
    print(
        f"{case} multimask={multimask}: mask rel {errs[0]:.2e} max-abs {errs[1]:.2e} "
        f"iou max-abs {errs[2]:.2e} low-res rel {errs[3]:.2e}"
    )
    assert errs[0] <= 1e-4 and errs[1] <= 1e-3 and errs[2] <= 1e-4 and errs[3] <= 1e-4
    # thresholded masks agree except where torch's logit is within float noise of 0
    binary, _, _ = p.predict(
        point_coords=kw.get("points"), point_labels=kw.get("labels"), box=kw.get("box"), multimask_output=multimask
    )
    assert binary.dtype == bool and ((binary != (tm > 0)) & (np.abs(tm) > 1e-3)).sum() == 0


def test_mask_prompt_parity(pair):
    t, p = pair
    _, _, low = t.predict([[90.0, 100.0]], [1], multimask=False)
    tm, ti, _ = t.predict([[90.0, 100.0], [60.0, 70.0]], [1, 0], mask_input=low, multimask=False)
    jm, ji, _ = p.predict(
        point_coords=[[90.0, 100.0], [60.0, 70.0]],
        point_labels=[1, 0],
        mask_input=low,
        multimask_output=False,
        return_logits=True,
    )
    print(f"mask prompt: rel {rel_err(jm, tm):.2e} max-abs {max_abs(jm, tm):.2e}")
    assert rel_err(jm, tm) <= 1e-4 and max_abs(jm, tm) <= 1e-3 and max_abs(ji, ti) <= 1e-4
    # mask only (no sparse tokens at all, as in SAM 2)
    tm, _, _ = t.predict(mask_input=low, multimask=True)
    jm, _, _ = p.predict(mask_input=low, return_logits=True)
    print(f"mask only: rel {rel_err(jm, tm):.2e}")
    assert rel_err(jm, tm) <= 1e-4 and max_abs(jm, tm) <= 1e-3


def test_new_click_does_not_recompile(pair):
    _, p = pair
    p.predict(point_coords=[[10.0, 10.0]], point_labels=[1])
    before = p._decode._cache_size()
    for n in range(1, 6):
        pts = np.random.default_rng(n).uniform(0, 180, (n, 2))
        p.predict(point_coords=pts, point_labels=np.ones(n, int))
        p.predict(point_coords=pts, point_labels=np.ones(n, int), box=[1.0, 2.0, 100.0, 120.0])
    assert p._decode._cache_size() == before


@pytest.mark.parametrize(
    "bad, msg",
    [
        (dict(point_coords=[[500.0, 10.0]], point_labels=[1]), "outside the image"),
        (dict(point_coords=[[-1.0, 10.0]], point_labels=[1]), "outside the image"),
        (dict(box=[100.0, 10.0, 50.0, 80.0]), "x1 >= x0"),
        (dict(point_coords=[[5.0, 5.0]], point_labels=[7]), "point_labels"),
        (dict(point_coords=[[5.0, 5.0]]), "point_labels must be given"),
        (dict(), "at least one prompt"),
        (dict(mask_input=np.zeros((1, 64, 64), np.float32)), "mask_input"),
    ],
)
def test_bad_prompts(pair, bad, msg):
    _, p = pair
    with pytest.raises(ValueError, match=msg):
        p.predict(**bad)


def test_bad_images(pair):
    _, p = pair
    with pytest.raises(ValueError, match="HxWx3"):
        p.set_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        p.set_image(np.zeros((10, 10, 3), np.float32))
    fresh = ImagePredictor(p.model)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(point_coords=[[1.0, 1.0]], point_labels=[1])


@pytest.mark.parametrize("hw", [(1024, 1024), (512, 2048), (217, 181), (300, 260), (512, 768)])
def test_mask_upsampling_matches_torch(hw):
    """layers.resize_bilinear_last2 (two-tap for power-of-two factors, jax.image.resize otherwise)
    against torch's bilinear post-processing."""
    import jax.numpy as jnp

    from safeclick_jax.models.layers import resize_bilinear_last2

    x = np.random.default_rng(0).normal(size=(2, 3, 256, 256)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), hw, mode="bilinear", align_corners=False).numpy()
    got = np.asarray(resize_bilinear_last2(jnp.asarray(x), hw))
    assert got.shape == ref.shape and max_abs(got, ref) <= 2e-6
