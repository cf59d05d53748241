"""SafeClick decoder: Flax vs the PyTorch reference (convert/safeclick_torch.py), every ablation
variant, random perturbed weights, fp32 CPU: forward outputs and gradients of a loss w.r.t. the
trainable parameters; plus the weight map in both directions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.safeclick_torch import build_safeclick_torch  # noqa: E402
from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickModel, trainable_filter  # noqa: E402
from safeclick_jax.models.weight_map import load_state_dict, state_dict  # noqa: E402
from tests.sam2_torch import max_abs, rel_err, torch

IMAGE_SIZE = 256  # E = 16: the decoder's math is size-independent, this keeps the test fast
VARIANTS = {"full": {}, "no_e1": {"use_e1": False}, "no_e2": {"use_e2": False}, "no_crl": {"use_crl": False}}
IMAGE_PATH = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed", "safeclick.")


def _pair(variant, seed=0):
    sc = SafeClickConfig(**VARIANTS[variant])
    tmodel, cfg = build_safeclick_torch("sam2.1_hiera_t", sc, image_size=IMAGE_SIZE, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for t in tmodel.state_dict().values():
            if t.is_floating_point():  # also the zero-initialised F_conv, so every gradient flows
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items() if k.startswith(IMAGE_PATH)}
    fmodel = nnx.eval_shape(lambda: SafeClickModel(cfg, sc, nnx.Rngs(0)))
    load_state_dict(fmodel, sd, strict=True)
    return tmodel, fmodel, cfg


def _inputs(cfg, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    e = cfg.embedding_size
    return {
        "image_embed": rng.normal(size=(batch, 256, e, e)).astype(np.float32),
        "s0": rng.normal(size=(batch, 32, 4 * e, 4 * e)).astype(np.float32),
        "s1": rng.normal(size=(batch, 64, 2 * e, 2 * e)).astype(np.float32),
        "block": rng.normal(size=(batch, 384, e, e)).astype(np.float32),
        # one click + SAM's pad point; second prompt: box corners + click + pad
        "coords": np.array(
            [[[100.0, 120.0], [0, 0], [0, 0], [0, 0]], [[40.0, 50.0], [200.0, 210.0], [120.0, 130.0], [0, 0]]],
            np.float32,
        )[:batch],
        "labels": np.array([[1, -1, -2, -2], [2, 3, 1, -1]], np.int32)[:batch],
    }


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _torch_forward(tmodel, x, multimask):
    it = lambda k: torch.from_numpy(x[k])
    refined = tmodel.safeclick.image_features(it("block"), it("image_embed"))
    outs = []
    for i in range(x["coords"].shape[0]):  # torch has no padding mask: one prompt at a time, unpadded
        keep = x["labels"][i] >= 0  # torch's prompt encoder appends SAM's (0,0,-1) pad point itself
        c = torch.from_numpy(x["coords"][i][keep])[None]
        l = torch.from_numpy(x["labels"][i][keep])[None]
        outs.append(
            tmodel.decode(
                it("image_embed")[i : i + 1],
                (it("s0")[i : i + 1], it("s1")[i : i + 1]),
                refined[i : i + 1],
                c,
                l,
                None,
                multimask,
            )
        )
    return [torch.cat([o[j] for o in outs]) for j in range(4)]


def _flax_forward(fmodel, x, multimask):
    """jit-compiled (eager NNX is slow on 2 cores)."""
    graphdef, state = nnx.split(fmodel)
    return jax.jit(lambda st: _flax_apply(nnx.merge(graphdef, st), x, multimask))(state)


def _flax_apply(fmodel, x, multimask):
    b = x["coords"].shape[0]
    feats = {"image_embed": _nhwc(x["image_embed"]), "high_res_feats": (_nhwc(x["s0"]), _nhwc(x["s1"]))}
    feats["refined"] = fmodel.safeclick.image_features(_nhwc(x["block"]), feats["image_embed"])
    e4 = 4 * fmodel.cfg.embedding_size
    return fmodel.decode(
        feats,
        jnp.asarray(x["coords"]),
        jnp.asarray(x["labels"]),
        jnp.zeros((b, e4, e4, 1)),
        jnp.zeros((b,), bool),
        multimask,
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    return request.param, _pair(request.param)


@pytest.mark.parametrize("multimask", [True, False])
def test_forward_parity(pair, multimask):
    variant, (tmodel, fmodel, cfg) = pair
    if multimask and variant != "full":
        pytest.skip("ablations: single-mask path in the fast suite (multimask under the full model)")
    x = _inputs(cfg)
    with torch.no_grad():
        tm, ti, _, to = _torch_forward(tmodel, x, multimask)
    fm, fi, _, fo = _flax_forward(fmodel, x, multimask)
    r, a, ri = rel_err(fm, tm.numpy()), max_abs(fm, tm.numpy()), rel_err(fi, ti.numpy())
    print(
        f"{variant} multimask={multimask}: masks rel {r:.2e} max-abs {a:.2e}; iou rel {ri:.2e}; "
        f"obj rel {rel_err(fo, to.numpy()):.2e}"
    )
    assert r <= 1e-4 and a <= 1e-3 and ri <= 1e-4 and rel_err(fo, to.numpy()) <= 1e-4


def test_gradient_parity(pair):
    if pair[0] != "full":
        pytest.skip("ablation gradients: test_gradient_parity_ablations (slow)")
    check_gradients(*pair)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["no_e1", "no_e2", "no_crl"])
def test_gradient_parity_ablations(variant):
    check_gradients(variant, _pair(variant))


def check_gradients(variant, pair):
    tmodel, fmodel, cfg = pair
    x = _inputs(cfg, seed=1)
    rng = np.random.default_rng(3)
    e4 = 4 * cfg.embedding_size
    wm = rng.normal(size=(2, 3, e4, e4)).astype(np.float32)
    wi = rng.normal(size=(2, 3)).astype(np.float32)
    is_trainable = trainable_filter()

    # torch: the same loss, decoder in training mode (no stability fallback), multimask outputs
    tmodel.train()
    tmodel.zero_grad()
    tm, ti, _, _ = _torch_forward(tmodel, x, True)
    (torch.sum(tm * torch.from_numpy(wm)) / tm.numel() + torch.sum(ti * torch.from_numpy(wi))).backward()
    tmodel.eval()
    # a parameter the loss does not reach (the object-score head) has grad None in torch, 0 in JAX
    tgrads = {
        k: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
        for k, p in tmodel.named_parameters()
    }

    graphdef, params, rest = nnx.split(fmodel, is_trainable, ...)

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        fm, fi, _, _ = _flax_apply(m, x, True)
        return jnp.sum(fm * wm) / fm.size + jnp.sum(fi * wi)

    grads = jax.jit(jax.grad(loss_fn))(params)
    fgrads = state_dict_of(grads)
    assert fgrads, "no trainable parameters"
    worst, worst_key = 0.0, None
    # Key-projection biases have a gradient that is exactly 0 in exact arithmetic (softmax is
    # shift-invariant in the logits), so both frameworks return float noise there: for those we
    # check that both are negligible instead of comparing noise relatively.
    scale = max(np.linalg.norm(t) for t in tgrads.values())
    for k, g in fgrads.items():
        assert k in tgrads, f"{k} has a gradient in flax but none in torch"
        if k.endswith("k_proj.bias"):
            assert np.linalg.norm(g) <= 1e-5 * scale and np.linalg.norm(tgrads[k]) <= 1e-5 * scale, k
            continue
        e = rel_err(g, tgrads[k])
        if e > worst:
            worst, worst_key = e, k
    flat_f = np.concatenate([g.ravel() for g in fgrads.values()])
    flat_t = np.concatenate([tgrads[k].ravel() for k in fgrads])
    print(
        f"{variant}: {len(fgrads)} trainable tensors, global grad rel {rel_err(flat_f, flat_t):.2e}, "
        f"worst tensor {worst_key} rel {worst:.2e}"
    )
    assert rel_err(flat_f, flat_t) <= 1e-4
    assert worst <= 1e-3
    # trainable set: SafeClick head + mask decoder minus conv_s0/s1; torch saw gradients for those only
    trained_in_torch = {
        k
        for k in tgrads
        if k.startswith(("safeclick.", "sam_mask_decoder."))
        and not k.startswith("sam_mask_decoder.pred_obj_score_head")
        and not k.startswith(("sam_mask_decoder.conv_s0", "sam_mask_decoder.conv_s1"))
    }
    assert set(fgrads) - {k for k in fgrads if k.startswith("sam_mask_decoder.pred_obj_score_head")} == trained_in_torch


def state_dict_of(grads_state):
    """torch-layout dict of a State of gradients (same transforms as the weight map)."""
    from safeclick_jax.models.weight_map import to_torch_layout, torch_key

    return {
        torch_key(p): np.asarray(
            to_torch_layout(
                str(p[-1]), np.asarray(v[...] if hasattr(v, "__getitem__") and not isinstance(v, jax.Array) else v)
            )
        )
        for p, v in grads_state.flat_state()
    }


def test_flax_to_torch_direction():
    """A SafeClick model trained in Flax loads into the torch reference and gives its outputs."""
    sc = SafeClickConfig()
    tmodel, cfg = build_safeclick_torch("sam2.1_hiera_t", sc, image_size=IMAGE_SIZE, seed=5)
    fmodel = SafeClickModel(cfg, sc, nnx.Rngs(11))
    # give the zero-initialised F_conv and alpha non-trivial values, as after training
    fmodel.safeclick.crl.conv.kernel[...] = 0.05 * jax.random.normal(
        jax.random.key(0), fmodel.safeclick.crl.conv.kernel.shape
    )
    fmodel.safeclick.crl.alpha[...] = jnp.asarray(0.3)
    sd = state_dict(fmodel)
    missing, unexpected = tmodel.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False
    )
    assert not unexpected
    assert all(not k.startswith(IMAGE_PATH) for k in missing), missing  # only memory/video keys remain
    x = _inputs(cfg, seed=2)
    with torch.no_grad():
        tm, ti, _, _ = _torch_forward(tmodel, x, False)
    fm, fi, _, _ = _flax_forward(fmodel, x, False)
    print(f"flax->torch: masks rel {rel_err(fm, tm.numpy()):.2e}")
    assert rel_err(fm, tm.numpy()) <= 1e-4 and rel_err(fi, ti.numpy()) <= 1e-4
