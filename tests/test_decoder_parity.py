"""Parity of the Flax prompt encoder and mask decoder with the torch `sam2` package.

The torch model is sam2.1_hiera_t with random, perturbed weights (tests/sam2_torch.py); its
`sam_prompt_encoder.` / `sam_mask_decoder.` state_dicts are loaded strictly into the Flax modules.
The decoder does not depend on the model size, so one size is enough. Inputs (image embeddings,
high-res features, mask prompts) are random: NCHW for torch, NHWC for Flax.

Resolution: the fast suite runs at 512 px (the medsam2_t config: E = 32, same weights), where torch's
prompt encoder is given the sizes build_sam2 would give it at image_size=512; the slow suite adds
SAM 2's 1024 px (E = 64). Every op is resolution-agnostic, so 512 px covers the same code 4x cheaper.

To keep the suite fast, Flax compiles twice: every prompt case is one element of a single padded
batch A (N = 8 tokens, label -2 padding, per-element image and has_mask flag; decoded through
transformer_tokens / heads / select_outputs), plus one repeat_image batch B without padding
(decoded through MaskDecoder.__call__). Torch runs each case on its own, unpadded, as SAM 2's
predictor does.
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safeclick_jax.models import layers
from safeclick_jax.models.config import get_config
from safeclick_jax.models.mask_decoder import MaskDecoder
from safeclick_jax.models.prompt_encoder import PAD_LABEL, PromptEncoder
from safeclick_jax.models.weight_map import load_state_dict
from tests.sam2_torch import build_torch_sam2, max_abs, nchw_to_nhwc, numpy_state_dict, rel_err, torch

MODEL = "sam2.1_hiera_t"  # torch weights; the Flax config is the fixture's parameter
CONFIGS = ["medsam2_t", pytest.param("sam2.1_hiera_t", marks=pytest.mark.slow)]
REL_TOL, ABS_TOL = 1e-4, 1e-3
N_TOKENS = 8  # fixed prompt length of the padded Flax batch

# (coords [B,N,2] in 1024-px input coordinates (scaled to the config's image_size), labels [B,N]);
# SAM's pad point is added later.
PROMPTS = {
    "1 point": ([[[500.0, 375.0]]], [[1]]),
    "3 points": ([[[500.0, 375.0], [120.5, 900.0], [700.0, 20.0]]], [[1, 0, 0]]),
    "box": ([[[210.0, 200.0], [640.0, 790.0]]], [[2, 3]]),
    "box + point": ([[[210.0, 200.0], [640.0, 790.0], [400.0, 410.0]]], [[2, 3, 0]]),
    "mask + point": ([[[500.0, 375.0]]], [[1]]),
    "batch of 3": (
        [[[500.0, 375.0], [10.0, 1000.0]], [[100.0, 700.0], [800.0, 800.0]], [[210.0, 200.0], [640.0, 790.0]]],
        [[1, 0], [1, 1], [2, 3]],
    ),
}
# Flax batch A: (case, element of the case's batch, image index, has_mask)
LAYOUT = [
    ("1 point", 0, 0, False),
    ("3 points", 0, 0, False),
    ("box", 0, 1, False),
    ("box + point", 0, 2, False),
    ("mask + point", 0, 1, True),
    ("batch of 3", 0, 0, False),
    ("batch of 3", 1, 1, False),
    ("batch of 3", 2, 2, False),
]
IMAGE_OF = {"1 point": 0, "3 points": 0, "box": 1, "box + point": 2, "mask + point": 1}
# Element 8 repeats element 1 with other padding coordinates and a mask that has_mask switches off.
GARBAGE = 8
# Batch B (repeat_image, no padding): two 2-point prompts on image 0; element 0 = element 5 above.
REPEAT = ([[[500.0, 375.0], [10.0, 1000.0]], [[300.0, 60.0], [900.0, 512.0]]], [[1, 0], [0, 1]])

OUTPUTS = ("sparse", "dense", "masks", "iou", "sam tokens", "object score")


def _np(x):
    return np.asarray(x, np.float32)


def with_sam_pad(coords, labels, n_tokens=None, pad_xy=317.0):
    """Append SAM's (0,0,-1) pad point (torch adds it inside its prompt encoder whenever
    boxes is None), then project padding (label -2, arbitrary coordinates) up to n_tokens."""
    coords, labels = np.asarray(coords, np.float32), np.asarray(labels, np.int32)
    b, n = labels.shape
    n_pad = 0 if n_tokens is None else n_tokens - n - 1
    coords = np.concatenate([coords, np.zeros((b, 1, 2)), np.full((b, n_pad, 2), pad_xy)], 1)
    labels = np.concatenate([labels, -np.ones((b, 1)), np.full((b, n_pad), PAD_LABEL)], 1)
    return coords.astype(np.float32), labels.astype(np.int32)


@nnx.jit(static_argnames=("repeat_image", "via_call"))
def run_flax(pe, md, coords, labels, mask, has_mask, emb, feat_s0, feat_s1, repeat_image, via_call):
    """Prompt encoder + decoder -> (sparse, dense, raw heads (all 4 masks) or None, {multimask:
    selected outputs}, dense PE). via_call: through MaskDecoder.__call__ (two decoder copies in the
    program); else through transformer_tokens / heads / select_outputs (one copy, faster compile)."""
    sparse, dense = pe(coords, labels, mask, has_mask)
    token_mask = labels != PAD_LABEL
    image_pe = pe.get_dense_pe()
    high_res = (feat_s0, feat_s1)
    if via_call:
        out = {m: md(emb, image_pe, sparse, dense, m, repeat_image, high_res, token_mask) for m in (True, False)}
        return sparse, dense, None, out, image_pe
    hs, src = md.transformer_tokens(emb, image_pe, sparse, dense, token_mask, repeat_image)
    raw = md.heads(hs, src, high_res)
    out = {m: md.select_outputs(*raw[:3], m) + raw[3:] for m in (True, False)}
    return sparse, dense, raw, out, image_pe


@contextlib.contextmanager
def torch_at(tm, cfg):
    """Give torch's prompt encoder the sizes build_sam2 derives from cfg.image_size (its
    attributes, not weights); restored afterwards, since the torch model is cached and shared."""
    pe = tm.sam_prompt_encoder
    e, n = cfg.embedding_size, cfg.image_size
    saved = pe.image_embedding_size, pe.input_image_size, pe.mask_input_size
    pe.image_embedding_size, pe.input_image_size, pe.mask_input_size = (e, e), (n, n), (4 * e, 4 * e)
    try:
        yield
    finally:
        pe.image_embedding_size, pe.input_image_size, pe.mask_input_size = saved


def torch_prompt(s, coords, labels, mask=None):
    pe = s["tm"].sam_prompt_encoder
    with torch.no_grad(), torch_at(s["tm"], s["cfg"]):
        sparse, dense = pe(
            points=(torch.tensor(coords, dtype=torch.float32), torch.tensor(labels, dtype=torch.int32)),
            boxes=None,
            masks=None if mask is None else torch.as_tensor(mask),
        )
        return sparse, dense, pe.get_dense_pe()


def torch_decode(s, coords, labels, image_idx, mask=None, multimask=True, repeat_image=False):
    emb, s0, s1 = (f[image_idx] for f in s["feats"])
    sparse, dense, image_pe = torch_prompt(s, coords, labels, mask)
    with torch.no_grad():
        out = s["tm"].sam_mask_decoder(
            image_embeddings=emb,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=repeat_image,
            high_res_features=[s0, s1],
        )
    res = (sparse, dense.permute(0, 2, 3, 1)) + tuple(out)
    return tuple(t.detach().numpy() for t in res)


def prompt(s, case):
    coords, labels = REPEAT if case == "repeat" else PROMPTS[case]
    return np.asarray(coords, np.float32) * s["cfg"].image_size / 1024, np.asarray(labels)


@pytest.fixture(scope="module", params=CONFIGS)
def setup(request):
    tm = build_torch_sam2(MODEL)
    sd = numpy_state_dict(tm)
    cfg = get_config(request.param)
    e = cfg.embedding_size
    # abstract init (no random-init compiles), then every variable comes from the state_dict
    pe = nnx.eval_shape(lambda: PromptEncoder(cfg, nnx.Rngs(0)))
    md = nnx.eval_shape(lambda: MaskDecoder(cfg, nnx.Rngs(0)))
    # strict within each prefix: every key consumed, every Flax variable filled
    assert load_state_dict(pe, sd, prefix="sam_prompt_encoder.") == []
    assert load_state_dict(md, sd, prefix="sam_mask_decoder.") == []

    g = torch.Generator().manual_seed(123)
    feats = (
        torch.randn(3, 256, e, e, generator=g),
        0.5 * torch.randn(3, 32, 4 * e, 4 * e, generator=g),
        0.5 * torch.randn(3, 64, 2 * e, 2 * e, generator=g),
    )
    masks = 4.0 * torch.randn(len(LAYOUT) + 1, 1, 4 * e, 4 * e, generator=g)
    s = dict(tm=tm, cfg=cfg, pe=pe, md=md, feats=feats, masks=masks.numpy())
    nhwc = [jnp.asarray(nchw_to_nhwc(f)) for f in feats]

    # batch A: every case, padded to N_TOKENS
    rows = [with_sam_pad(*(x[i : i + 1] for x in prompt(s, c)), N_TOKENS) for c, i, _, _ in LAYOUT]
    rows.append(with_sam_pad(*prompt(s, "3 points"), N_TOKENS, pad_xy=12.0))
    coords = np.concatenate([r[0] for r in rows])
    labels = np.concatenate([r[1] for r in rows])
    img = np.array([im for _, _, im, _ in LAYOUT] + [IMAGE_OF["3 points"]])
    has_mask = np.array([hm for *_, hm in LAYOUT] + [False])
    a = run_flax(
        pe,
        md,
        jnp.asarray(coords),
        jnp.asarray(labels),
        jnp.asarray(nchw_to_nhwc(masks)),
        jnp.asarray(has_mask),
        *(f[img] for f in nhwc),
        repeat_image=False,
        via_call=False,
    )
    # batch B: one image, two prompts, no padding
    c, l = with_sam_pad(*prompt(s, "repeat"))
    b = run_flax(
        pe, md, jnp.asarray(c), jnp.asarray(l), None, None, *(f[:1] for f in nhwc), repeat_image=True, via_call=True
    )
    print(f"\n  config {cfg.name}: image {cfg.image_size} px, embedding {e}x{e}")
    return dict(s, a=a, b=b)


def flax_case(res, rows, multimask):
    """(sparse, dense, masks, iou, sam_tokens, obj) of batch elements `rows` from __call__."""
    sparse, dense, _, out, _ = res
    return tuple(_np(x)[rows] for x in (sparse, dense) + tuple(out[multimask]))


def check(name, got, ref, rel=REL_TOL, abs_=ABS_TOL):
    r, a = rel_err(got, ref), max_abs(got, ref)
    print(f"    {name:>12}: rel {r:.2e}  max-abs {a:.2e}")
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert r <= rel and a <= abs_, (name, r, a)


def compare(label, got, ref):
    print(f"  [{label}]")
    for name, g, r in zip(OUTPUTS, got, ref):
        if name == "sparse":
            g = g[:, : r.shape[1]]  # project padding tokens are never read
        check(name, g, r)


# ------------------------------------------------------------------------------------------------

# SAM 2's predictor uses multimask for ambiguous prompts (one click), single masks otherwise.
CASES = [
    ("1 point", True),
    ("1 point", False),
    ("3 points", True),
    ("3 points", False),
    ("box", False),
    ("box + point", False),
    ("mask + point", True),
    ("mask + point", False),
    ("batch of 3", True),
    ("batch of 3", False),
]


@pytest.mark.parametrize("case,multimask", CASES, ids=[f"{c}-{'multi' if m else 'single'}" for c, m in CASES])
def test_prompt_parity(setup, case, multimask):
    rows = [k for k, (c, *_) in enumerate(LAYOUT) if c == case]
    coords, labels = prompt(setup, case)
    if case == "batch of 3":
        image_idx = slice(0, 3)
    else:
        image_idx = slice(IMAGE_OF[case], IMAGE_OF[case] + 1)
    mask = setup["masks"][rows] if case == "mask + point" else None
    ref = torch_decode(setup, coords, labels, image_idx, mask, multimask)
    compare(f"{case}, multimask={multimask}", flax_case(setup["a"], rows, multimask), ref)


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
def test_repeat_image(setup, multimask):
    ref = torch_decode(setup, *prompt(setup, "repeat"), slice(0, 1), None, multimask, repeat_image=True)
    compare(f"repeat_image, multimask={multimask}", flax_case(setup["b"], [0, 1], multimask), ref)


def test_has_mask_flag_and_padding_content(setup):
    """Element GARBAGE = element 1 with other padding coordinates and a mask that has_mask=False
    turns off: the same outputs. (Not asserted bitwise: XLA's CPU matmuls may round rows of one
    batch differently; measured gap <= 1 ulp.)"""
    for multimask in (True, False):
        x = flax_case(setup["a"], [1], multimask)
        y = flax_case(setup["a"], [GARBAGE], multimask)
        print(f"  [garbage padding + has_mask=False vs clean, multimask={multimask}]")
        for name, u, v in zip(OUTPUTS[1:], x[1:], y[1:]):
            check(name, u, v, rel=1e-6, abs_=1e-5)


def test_padding_tokens_are_ignored(setup):
    """The same prompt with 0 (batch B) and with 5 (batch A) padding tokens gives the same outputs.

    Not bitwise: the two programs differ in shapes (17 vs 12 keys, batch 9 vs 2), so XLA sums in
    another order; the measured gap (rel ~1e-6, max-abs ~5e-6 on logits) is that float32 noise, the
    same size as the torch-vs-Flax gap. test_has_mask_flag_and_padding_content shows that the
    padding tokens' content does not matter."""
    row_a = [k for k, (c, i, *_) in enumerate(LAYOUT) if (c, i) == ("batch of 3", 0)]
    assert np.array_equal(np.asarray(REPEAT[0])[0], np.asarray(PROMPTS["batch of 3"][0])[0])
    for multimask in (True, False):
        padded = flax_case(setup["a"], row_a, multimask)
        unpadded = flax_case(setup["b"], [0], multimask)
        print(f"  [5 pad tokens vs none, multimask={multimask}]")
        for name, u, v in zip(OUTPUTS[1:], padded[1:], unpadded[1:]):
            check(name, u, v, rel=1e-5, abs_=2e-5)


