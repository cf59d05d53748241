"""Embedding cache: values equal the encoder's, reuse across calls, a new key when the encoder
weights, the image size or the data cache change. Miniature model (smoke config), in-process."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import sam2_t
from safeclick_jax.data import pipeline, prepare, synthetic
from safeclick_jax.models.sam2 import encode_image
from safeclick_jax.training import embedding_cache as ec
from safeclick_jax.training import model_init


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    synthetic.write_dataset(d / "synth", num_volumes=5, seed=0)
    config = sam2_t.get_config("smoke")
    config.data.cache_dir = str(d / "cache")
    prepare.prepare_dataset([str(d / "synth")], config.data.cache_dir, config.data, progress=False)
    model = model_init.build_model(config, 64, log=lambda *a: None)
    return d, config, model


def test_values_reuse_and_lookup(setup):
    d, config, model = setup
    logs = []
    c1 = ec.build(model, config.data.cache_dir, 64, model.keep_block, root=d / "emb", batch_size=4, log=logs.append)
    assert "computing" in logs[0]
    slices = ec.slices_of(config.data.cache_dir, ("train", "val"))
    assert len(c1) == len(slices) > 0
    # several ROIs share a slice: fewer cached slices than ROIs
    data = pipeline.Cache(config.data.cache_dir)
    n_rois = len(data.split_rois("train")) + len(data.split_rois("val"))
    assert len(c1) < n_rois
    c2 = ec.build(model, config.data.cache_dir, 64, model.keep_block, root=d / "emb", batch_size=4, log=logs.append)
    assert "reusing" in logs[-1] and c2.directory == c1.directory
    # features of two ROIs equal the encoder run on their slices (float16 storage)
    rois = data.split_rois("train")[[0, 5]]
    got = c2.features(rois["roi_id"])
    imgs = np.stack([pipeline.sam2_image(data.roi(r)["image"], 64) for r in rois])
    ref = jax.jit(lambda m, x: encode_image(m, x, keep_block=model.keep_block))(model, imgs)
    for name, want in (
        ("image_embed", ref["image_embed"]),
        ("high_res_0", ref["high_res_feats"][0]),
        ("high_res_1", ref["high_res_feats"][1]),
        ("block", ref["block"]),
    ):
        assert got[name].dtype == np.float16
        np.testing.assert_allclose(got[name].astype(np.float32), np.asarray(want), rtol=2e-3, atol=2e-3, err_msg=name)
    test_roi = data.split_rois("test")["roi_id"][:1]
    with pytest.raises(KeyError, match="no cached embedding"):
        c2.features(test_roi)
    index = json.loads((c2.directory / "index.json").read_text())
    assert index["image_size"] == 64 and index["dtype"] == "float16"


def test_key_changes_with_encoder_size_and_data(setup, tmp_path):
    d, config, model = setup
    k = ec.cache_key(model, config.data.cache_dir, 64, model.keep_block, "float16")
    assert ec.cache_key(model, config.data.cache_dir, 64, model.keep_block, "float16") == k
    assert ec.cache_key(model, config.data.cache_dir, 128, model.keep_block, "float16") != k
    assert ec.cache_key(model, config.data.cache_dir, 64, None, "float16") != k
    # a trainable (decoder) weight does not matter, a frozen encoder weight does
    graphdef, state = nnx.split(model)
    flat = dict(state.flat_state())
    dec_path = next(p for p in flat if p[0] == "sam_mask_decoder" and p[1] not in ("conv_s0", "conv_s1"))
    enc_path = next(p for p in flat if p[0] == "image_encoder")
    for path, same in ((dec_path, True), (enc_path, False)):
        m2 = nnx.merge(graphdef, state)
        var = dict(nnx.state(m2).flat_state())[path]
        nnx.update(m2, nnx.State.from_flat_path({path: var.replace(var[...] + 1.0)}))
        assert (ec.cache_key(m2, config.data.cache_dir, 64, model.keep_block, "float16") == k) == same
    # re-preparing the data cache (new files) invalidates
    prepare.prepare_dataset([str(d / "synth")], tmp_path / "cache2", config.data, progress=False)
    assert ec.cache_key(model, tmp_path / "cache2", 64, model.keep_block, "float16") != k
