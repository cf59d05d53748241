"""ImagePredictor on a SafeClick model directory, end to end against the PyTorch reference
(512 px tiny model: the same code path as 1024, a quarter of the encoder cost)."""

import numpy as np
import pytest
from flax import nnx

from convert.safeclick_torch import build_safeclick_torch  # noqa: E402
from safeclick_jax.models.registry import (
    from_sam2,
    save_model,  # noqa: E402
)
from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickModel  # noqa: E402
from safeclick_jax.models.weight_map import load_state_dict  # noqa: E402
from safeclick_jax.predictor import ImagePredictor  # noqa: E402
from tests.sam2_torch import max_abs, rel_err, torch
from tests.test_predictor_parity import TorchSteps
from tests.test_safeclick_parity import IMAGE_PATH


class TorchSafeClickSteps(TorchSteps):
    def set_image(self, image):
        blocks = {}
        hook = self.model.image_encoder.trunk.blocks[self.model.keep_block].register_forward_hook(
            lambda m, i, o: blocks.setdefault("x", o)
        )
        super().set_image(image)
        hook.remove()
        with torch.no_grad():  # Hiera blocks are NHWC in torch too
            self.refined = self.model.safeclick.image_features(blocks["x"].permute(0, 3, 1, 2), self.image_embed)

    @torch.no_grad()
    def predict(self, points, labels, multimask):
        h, w = self.hw
        s = self.model.image_size
        c = torch.tensor(points, dtype=torch.float)[None] * torch.tensor([s / w, s / h])
        low, iou, _, _ = self.model.decode(
            self.image_embed,
            self.high_res,
            self.refined,
            c,
            torch.tensor(labels, dtype=torch.int)[None],
            None,
            multimask,
        )
        masks = torch.nn.functional.interpolate(low, (h, w), mode="bilinear", align_corners=False)
        return masks[0].numpy(), iou[0].numpy()


@pytest.fixture(scope="module")
def safeclick_dir(tmp_path_factory):
    sc = SafeClickConfig()
    tmodel, cfg = build_safeclick_torch("sam2.1_hiera_t", sc, image_size=512, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in tmodel.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    fmodel = nnx.eval_shape(lambda: SafeClickModel(cfg, sc, nnx.Rngs(0)))
    load_state_dict(fmodel, {k: v.numpy() for k, v in tmodel.state_dict().items() if k.startswith(IMAGE_PATH)})
    out = str(tmp_path_factory.mktemp("sc") / "safeclick_t")
    save_model(out, fmodel)
    return tmodel, out


def test_safeclick_predictor_parity(safeclick_dir):
    tmodel, directory = safeclick_dir
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    t = TorchSafeClickSteps(tmodel)
    t.set_image(image)
    p = ImagePredictor.from_checkpoint(directory)
    assert p.description["kind"] == "safeclick"
    p.set_image(image)
    for pts, lab, mm in [([[120.0, 150.0]], [1], True), ([[120.0, 150.0], [30.0, 40.0]], [1, 0], False)]:
        tm, ti = t.predict(pts, lab, mm)
        jm, ji, _ = p.predict(point_coords=pts, point_labels=lab, multimask_output=mm, return_logits=True)
        print(f"safeclick predictor multimask={mm}: rel {rel_err(jm, tm):.2e} max-abs {max_abs(jm, tm):.2e}")
        assert rel_err(jm, tm) <= 1e-4 and max_abs(jm, tm) <= 1e-3 and max_abs(ji, ti) <= 1e-4


def test_from_sam2_copies_base_and_checks_block(sam2_tiny_dir):
    from safeclick_jax.inference.loader import load_model

    base = load_model(sam2_tiny_dir).network
    model = from_sam2(sam2_tiny_dir, SafeClickConfig(), seed=0)
    assert np.array_equal(
        np.asarray(model.sam_mask_decoder.transformer.layers[0].self_attn.q_proj.kernel[...]),
        np.asarray(base.sam_mask_decoder.transformer.layers[0].self_attn.q_proj.kernel[...]),
    )
    assert model.keep_block == 5  # tiny: 12 blocks, the m/2-th (1-based) is index 5
    assert float(np.abs(np.asarray(model.safeclick.crl.conv.kernel[...])).max()) == 0.0  # zero-init F_conv
    with pytest.raises(ValueError, match="outside the sam2.1_hiera_t trunk"):
        from_sam2(base, SafeClickConfig(intermediate_block=12))
    with pytest.raises(ValueError, match="coarser"):
        from_sam2(base, SafeClickConfig(intermediate_block=11))
