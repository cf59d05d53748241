"""Parity of the Flax image encoder (Hiera trunk + FPN neck) with the `sam2` package's torch modules.

Random perturbed weights (tests/sam2_torch.py), fp32 on CPU. Tolerance per block / neck level:
relative error ||a-b||/||b|| <= 1e-4 and max-abs <= 1e-3. The fast suite runs sam2.1 tiny at 256 px
(small, yet window padding still happens: 16x16 tokens with window 14 and 8x8 with window 7); the
slow suite runs every size of sam2 and sam2.1 at 1024 px.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safeclick_jax.models import hiera as fh
from safeclick_jax.models.config import CONFIGS, get_config
from safeclick_jax.models.image_encoder import FpnNeck, ImageEncoder, sine_position_encoding
from safeclick_jax.models.layers import gelu, resize_bicubic_nchw
from safeclick_jax.models.weight_map import load_state_dict, model_keys
from tests.sam2_torch import build_torch_sam2, max_abs, nchw_to_nhwc, numpy_state_dict, rel_err, torch

F = torch.nn.functional
REL_TOL, ABS_TOL = 1e-4, 1e-3


def _check(label, a, b, results):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{label}: shape {a.shape} vs torch {b.shape}"
    r, m = rel_err(a, b), max_abs(a, b)
    results.append((label, a.shape, r, m, float(np.abs(b).max())))
    return r, m


def loaded(module_cls, cfg, sd, prefix: str, strict: bool = True):
    """Build `module_cls(cfg)` abstractly (no random init: eager init of 27M+ params takes a minute
    on a small CPU) and load the torch weights into it."""
    m = nnx.eval_shape(lambda: module_cls(cfg, nnx.Rngs(0)))
    left = load_state_dict(m, sd, prefix=prefix, strict=strict)
    return m, left


@functools.lru_cache(maxsize=1)
def tiny():
    """(torch SAM2 tiny, its numpy state_dict, loaded Flax Hiera trunk) shared by the unit tests."""
    tm = build_torch_sam2("sam2.1_hiera_t")
    sd = numpy_state_dict(tm)
    trunk, left = loaded(fh.Hiera, get_config("sam2.1_hiera_t").hiera, sd, "image_encoder.trunk.", strict=False)
    assert left == []
    return tm, sd, trunk


def run_encoder_parity(name: str, image_size: int, seed: int = 0) -> list[tuple]:
    """Run torch and Flax image encoders on the same image; assert and return per-stage errors."""
    tm = build_torch_sam2(name)
    cfg = get_config(name)
    sd = numpy_state_dict(tm)

    # strict over "image_encoder.": an unmapped trunk/neck key raises; other parts' keys are ignored.
    enc, left = loaded(ImageEncoder, cfg, sd, "image_encoder.", strict=True)
    assert left == []
    want = {k for k in sd if k.startswith("image_encoder.")}
    assert set(model_keys(enc, "image_encoder.")) == want, "every image_encoder.* key must be consumed"

    x = np.random.RandomState(seed).randn(1, 3, image_size, image_size).astype(np.float32)
    blocks_t = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: blocks_t.append(o.detach().numpy()))
        for b in tm.image_encoder.trunk.blocks
    ]
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out_t = tm.image_encoder(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    t_torch = time.perf_counter() - t0

    t0 = time.perf_counter()
    out_j = jax.block_until_ready(nnx.jit(lambda m, v: m(v))(enc, jnp.asarray(x.transpose(0, 2, 3, 1))))
    t_jax = time.perf_counter() - t0

    res: list[tuple] = []
    assert len(out_j["blocks"]) == len(blocks_t) == cfg.hiera.depth
    for i, (a, b) in enumerate(zip(out_j["blocks"], blocks_t)):
        _check(f"block {i}", a, b, res)
    assert len(out_j["backbone_fpn"]) == len(out_t["backbone_fpn"]) == 3
    for i, (a, b) in enumerate(zip(out_j["backbone_fpn"], out_t["backbone_fpn"])):
        _check(f"fpn {i}", a, nchw_to_nhwc(b), res)
    for i, (a, b) in enumerate(zip(out_j["vision_pos_enc"], out_t["vision_pos_enc"])):
        _check(f"pos {i}", a, nchw_to_nhwc(b), res)
    _check("vision_features", out_j["vision_features"], nchw_to_nhwc(out_t["vision_features"]), res)

    print(f"\n{name} @ {image_size}px  (torch {t_torch:.1f}s, jax compile+run {t_jax:.1f}s)")
    for label, shape, r, m, scale in res:
        print(f"  {label:16s} {str(tuple(shape)):22s} rel {r:.2e}  max-abs {m:.2e}  (|torch| max {scale:.1f})")
    bad = [(label, r, m) for label, _, r, m, _ in res if not (r <= REL_TOL and m <= ABS_TOL)]
    assert not bad, f"{name}@{image_size}: over tolerance (rel {REL_TOL}, abs {ABS_TOL}): {bad}"
    return res


def padded_blocks(cfg, image_size: int) -> list[int]:
    """Blocks whose window partition pads at this input size (grid not a multiple of the window)."""
    h, out = image_size // 4, []
    for i, blk in enumerate(fh.block_specs(cfg.hiera)):
        if blk.window_size and h % blk.window_size:
            out.append(i)
        if blk.q_stride:
            h //= blk.q_stride[0]
    return out


# ----------------------------------------------------------------------------------------------
# Full encoder parity


def test_tiny_parity_256():
    cfg = get_config("sam2.1_hiera_t")
    # 64/32/16/8 token grids: windows 14 (16 -> 28) and 7 (8 -> 14) pad, incl. q-pool block 10.
    assert padded_blocks(cfg, 256) == [4, 6, 8, 10, 11]
    run_encoder_parity("sam2.1_hiera_t", 256)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if n.startswith("sam2")))
def test_parity_1024(name):
    run_encoder_parity(name, 1024)


@pytest.mark.slow
def test_tiny_parity_512():
    # MedSAM 2 runs tiny at 512 px: grids 128/64/32/16, windows 14 (32 -> 42) and 7 (16 -> 21) pad.
    assert padded_blocks(get_config("medsam2_t"), 512) == [4, 6, 8, 10, 11]
    run_encoder_parity("sam2.1_hiera_t", 512)


def test_trunk_loads_with_trunk_prefix():
    """The trunk alone loads from the full model state_dict with prefix image_encoder.trunk."""
    _, sd, trunk = tiny()
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.state(trunk).flat_state())
    assert n_params == 26_849_472  # parameter count of the sam2 package's model
    np.testing.assert_array_equal(np.asarray(trunk.pos_embed[...]), sd["image_encoder.trunk.pos_embed"])
    np.testing.assert_array_equal(
        np.asarray(trunk.blocks[1].attn.qkv.kernel[...]), sd["image_encoder.trunk.blocks.1.attn.qkv.weight"].T
    )
    assert not hasattr(trunk.blocks[0], "proj") and trunk.blocks[1].proj.kernel.shape == (96, 192)


def test_structure_matches_torch():
    """Per block: window size (with the one-block lag), q-pool, dims, heads, as torch builds them."""
    tm, _, trunk = tiny()
    for bj, bt in zip(trunk.blocks, tm.image_encoder.trunk.blocks, strict=True):
        assert (bj.window_size, bj.dim, bj.dim_out, bj.attn.num_heads, bj.q_stride) == (
            bt.window_size,
            bt.dim,
            bt.dim_out,
            bt.attn.num_heads,
            bt.q_stride,
        )
    # Other sizes against the sam2 package's parameter counts; the slow parity tests check them against torch.
    notes = {
        "sam2.1_hiera_s": ([1, 3, 14], [8, 4, 14]),
        "sam2.1_hiera_b+": ([2, 5, 21], [8, 4, 14]),
        "sam2.1_hiera_l": ([2, 8, 44], [8, 4, 16]),
    }
    for name, (qpool, lag_windows) in notes.items():
        specs = fh.block_specs(get_config(name).hiera)
        assert [i for i, b in enumerate(specs) if b.q_stride] == qpool, name
        assert [specs[i].window_size for i in qpool] == lag_windows, name
        assert [specs[i].window_size for i in get_config(name).hiera.global_att_blocks] == [0, 0, 0]
    # t: blocks 1, 3, 10 start stages 2-4 but keep the previous stage's window (8, 4, 14).
    assert [trunk.blocks[i].window_size for i in (0, 1, 2, 3, 4, 10, 11)] == [8, 8, 4, 4, 14, 14, 7]


# ----------------------------------------------------------------------------------------------
# Numerical traps


def test_bicubic_pos_embed_resize_matches_torch():
    rs = np.random.RandomState(0)
    for src, dst in [((7, 7), (256, 256)), ((7, 7), (64, 64)), ((14, 14), (256, 256)), ((7, 7), (128, 96))]:
        x = rs.randn(1, 8, *src).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x), size=dst, mode="bicubic").numpy()
        got = np.asarray(resize_bicubic_nchw(jnp.asarray(x), dst))
        m = max_abs(got, want)
        print(f"bicubic {src}->{dst}: max-abs {m:.2e}")
        assert m <= 1e-5, (src, dst, m)
    # The trap itself: jax.image.resize('cubic') uses A=-0.5 and is far off.
    x = rs.randn(1, 8, 7, 7).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(256, 256), mode="bicubic").numpy()
    assert max_abs(jax.image.resize(jnp.asarray(x), (1, 8, 256, 256), "cubic"), want) > 1e-2


def test_trunk_pos_embed_matches_torch():
    tm, _, trunk = tiny()
    for hw in [(256, 256), (64, 64), (128, 64)]:
        with torch.no_grad():
            want = tm.image_encoder.trunk._get_pos_embed(hw).numpy()
        got = np.asarray(trunk.get_pos_embed(hw))
        m = max_abs(got, want)
        assert m <= 1e-5, (hw, m)
    with pytest.raises(ValueError, match="multiple"):
        trunk.get_pos_embed((60, 60))


@pytest.mark.parametrize(
    "hw,window", [((16, 16), 14), ((64, 64), 14), ((32, 32), 7), ((35, 21), 8), ((64, 64), 8), ((8, 8), 7)]
)
def test_window_partition_unpartition_with_padding(hw, window):
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    x = np.random.RandomState(1).randn(2, *hw, 5).astype(np.float32)
    wt, pad_t = window_partition(torch.from_numpy(x), window)
    wj, pad_j = fh.window_partition(jnp.asarray(x), window)
    assert pad_j == tuple(pad_t)
    np.testing.assert_array_equal(np.asarray(wj), wt.numpy())  # exact: pure data movement
    # padding is zeros, appended bottom/right
    if pad_j != hw:
        full = np.asarray(fh.window_unpartition(wj, window, pad_j, pad_j))
        assert not full[:, hw[0] :].any() and not full[:, :, hw[1] :].any()
    back_t = window_unpartition(wt, window, pad_t, hw).numpy()
    back_j = np.asarray(fh.window_unpartition(wj, window, pad_j, hw))
    np.testing.assert_array_equal(back_j, back_t)
    np.testing.assert_array_equal(back_j, x)


def test_padded_window_attention_matches_torch():
    """A windowed block on a grid that needs padding: padded tokens act as unmasked keys/values."""
    tm, _, trunk = tiny()
    block = nnx.jit(lambda b, v: b(v))
    x = np.random.RandomState(2).randn(1, 20, 20, 384).astype(np.float32)
    for i in (4, 10):  # block 4: window 14 on 20 -> 28; block 10: q-pool with window 14 -> 7
        with torch.no_grad():
            want = tm.image_encoder.trunk.blocks[i](torch.from_numpy(x)).numpy()
        got = np.asarray(block(trunk.blocks[i], jnp.asarray(x)))
        assert got.shape == want.shape
        r, m = rel_err(got, want), max_abs(got, want)
        print(f"block {i} on 20x20: rel {r:.2e} max-abs {m:.2e}")
        assert r <= 1e-5 and m <= 1e-4, (i, r, m)


def test_max_pool_floor_mode_matches_torch():
    x = np.random.RandomState(4).randn(2, 7, 9, 3).astype(np.float32)
    want = torch.nn.MaxPool2d(2, 2, ceil_mode=False)(torch.from_numpy(x).permute(0, 3, 1, 2))
    got = np.asarray(fh.max_pool(jnp.asarray(x), (2, 2)))
    np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())


def test_exact_gelu():
    x = np.linspace(-6, 6, 2001).astype(np.float32)
    want = F.gelu(torch.from_numpy(x)).numpy()  # torch nn.GELU() default: exact (erf)
    assert max_abs(gelu(jnp.asarray(x)), want) <= 1e-6
    assert max_abs(jax.nn.gelu(jnp.asarray(x)), want) > 1e-4  # flax/jax default tanh form differs
    # and the Hiera MLP uses it
    tm, _, trunk = tiny()
    h = np.random.RandomState(5).randn(64, 96).astype(np.float32) * 3
    with torch.no_grad():
        want = tm.image_encoder.trunk.blocks[0].mlp(torch.from_numpy(h)).numpy()
    assert rel_err(trunk.blocks[0].mlp(jnp.asarray(h)), want) <= 1e-6


def test_sine_position_encoding_matches_torch():
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    pe_t = PositionEmbeddingSine(256, normalize=True, scale=None, temperature=10000)
    for h, w in [(64, 64), (12, 20), (256, 256)]:
        want = pe_t(torch.zeros(1, 256, h, w))[0].permute(1, 2, 0).numpy()
        got = sine_position_encoding(h, w, 256)
        assert got.shape == (h, w, 256)
        assert max_abs(got, want) <= 1e-6, (h, w)


def test_neck_nearest_top_down_matches_torch():
    tm, sd, _ = tiny()
    neck, _ = loaded(FpnNeck, get_config("sam2.1_hiera_t"), sd, "image_encoder.neck.")
    rs = np.random.RandomState(6)
    xs = [rs.randn(2, 32 // 2**i, 24 // 2**i, c).astype(np.float32) for i, c in enumerate((96, 192, 384, 768))]
    with torch.no_grad():
        out_t, pos_t = tm.image_encoder.neck([torch.from_numpy(x).permute(0, 3, 1, 2) for x in xs])
    out_j, pos_j = neck([jnp.asarray(x) for x in xs])
    for a, b in zip(out_j + pos_j, out_t + pos_t):
        assert rel_err(a, nchw_to_nhwc(b)) <= 1e-6


def test_bad_input_shape():
    _, _, trunk = tiny()
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        trunk(jnp.zeros((1, 3, 64, 64)))