def test_dynamic_multimask_both_paths(setup, monkeypatch):
    """All four masks (torch predict_masks) and the single-mask selection with thresholds just
    above / below the measured single-mask stability, so that both branches are taken."""
    tm, md = setup["tm"], setup["md"]
    tmd = tm.sam_mask_decoder
    _, _, (masks, iou, tokens, obj), _, _ = setup["a"]
    row = slice(1, 2)  # "3 points"
    emb, s0, s1 = (f[0:1] for f in setup["feats"])
    sparse, dense, image_pe = torch_prompt(setup, *prompt(setup, "3 points"))
    with torch.no_grad():
        ref = tmd.predict_masks(emb, image_pe, sparse, dense, repeat_image=False, high_res_features=[s0, s1])
    print("  [raw heads, 3 points]")
    for name, g, r in zip(("all masks", "all iou", "mask tokens", "object score"), (masks, iou, tokens, obj), ref):
        check(name, _np(g)[row], r.numpy())

    stab = float(md.stability_scores(masks[row, 0:1])[0, 0])
    best = int(np.argmax(_np(iou)[row][0, 1:])) + 1
    print(f"  single-mask stability {stab:.4f}, best multimask token {best}")
    for thresh, stable in ((stab - 0.01, True), (stab + 0.01, False)):
        monkeypatch.setattr(tmd, "dynamic_multimask_stability_thresh", thresh)
        monkeypatch.setattr(md, "dynamic_multimask_stability_thresh", thresh)
        ref_masks, ref_iou = tmd._dynamic_multimask_via_stability(ref[0], ref[1])
        sel_masks, sel_iou, _ = md.select_outputs(masks[row], iou[row], tokens[row], False)
        want = 0 if stable else best
        np.testing.assert_array_equal(_np(sel_masks)[:, 0], _np(masks)[row][:, want])
        print(f"  [dynamic multimask, stable={stable}]")
        check("masks", _np(sel_masks), ref_masks.numpy())
        check("iou", _np(sel_iou), ref_iou.numpy())


