"""train.corrective_clicks = 1: the slice task decodes each slice again with a click drawn from
the first mask's error region (SAM2Train's iterative correction, one step). Checks where the click
goes in the prompt layout, that it lies in the error region with the right label, that the first
mask is the second decoding's mask prompt, and that the step adds the second decoding's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from safeclick_jax.training import losses, model_init
from safeclick_jax.training import step as step_lib
from tests.test_training_mixed_precision import _batch, one_step


@pytest.fixture(scope="module")
def smoke():
    config = common.make("sam2.1_hiera_t", "smoke")
    size = config.data.image_size
    model = model_init.build_model(config, size, log=lambda *a: None)
    batch = {k: jnp.asarray(v) for k, v in step_lib.host_batch(_batch(size, 4)).items()}
    return config, model, batch


def test_the_click_takes_the_free_token_inside_the_error(smoke, monkeypatch):
    config, model, batch = smoke
    feats = step_lib.image_features(model, batch, model.keep_block)
    masks, iou, _ = step_lib.decode_all(model, feats, batch["coords"], batch["labels"])
    cand = losses.candidate_outputs(batch["is_box"])
    seen = {}
    real = step_lib.decoder_outputs

    def spy(model, feats, coords, labels, mask_input=None, has_mask=None):
        seen.update(coords=np.asarray(coords), labels=np.asarray(labels), mask=np.asarray(mask_input))
        seen["has_mask"] = np.asarray(has_mask)
        return real(model, feats, coords, labels, mask_input, has_mask)

    monkeypatch.setattr(step_lib, "decoder_outputs", spy)
    out = step_lib.corrected_decode(model, feats, batch, masks, iou, cand, jax.random.key(0))
    assert out[0].shape == masks.shape and np.isfinite(np.asarray(out[0])).all()
    labels, coords, is_box = seen["labels"], seen["coords"], np.asarray(batch["is_box"])
    best = np.argmax(np.where(np.asarray(cand), np.asarray(iou), -np.inf), axis=-1)
    gt = np.asarray(batch["mask"]) > 0
    size = gt.shape[-1]
    for i in range(len(is_box)):
        # SAM 2's predictor tokens for the first prompt plus one click (prompting.sam2_tokens)
        slot = 2 if is_box[i] else 1
        expect = [2, 3, None, -1] if is_box[i] else [1, None, -1, -2]
        assert [None if j == slot else int(v) for j, v in enumerate(labels[i])] == expect
        np.testing.assert_array_equal(coords[i, :slot], np.asarray(batch["coords"])[i, :slot])  # first prompt kept
        np.testing.assert_array_equal(coords[i, slot + 1], [0.0, 0.0])
        assert labels[i, slot] in (0, 1)
        first = np.asarray(masks)[i, best[i]]
        np.testing.assert_array_equal(seen["mask"][i, ..., 0], first)  # the first mask as mask prompt
        pred = np.asarray(step_lib.to_input_resolution(jnp.asarray(first)[None, None], size))[0, 0] > 0
        x, y = coords[i, slot].astype(int)
        if (pred == gt[i]).all():
            continue
        assert pred[y, x] != gt[i, y, x]  # in the error region
        assert labels[i, slot] == int(gt[i, y, x])  # positive on a miss, negative on a spill
    assert seen["has_mask"].all()


def test_the_step_adds_the_corrected_decoding_loss():
    losses_by_n = {}
    for n in (0, 1):
        config = common.make("sam2.1_hiera_t", "smoke")
        config.train.corrective_clicks = n
        _, _, metrics = one_step(config)
        assert bool(metrics["finite"])
        losses_by_n[n] = float(metrics["loss"])
    # the same weights and batch: the first decoding's loss, plus a positive second one
    assert losses_by_n[1] > losses_by_n[0] * 1.2, losses_by_n


def test_more_than_one_corrective_click_is_refused():
    config = common.make("sam2.1_hiera_t", "smoke")
    config.train.corrective_clicks = 2
    with pytest.raises(ValueError, match="corrective_clicks 2"):
        step_lib.corrective_clicks(config)
