"""Parity of the Flax memory path (safeclick_jax/models/memory.py) with the `sam2` package's torch
modules: memory encoder (through SAM2Base._encode_new_memory), memory attention with RoPE and
object-pointer tokens, object pointers and their temporal encoding. sam2.1_hiera_t with random,
perturbed weights (tests/sam2_torch.py), fp32. The memory path does not depend on the model size
or on the image size beyond its E x E grid, so the inputs are small (E = 16, i.e. 256 px)."""

from __future__ import annotations

import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest
from flax import traverse_util  # noqa: E402

from convert.sam2_to_flax import MEMORY_PREFIXES
from safeclick_jax.models.config import get_config  # noqa: E402
from safeclick_jax.models.memory import SAM2Memory, axial_rope, get_1d_sine_pe  # noqa: E402
from tests.sam2_torch import build_torch_sam2, max_abs, numpy_state_dict, rel_err, torch

MODEL = "sam2.1_hiera_t"
E = 16  # feature grid (256 px input)
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    tm = build_torch_sam2(MODEL)
    sd = numpy_state_dict(tm)
    prefixes = MEMORY_PREFIXES["sam2.1"]  # the converter's split of a checkpoint into image and memory path
    extra = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in sd.items() if k.startswith(prefixes)})
    return tm, SAM2Memory.from_extra(get_config(MODEL), extra)


def seq_first(x_nhwc):
    """[B,H,W,C] numpy -> torch [HW,B,C] (SAM2Base's flattened layout)."""
    b, h, w, c = x_nhwc.shape
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.reshape(b, h * w, c).transpose(1, 0, 2)))


def test_loads_every_memory_key(pair):
    tm, mem = pair
    n = sum(
        int(np.prod(v.shape))
        for k, v in numpy_state_dict(tm).items()
        if k.startswith(("memory_attention.", "memory_encoder."))
    )
    assert n == 5_922_304 + 1_384_608  # parameter count of the sam2 package's model
    np.testing.assert_array_equal(
        np.asarray(mem.memory_encoder.fuser.layers[1].dwconv.kernel[...]),
        tm.memory_encoder.fuser.layers[1].dwconv.weight.detach().numpy().transpose(2, 3, 1, 0),
    )


def test_missing_memory_keys_are_an_error():
    with pytest.raises(ValueError, match="no memory/video tensors"):
        SAM2Memory.from_extra(get_config(MODEL), {})
    with pytest.raises(ValueError, match="missing keys"):
        SAM2Memory.from_extra(get_config(MODEL), {"no_obj_ptr": np.zeros((1, 256), np.float32)})


@pytest.mark.parametrize("binarize", [False, True])
@pytest.mark.parametrize("present", [True, False])
def test_memory_encoder(pair, binarize, present):
    tm, mem = pair
    rng = np.random.default_rng(1)
    pix = rng.standard_normal((1, E, E, 256)).astype(np.float32)
    logits = (rng.standard_normal((1, 16 * E, 16 * E, 1)) * 8).astype(np.float32)
    score = np.array([[3.0 if present else -2.0]], np.float32)
    old = tm.binarize_mask_from_pts_for_mem_enc
    tm.binarize_mask_from_pts_for_mem_enc = True  # as build_sam2_video_predictor sets it
    try:
        with torch.no_grad():
            tf, tp = tm._encode_new_memory(
                [seq_first(pix)],
                [(E, E)],
                torch.from_numpy(logits.transpose(0, 3, 1, 2)),
                torch.from_numpy(score),
                is_mask_from_pts=binarize,
            )
    finally:
        tm.binarize_mask_from_pts_for_mem_enc = old
    jf, jp = mem.encode_memory(jnp.asarray(pix), jnp.asarray(logits), jnp.asarray(score), binarize)
    tf, tp = tf.numpy().transpose(0, 2, 3, 1), tp[0].numpy().transpose(0, 2, 3, 1)
    print(
        f"memory encoder binarize={binarize} present={present}: rel {rel_err(jf, tf):.2e} "
        f"max-abs {max_abs(jf, tf):.2e}, pos max-abs {max_abs(jp, tp):.2e}"
    )
    assert rel_err(jf, tf) <= REL_TOL and max_abs(jp, tp) <= 1e-6


def test_rope_tables_match_torch():
    from sam2.modeling.position_encoding import compute_axial_cis

    cis = compute_axial_cis(256, 16, 16).numpy()
    cos, sin = axial_rope(256, 16, 16)
    assert max(max_abs(cos, cis.real), max_abs(sin, cis.imag)) <= 1e-5


