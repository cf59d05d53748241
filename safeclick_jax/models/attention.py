"""Softmax attention shared by every SAM 2 / SafeClick module (Hiera, two-way transformer, CEL
experts, memory attention).

    out = dot_product_attention(q, k, v, key_mask)   # q [B, H, Nq, d], k/v [B, H, Nk, d]

Why not one einsum-softmax-einsum everywhere: the full-resolution attentions (Hiera's global blocks,
SafeClick's E1/E2, memory attention) have 1024-4096+ queries and keys, so the [B, H, Nq, Nk] score
tensor is hundreds of MB. On CPU, XLA materialises it in freshly allocated memory on every call, and
writing it (page faults, then DRAM traffic for the exp/max/sum passes) costs more than the two
matmuls. The chunked path cuts the work into pieces (`lax.map`) whose scores stay within
`max_scores` elements (cache-sized): several whole (batch, head) problems at a time when one fits,
else query chunks of one problem (`plan_chunks`). Its backward pass is hand-written
(flash-attention recurrence, `_chunked_bwd`), so no [Nq, Nk] tensor beyond one piece is kept for it.
benchmarks/bench_train.py and benchmarks/step_memory.py measure both paths (results in
benchmarks/RESULTS.md).

The implementation is a process-wide choice (`configure`; training sets it from the config's
`model.attention`):
  auto     chunked on the CPU backend, full elsewhere (on GPU/TPU XLA fuses the unchunked graph and a
           sequential loop would only cost parallelism)
  chunked  the chunked path on any backend (less memory: the one-shot form keeps the whole
           [B, H, Nq, Nk] probabilities for the backward pass)
  full     the one-shot form on any backend
  cudnn    (GPU only) every unmasked bf16/fp16 call goes to cuDNN's fused flash attention
           (`jax.nn.dot_product_attention(implementation="cudnn")`), which never stores the
           probabilities; masked or fp32 calls keep the one-shot form (cuDNN's flash kernels take
           16-bit inputs only)
The environment variables SAFECLICK_ATTENTION (a mode) and SAFECLICK_ATTENTION_MAX_SCORES (the piece
size) override the configured values; they are read when `configure` runs (once, at the first
attention call, when nothing configured it).

Numerics: scale 1/sqrt(d) applied to q, scores and softmax statistics in fp32 (also for bf16
inputs), the max subtracted as a constant (softmax is invariant to it, so its gradient is not
needed), and the normalisation applied to the [Nq, d] output rather than the [Nq, Nk]
probabilities (fewer divisions, same value). Masked keys (key_mask False) get the most negative
finite logit, so exp() gives exactly 0 and no row becomes NaN while one key is visible.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

MAX_SCORES = 1 << 20  # elements of one piece's score tensor (4 MB in fp32; 1 << 22 measured ~5-10 % slower)
# Every query chunk streams all keys and values once, so rows per chunk are counted as if a row had
# at most this many keys: longer rows (memory attention's 7 memory frames) get wider pieces
# rather than fewer rows, and the key stream stays amortised over max_scores / WIDE_ROW rows.
WIDE_ROW = 4096


def _attend(q, k, v, key_mask):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / e.sum(axis=-1, keepdims=True)).astype(q.dtype)


def plan_chunks(groups: int, nq: int, nk: int, max_scores: int = MAX_SCORES) -> tuple[int, int]:
    """(problems per piece, queries per piece) so that one piece's scores stay within max_scores.

    `groups` independent attention problems (batch x heads) of nq x nk scores each. When one
    problem fits, whole problems are taken several at a time: every matmul then contracts over the
    full key or query length (XLA:CPU runs those several times faster than the short contractions
    a query chunk gives in the backward pass). When it does not, one problem at a time is split
    into query chunks (a multiple of 8 where possible). Pieces are made equal in size, so that the
    padding (computed and dropped) is at most one less than the number of pieces: Hiera-t's 14 x 14
    windows at 128 px, batch 8 (32 problems of 196^2) are two pieces of 16, not 27 + 5 and 22 of
    padding."""
    if nq * nk <= max_scores:
        per = max(1, min(groups, max_scores // (nq * nk)))
        return -(-groups // -(-groups // per)), nq
    rows = max(1, max_scores // max(1, min(nk, WIDE_ROW)))
    if rows < 8:
        return 1, rows
    rows -= rows % 8
    chunk = -(-nq // -(-nq // rows))
    return 1, min(rows, chunk + (-chunk) % 8)


MODES = ("auto", "chunked", "full", "cudnn")


@dataclasses.dataclass(frozen=True)
class Choice:
    mode: str  # one of MODES
    max_scores: int  # elements of one piece's score tensor on the chunked path
    source: str  # where the values came from (for the log line)


_choice: Choice | None = None


def configure(mode: str = "auto", max_scores: int = -1, env=None) -> Choice:
    """Sets the implementation every later trace uses (module docstring); max_scores -1: MAX_SCORES.
    SAFECLICK_ATTENTION / SAFECLICK_ATTENTION_MAX_SCORES in `env` (default os.environ) win."""
    global _choice
    env = os.environ if env is None else env
    source = "config"
    if "SAFECLICK_ATTENTION" in env:
        mode, source = env["SAFECLICK_ATTENTION"], "SAFECLICK_ATTENTION"
        if mode not in MODES:
            raise ValueError(f"SAFECLICK_ATTENTION={mode!r}: expected one of {', '.join(MODES)}")
    elif mode not in MODES:
        raise ValueError(f"model.attention={mode!r}: expected one of {', '.join(MODES)}")
    if "SAFECLICK_ATTENTION_MAX_SCORES" in env:
        raw = env["SAFECLICK_ATTENTION_MAX_SCORES"]
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"SAFECLICK_ATTENTION_MAX_SCORES={raw!r}: expected a positive integer")
        max_scores, source = int(raw), source + ", SAFECLICK_ATTENTION_MAX_SCORES"
    elif max_scores == -1:
        max_scores = MAX_SCORES
    elif max_scores < 1:
        raise ValueError(f"model.attention_max_scores={max_scores}: expected a positive integer or -1")
    _choice = Choice(mode, int(max_scores), source)
    return _choice


def current() -> Choice:
    """The configured choice (configured from the environment alone on first use)."""
    return _choice if _choice is not None else configure()


def fused_attention(q, k, v, implementation: str = "cudnn"):
    """Unmasked attention through jax.nn.dot_product_attention (q already scaled): [B, H, N, d]
    in and out, the library's [B, N, H, d] layout inside. implementation="xla" runs the same
    plumbing anywhere (the CPU test checks it against `_attend`)."""
    t = lambda a: a.transpose(0, 2, 1, 3)
    out = jax.nn.dot_product_attention(t(q), t(k), t(v), scale=1.0, implementation=implementation)
    return t(out)


def dot_product_attention(q, k, v, key_mask=None, chunk_queries: bool | None = None, max_scores: int | None = None):
    """softmax(q k^T / sqrt(d)) v for q / k [B, H, Nq|Nk, d], v [B, H, Nk, dv]; key_mask [B, Nk] bool
    (True = attend) or None. Returns [B, H, Nq, dv] in q's dtype. chunk_queries / max_scores None:
    the configured choice (`configure`, module docstring)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    choice = current()
    mode = choice.mode
    max_scores = choice.max_scores if max_scores is None else max_scores
    if mode == "cudnn" and jax.default_backend() != "gpu":
        name = "SAFECLICK_ATTENTION" if choice.source.startswith("SAFECLICK") else "model.attention"
        raise ValueError(f"{name}=cudnn needs a GPU (cuDNN); the backend is {jax.default_backend()!r}")
    if chunk_queries is None:
        if mode == "cudnn" and key_mask is None and q.dtype in (jnp.bfloat16, jnp.float16):
            return fused_attention(q, k, v)
        chunk_queries = {"chunked": True, "full": False}.get(mode, jax.default_backend() == "cpu")
    if not chunk_queries:
        return _attend(q, k, v, key_mask)
    groups = b * h
    per, chunk = plan_chunks(groups, nq, nk, max_scores)
    n_pieces, n_chunks = -(-groups // per), -(-nq // chunk)
    # Padding: extra problems and extra queries are computed and dropped; they touch no real row.
    pad_g, pad_q = n_pieces * per - groups, n_chunks * chunk - nq
    qf = jnp.pad(q.reshape(groups, nq, d), ((0, pad_g), (0, pad_q), (0, 0)))
    dv = v.shape[-1]  # may differ from d (memory attention attends to unprojected values)
    kf, vf = (jnp.pad(a.reshape(groups, nk, a.shape[-1]), ((0, pad_g), (0, 0), (0, 0))) for a in (k, v))
    if key_mask is None:
        # An all-True mask rather than none: the select it adds keeps XLA:CPU from fusing the
        # q k^T dot with the max/exp into one YNNPACK fusion, which ran slower (SafeClick's E1 + E2
        # at 1024 px: 3-4 % slower without the mask, two interleaved runs).
        mask = jnp.ones((n_pieces * per, nk), bool)
    else:
        mask = jnp.broadcast_to(key_mask[:, None, :], (b, h, nk)).reshape(groups, nk)
        mask = jnp.pad(mask, ((0, pad_g), (0, 0)), constant_values=True)
    mask = mask.reshape(n_pieces, per, nk)
    qc = qf.reshape(n_pieces, per, n_chunks, chunk, d).transpose(0, 2, 1, 3, 4)
    kf, vf = kf.reshape(n_pieces, per, nk, d), vf.reshape(n_pieces, per, nk, dv)
    out = jax.lax.map(lambda a: _chunked_attention(*a), (qc, kf, vf, mask))  # [pieces, chunks, per, c, dv]
    out = out.transpose(0, 2, 1, 3, 4).reshape(n_pieces * per, n_chunks * chunk, dv)
    return out[:groups, :nq].reshape(b, h, nq, dv)


# Chunked attention with a hand-written backward pass (the flash-attention recurrence). Autodiff
# of the chunked loop keeps every chunk's probabilities and differentiates exp/max/sum/divide
# element by element: measured 1250 ms for a batch-8, 8-head, 1024-token fwd+bwd on CPU against
# 193 ms forward. The backward below recomputes each chunk's probabilities from the saved
# log-sum-exp and needs five matmuls per chunk and no [Nq, Nk] tensor beyond one chunk.
# qc: [n, G, chunk, d] (already scaled), k [G, Nk, d], v [G, Nk, dv], key_mask [G, Nk] -> [n, G, chunk, dv].


def _scores(qq, k, key_mask):
    s = jnp.einsum("gqd,gkd->gqk", qq, k, preferred_element_type=jnp.float32)
    return jnp.where(key_mask[:, None, :], s, jnp.finfo(s.dtype).min)


@jax.custom_vjp
def _chunked_attention(qc, k, v, key_mask):
    return _chunked_fwd(qc, k, v, key_mask)[0]


def _chunked_fwd(qc, k, v, key_mask):
    def block(qq):
        s = _scores(qq, k, key_mask)
        m = s.max(axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        den = e.sum(axis=-1, keepdims=True)
        o = jnp.einsum("gqk,gkd->gqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / den
        return o.astype(qc.dtype), (m + jnp.log(den))[..., 0]

    out, lse = jax.lax.map(block, qc)
    return out, (qc, k, v, key_mask, out, lse)


def _chunked_bwd(res, dout):
    qc, k, v, key_mask, out, lse = res
    f32 = jnp.float32

    def block(carry, xs):
        dkt, dvt = carry  # dK^T, dV^T: [G, d, Nk] (see below)
        qq, oo, do, l = xs
        p = jnp.exp(_scores(qq, k, key_mask) - l[..., None])  # softmax probabilities of the chunk
        # dV = P^T dO and dK = dS^T Q contract over the query rows of the [q, k] matrix. XLA:CPU
        # runs that form ("gqk,gqd->gkd") 2.5x slower than dO^T P ("gqd,gqk->gdk", the same sum
        # with the small [d, Nk] result transposed): 192 vs 76 ms for 64 problems of 1024^2, d=32.
        dvt = dvt + jnp.einsum("gqd,gqk->gdk", do, p.astype(do.dtype), preferred_element_type=f32)
        dp = jnp.einsum("gqd,gkd->gqk", do, v, preferred_element_type=f32)
        delta = jnp.sum(do.astype(f32) * oo.astype(f32), axis=-1, keepdims=True)  # rowsum(dP * P)
        ds = (p * (dp - delta)).astype(qq.dtype)
        dq = jnp.einsum("gqk,gkd->gqd", ds, k, preferred_element_type=f32).astype(qq.dtype)
        dkt = dkt + jnp.einsum("gqd,gqk->gdk", qq, ds, preferred_element_type=f32)
        return (dkt, dvt), dq

    g, nk, d = k.shape
    zeros = jnp.zeros((g, d, nk), f32), jnp.zeros((g, v.shape[-1], nk), f32)
    (dkt, dvt), dq = jax.lax.scan(block, zeros, (qc, out, dout, lse))
    return dq, dkt.transpose(0, 2, 1).astype(k.dtype), dvt.transpose(0, 2, 1).astype(v.dtype), None


_chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)
