"""attention.py: the chunked CPU path equals the one-shot softmax and torch's SDPA, values and
gradients, with and without a key mask, for query counts that do and do not divide the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safeclick_jax.models import attention
from safeclick_jax.models.attention import dot_product_attention, plan_chunks


@pytest.fixture(autouse=True)
def fresh_attention_choice(monkeypatch):
    """Each test configures the process-wide choice itself; it is reset afterwards."""
    monkeypatch.delenv("SAFECLICK_ATTENTION", raising=False)
    monkeypatch.delenv("SAFECLICK_ATTENTION_MAX_SCORES", raising=False)
    monkeypatch.setattr(attention, "_choice", None)


def qkv(b, h, nq, nk, d, seed=0, sharp=4.0):
    rs = np.random.RandomState(seed)
    q = rs.randn(b, h, nq, d).astype(np.float32) * sharp  # sharp softmax: max-subtraction matters
    k, v = rs.randn(2, b, h, nk, d).astype(np.float32)
    return q, k, v


def torch_sdpa(q, k, v, key_mask=None):
    mask = None if key_mask is None else torch.from_numpy(key_mask)[:, None, None, :]
    return F.scaled_dot_product_attention(*(torch.from_numpy(t) for t in (q, k, v)), attn_mask=mask).numpy()


@pytest.mark.parametrize("nq", [49, 64, 200])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch_sdpa_chunked_and_not(nq, masked):
    q, k, v = qkv(2, 3, nq, 196, 48, seed=nq)
    key_mask = None
    if masked:
        key_mask = np.ones((2, 196), bool)
        key_mask[0, 150:] = False
        key_mask[1, :7] = False
    want = torch_sdpa(q, k, v, key_mask)
    km = None if key_mask is None else jnp.asarray(key_mask)
    # 4 whole problems per piece (6 problems: the last piece is padded), or query chunks of 40
    # (49 and 200 queries need padding), or everything at once
    for chunk, max_scores in ((True, 4 * 200 * 196), (True, 40 * 196), (False, 0)):
        got = np.asarray(
            dot_product_attention(
                jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), km, chunk_queries=chunk, max_scores=max_scores
            )
        )
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5, (chunk, max_scores, np.abs(got - want).max())


def test_chunk_plan():
    assert plan_chunks(4, 4096, 4096) == (1, 256)  # Hiera-t global block at 1024 px: 4 MB of scores
    assert plan_chunks(64, 1024, 1024) == (1, 1024)  # SafeClick experts at 512 px, batch 8: whole heads
    assert plan_chunks(64, 256, 256) == (16, 256)  # ... at 256 px: 16 heads at a time
    assert plan_chunks(2, 100, 100) == (2, 100)  # everything fits: one piece
    assert plan_chunks(32, 196, 196) == (16, 196)  # Hiera-t 14 x 14 windows, 128 px, batch 8: equal pieces
    assert plan_chunks(1, 4100, 4096) == (1, 248)  # 17 query chunks of 248 rows (4216), not of 256 (4352)
    # memory attention at 1024 px (7 memory frames + pointers): rows counted as if a row had WIDE_ROW keys
    assert plan_chunks(1, 4096, 7 * 4096 + 64) == (1, 256)
    assert plan_chunks(1, 4096, 8192, max_scores=8 * 4096) == (1, 8)  # the row floor follows max_scores
    assert plan_chunks(1, 100, 30, max_scores=30 * 13) == (1, 8)  # rounded down to a multiple of 8
    assert plan_chunks(64, 100, 1000, max_scores=10) == (1, 1)  # never zero


@pytest.mark.parametrize("masked", [True, False], ids=["key_mask", "no_mask"])
@pytest.mark.parametrize("max_scores", [3 * 70 * 90, 16 * 90], ids=["whole_problems", "query_chunks"])
def test_chunked_gradients_equal_one_shot(max_scores, masked):
    q, k, v = qkv(2, 2, 70, 90, 16, seed=5)
    key_mask = jnp.asarray(np.arange(90)[None] < np.array([[80], [90]])) if masked else None

    def grads(chunk):
        def f(q, k, v):
            o = dot_product_attention(q, k, v, key_mask, chunk_queries=chunk, max_scores=max_scores)
            return jnp.sum(jnp.sin(o))

        return jax.grad(f, argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))

    for a, b in zip(grads(True), grads(False)):  # hand-written backward vs autodiff of the one-shot form
        scale = float(jnp.abs(b).max())
        assert scale > 0 and float(jnp.abs(a - b).max()) <= 1e-5 * scale
    if masked:  # masked keys get no gradient through the values
        assert float(jnp.abs(grads(True)[2][0, :, 80:]).max()) == 0.0


@pytest.mark.parametrize("max_scores", [3 * 70 * 90, 16 * 90], ids=["whole_problems", "query_chunks"])
def test_values_narrower_than_keys(max_scores):
    """Memory attention weights its 64-d memories before projecting them to the 256-d head: v may
    have another width than q and k, on both paths, values and gradients."""
    q, k, _ = qkv(2, 2, 70, 90, 16, seed=7)
    v = np.random.RandomState(8).randn(2, 2, 90, 4).astype(np.float32)
    key_mask = jnp.asarray(np.arange(90)[None] < np.array([[80], [90]]))
    want = torch_sdpa(q, k, v, np.array(key_mask))

    def f(chunk):
        return lambda q, k, v: dot_product_attention(q, k, v, key_mask, chunk_queries=chunk, max_scores=max_scores)

    for chunk in (True, False):
        got = np.asarray(f(chunk)(*map(jnp.asarray, (q, k, v))))
        assert got.shape == (2, 2, 70, 4) and np.abs(got - want).max() <= 1e-5
    grads = [
        jax.grad(lambda *a: jnp.sum(jnp.sin(f(c)(*a))), argnums=(0, 1, 2))(*map(jnp.asarray, (q, k, v)))
        for c in (True, False)
    ]
    for a, b in zip(*grads):
        assert a.shape == b.shape and float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())


def test_bf16_inputs_keep_fp32_statistics():
    q, k, v = qkv(1, 2, 64, 300, 32, seed=6)
    want = torch_sdpa(q, k, v)
    got = dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - want).max()
    assert err <= 0.05, err  # bf16 rounding of inputs and output, not an fp16-style overflow


def test_environment_override(monkeypatch):
    """SAFECLICK_ATTENTION picks the path on any backend (lowered graph: a while loop for the
    chunked pieces, none for one-shot), read when `configure` runs; bad values name the variable."""
    q, k, v = (jnp.asarray(a) for a in qkv(1, 2, 64, 64, 16))
    outs = {}
    for mode, has_loop in (("chunked", True), ("full", False)):
        monkeypatch.setenv("SAFECLICK_ATTENTION", mode)
        monkeypatch.setenv("SAFECLICK_ATTENTION_MAX_SCORES", str(64 * 32))
        assert attention.configure("auto") == attention.Choice(
            mode, 64 * 32, "SAFECLICK_ATTENTION, SAFECLICK_ATTENTION_MAX_SCORES"
        )
        text = jax.jit(lambda q, k, v: dot_product_attention(q, k, v)).lower(q, k, v).as_text()
        assert ("while" in text) == has_loop, mode
        outs[mode] = np.asarray(jax.jit(lambda q, k, v: dot_product_attention(q, k, v))(q, k, v))
    np.testing.assert_allclose(outs["chunked"], outs["full"], atol=1e-5)
    monkeypatch.setenv("SAFECLICK_ATTENTION", "flash")
    with pytest.raises(ValueError, match="SAFECLICK_ATTENTION='flash'"):
        attention.configure()
    monkeypatch.setenv("SAFECLICK_ATTENTION", "auto")
    monkeypatch.setenv("SAFECLICK_ATTENTION_MAX_SCORES", "0")
    with pytest.raises(ValueError, match="SAFECLICK_ATTENTION_MAX_SCORES='0'"):
        attention.configure()


def test_config_choice_and_read_once(monkeypatch):
    """model.attention picks the path without the variables; the environment is read by `configure`
    only, so a variable set afterwards changes nothing until the next configure."""
    q, k, v = (jnp.asarray(a) for a in qkv(1, 2, 64, 64, 16))
    lowered = lambda: jax.jit(lambda q, k, v: dot_product_attention(q, k, v)).lower(q, k, v).as_text()
    assert attention.configure("chunked", 64 * 32) == attention.Choice("chunked", 64 * 32, "config")
    assert "while" in lowered()
    monkeypatch.setenv("SAFECLICK_ATTENTION", "full")
    assert "while" in lowered()  # not re-read
    assert attention.configure("chunked").mode == "full"  # the variable overrides the config
    assert "while" not in lowered()
    monkeypatch.delenv("SAFECLICK_ATTENTION")
    assert attention.configure("full", -1) == attention.Choice("full", attention.MAX_SCORES, "config")
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention.configure("flash")
    with pytest.raises(ValueError, match="model.attention_max_scores=0"):
        attention.configure("auto", 0)


def test_fused_library_path_layout_and_gradients():
    """fused_attention (the SAFECLICK_ATTENTION=cudnn path, [B,H,N,d] <-> the library's [B,N,H,d])
    run with implementation="xla" equals torch's SDPA and the one-shot form's gradients; only the
    implementation string differs on a GPU. Asking for cudnn without a GPU names the variable."""
    from safeclick_jax.models.attention import fused_attention

    q, k, v = qkv(2, 3, 50, 70, 16, seed=7)
    want = torch_sdpa(q, k, v)
    qs = jnp.asarray(q) / np.sqrt(16)  # fused_attention takes q already scaled, as the caller has it
    got = np.asarray(fused_attention(qs, jnp.asarray(k), jnp.asarray(v), implementation="xla"))
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5
    loss = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    )
    ga = loss(lambda q, k, v: fused_attention(q / np.sqrt(16), k, v, implementation="xla"))
    gb = loss(lambda q, k, v: dot_product_attention(q, k, v, chunk_queries=False))
    for a, b in zip(ga, gb):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())


def test_cudnn_mode_needs_a_gpu(monkeypatch):
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the cudnn mode is valid")
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(1, 2, 16, 16, 8))
    monkeypatch.setenv("SAFECLICK_ATTENTION", "cudnn")
    attention.configure()
    with pytest.raises(ValueError, match="SAFECLICK_ATTENTION=cudnn needs a GPU"):
        dot_product_attention(q, k, v)


def test_cudnn_mode_routes_only_unmasked_16bit_calls(monkeypatch):
    """Routing of SAFECLICK_ATTENTION=cudnn, checked on the CPU with the backend reported as "gpu"
    and the fused call spied on (run with implementation="xla"): unmasked bf16 goes to the fused
    kernel, masked or fp32 calls to the one-shot form; both give the same values."""
    calls = []

    def spy(q, k, v, implementation="cudnn"):
        calls.append(q.dtype)
        return attention.fused_attention.__wrapped__(q, k, v, implementation="xla")

    spy.__wrapped__ = attention.fused_attention
    monkeypatch.setattr(attention, "fused_attention", spy)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("SAFECLICK_ATTENTION", "cudnn")
    attention.configure()
    q, k, v = qkv(1, 2, 32, 40, 16, seed=8)
    mask = jnp.asarray(np.arange(40)[None] < 30)
    bf = [jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)]
    fused = dot_product_attention(*bf)
    assert calls == [jnp.bfloat16]
    dot_product_attention(*bf, mask)  # masked: one-shot
    dot_product_attention(*(jnp.asarray(t) for t in (q, k, v)))  # fp32: one-shot
    assert len(calls) == 1
    attention.configure("full", env={})
    ref = dot_product_attention(*bf)
    err = np.abs(np.asarray(fused, np.float32) - np.asarray(ref, np.float32)).max()
    assert err <= 0.03, err  # bf16 rounding only