@pytest.mark.parametrize("n_frames, n_ptrs", [(3, 5), (1, 0), (7, 16)])
def test_memory_attention(pair, n_frames, n_ptrs):
    tm, mem = pair
    rng = np.random.default_rng(n_frames)
    n = E * E
    curr = rng.standard_normal((1, n, 256)).astype(np.float32)
    curr_pos = rng.standard_normal((1, n, 256)).astype(np.float32)
    m = n_frames * n + 4 * n_ptrs
    memory = rng.standard_normal((1, m, 64)).astype(np.float32)
    memory_pos = rng.standard_normal((1, m, 64)).astype(np.float32)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2)))
    with torch.no_grad():
        out = tm.memory_attention(
            curr=[tt(curr)],
            curr_pos=[tt(curr_pos)],
            memory=tt(memory),
            memory_pos=tt(memory_pos),
            num_obj_ptr_tokens=4 * n_ptrs,
        )
    out = out.numpy().transpose(1, 0, 2)
    got = mem.memory_attention(
        jnp.asarray(curr), jnp.asarray(curr_pos), jnp.asarray(memory), jnp.asarray(memory_pos), 4 * n_ptrs
    )
    print(
        f"memory attention {n_frames} frames + {n_ptrs} pointers: rel {rel_err(got, out):.2e} "
        f"max-abs {max_abs(got, out):.2e}"
    )
    assert rel_err(got, out) <= REL_TOL

    # Padding: extra frame slots and pointer tokens with key_mask False change nothing.
    pad_f, pad_p = 2, 3
    mem_p = np.concatenate(
        [
            memory[:, : n_frames * n],
            rng.standard_normal((1, pad_f * n, 64)),
            memory[:, n_frames * n :],
            rng.standard_normal((1, 4 * pad_p, 64)),
        ],
        1,
    )
    pos_p = np.concatenate(
        [
            memory_pos[:, : n_frames * n],
            rng.standard_normal((1, pad_f * n, 64)),
            memory_pos[:, n_frames * n :],
            rng.standard_normal((1, 4 * pad_p, 64)),
        ],
        1,
    )
    mask = np.concatenate(
        [np.ones(n_frames * n, bool), np.zeros(pad_f * n, bool), np.ones(4 * n_ptrs, bool), np.zeros(4 * pad_p, bool)]
    )[None]
    padded = mem.memory_attention(
        jnp.asarray(curr),
        jnp.asarray(curr_pos),
        jnp.asarray(mem_p, jnp.float32),
        jnp.asarray(pos_p, jnp.float32),
        4 * (n_ptrs + pad_p),
        jnp.asarray(mask),
    )
    print(f"  padded (+{pad_f} frames, +{pad_p} pointers, masked): rel {rel_err(padded, out):.2e}")
    assert rel_err(padded, out) <= REL_TOL


def test_object_pointer_and_tpos(pair):
    tm, mem = pair
    rng = np.random.default_rng(3)
    tok = rng.standard_normal((2, 256)).astype(np.float32)
    score = np.array([[1.5], [-0.5]], np.float32)
    with torch.no_grad():
        t_tok, t_score = torch.from_numpy(tok), torch.from_numpy(score)
        ptr = tm.obj_ptr_proj(t_tok)
        lam = (t_score > 0).float()  # sam2_base._forward_sam_heads, fixed_no_obj_ptr
        ptr = lam * ptr + (1 - lam) * tm.no_obj_ptr
        from sam2.modeling.sam2_utils import get_1d_sine_pe as t_sine

        pos = torch.tensor([0, 3, -2, 15, 1])
        tpos = tm.obj_ptr_tpos_proj(t_sine(pos / 15, dim=256))
    got = mem.object_pointer(jnp.asarray(tok), jnp.asarray(score))
    got_pos = mem.obj_ptr_pos(jnp.asarray(pos.numpy()), 16)
    print(f"object pointer rel {rel_err(got, ptr.numpy()):.2e}, pointer tpos rel {rel_err(got_pos, tpos.numpy()):.2e}")
    assert rel_err(got, ptr.numpy()) <= REL_TOL and rel_err(got_pos, tpos.numpy()) <= REL_TOL
    np.testing.assert_allclose(np.asarray(got[1]), tm.no_obj_ptr.detach().numpy()[0], rtol=0, atol=0)
    np.testing.assert_allclose(
        np.asarray(get_1d_sine_pe(jnp.asarray([0.5, 2.0]), 8)), t_sine(torch.tensor([0.5, 2.0]), 8).numpy(), atol=1e-6
    )
    for t_pos in range(7):
        np.testing.assert_array_equal(
            np.asarray(mem.tpos_enc(t_pos)), tm.maskmem_tpos_enc[7 - t_pos - 1].detach().numpy().reshape(-1)
        )


def test_depthwise_conv_gradients_match_torch():
    """The fuser's depthwise 7x7 conv (layers.DepthwiseConv, its own kernel gradient) against torch
    Conv2d(groups=dim): output, input gradient and kernel / bias gradients of a weighted sum."""
    import jax
    from flax import nnx

    from safeclick_jax.models import layers

    g = torch.Generator().manual_seed(5)
    tconv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    with torch.no_grad():
        tconv.weight.copy_(torch.randn(tconv.weight.shape, generator=g))
        tconv.bias.copy_(torch.randn(tconv.bias.shape, generator=g))
    x = torch.randn(2, 16, 9, 11, generator=g, requires_grad=True)
    w = torch.randn(2, 16, 9, 11, generator=g)
    (tconv(x) * w).sum().backward()

    conv = layers.conv(16, 16, 7, nnx.Rngs(0), padding=3, groups=16)
    assert isinstance(conv, layers.DepthwiseConv)
    kernel = jnp.asarray(tconv.weight.detach().numpy().transpose(2, 3, 1, 0))  # (7, 7, 1, 16), the weight map's
    conv.kernel[...] = kernel
    conv.bias[...] = jnp.asarray(tconv.bias.detach().numpy())
    nhwc = lambda t: jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))  # noqa: E731
    graphdef, params = nnx.split(conv)

    def loss(params, xj):
        return jnp.sum(nnx.merge(graphdef, params)(xj) * nhwc(w))

    xj = nhwc(x)
    out = nnx.merge(graphdef, params)(xj)
    (gp, gx) = jax.grad(loss, argnums=(0, 1))(params, xj)
    ref_out = tconv(x).detach().numpy().transpose(0, 2, 3, 1)
    assert max_abs(np.asarray(out), ref_out) < 1e-4
    assert rel_err(np.asarray(gx), x.grad.numpy().transpose(0, 2, 3, 1)) < 1e-5
    assert rel_err(np.asarray(gp["kernel"][...]), tconv.weight.grad.numpy().transpose(2, 3, 1, 0)) < 1e-5
    assert rel_err(np.asarray(gp["bias"][...]), tconv.bias.grad.numpy()) < 1e-5