def test_dense_pe(setup):
    ref = torch_prompt(setup, *prompt(setup, "1 point"))[2].numpy().transpose(0, 2, 3, 1)
    check("dense pe", _np(setup["a"][4]), ref)


def test_conv_transpose_orientation():
    """torch ConvTranspose2d(k=2, s=2) == layers.conv_transpose2x2 with the generic weight map."""
    g = torch.Generator().manual_seed(3)
    tconv = torch.nn.ConvTranspose2d(8, 5, kernel_size=2, stride=2)
    with torch.no_grad():
        tconv.weight.copy_(torch.randn(tconv.weight.shape, generator=g))
        tconv.bias.copy_(torch.randn(tconv.bias.shape, generator=g))
        x = torch.randn(2, 8, 5, 7, generator=g)
        ref = nchw_to_nhwc(tconv(x))
    fconv = nnx.eval_shape(lambda: layers.conv_transpose2x2(8, 5, nnx.Rngs(0)))
    load_state_dict(fconv, {k: v.detach().numpy() for k, v in tconv.state_dict().items()})
    got = _np(fconv(jnp.asarray(nchw_to_nhwc(x))))
    assert got.shape == ref.shape == (2, 10, 14, 5)
    assert max_abs(got, ref) < 1e-5
    assert max_abs(got[:, ::2, ::2], ref[:, 1::2, 1::2]) > 1e-2  # a mirrored kernel would fail above
