"""Softmax attention shared by every SAM 2 / SafeClick module (Hiera, two-way transformer, CEL
experts, memory attention).

    out = dot_product_attention(q, k, v, key_mask)   # q [B, H, Nq, d], k/v [B, H, Nk, d]

Why not one einsum-softmax-einsum: the full-resolution attentions (Hiera's global blocks, SafeClick's
E1/E2, memory attention) have 4096+ queries and keys, so the [B, H, Nq, Nk] score tensor is hundreds
of MB. On CPU, XLA materialises it in freshly allocated memory on every call, and writing it (page
faults, then DRAM traffic for the exp/max/sum passes) cost more than the two matmuls: Hiera-t's
global block spent 800 ms in attention against 240 ms for torch's fused SDPA. Here the queries are
processed in chunks (`lax.map`), sized so one chunk's scores stay within `max_scores` elements
(16 MB in fp32, L3-resident), which brought that block's attention to ~350 ms (benchmarks/README).

On GPU/TPU XLA fuses the unchunked graph and a sequential loop would only cost parallelism, so
chunking is on for the CPU backend only (`chunk_queries=None` picks by backend).

Numerics: scale 1/sqrt(d) applied to q, scores and softmax statistics in fp32 (also for bf16
inputs), the max subtracted as a constant (softmax is invariant to it, so its gradient is not
needed), and the normalisation applied to the [Nq, d] output rather than the [Nq, Nk]
probabilities (fewer divisions, same value). Masked keys (key_mask False) get the most negative
finite logit, so exp() gives exactly 0 and no row becomes NaN while one key is visible.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_SCORES = 1 << 22  # elements of one chunk's [B, H, chunk, Nk] score tensor (16 MB in fp32)


def _attend(q, k, v, key_mask):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
    o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / e.sum(axis=-1, keepdims=True)).astype(q.dtype)


def query_chunk(batch_heads: int, nq: int, nk: int, max_scores: int = MAX_SCORES) -> int:
    """The number of queries per chunk so that batch_heads * chunk * nk <= max_scores (at least 1,
    at most nq), rounded down to a multiple of 8 where that is possible."""
    rows = max(1, max_scores // max(1, batch_heads * nk))
    if rows >= nq:
        return nq
    return rows - rows % 8 if rows >= 8 else rows


def dot_product_attention(q, k, v, key_mask=None, chunk_queries: bool | None = None,
                          max_scores: int = MAX_SCORES):
    """softmax(q k^T / sqrt(d)) v for q [B, H, Nq, d], k/v [B, H, Nk, d]; key_mask [B, Nk] bool
    (True = attend) or None. Returns [B, H, Nq, d] in q's dtype."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    if chunk_queries is None:
        chunk_queries = jax.default_backend() == "cpu"
    chunk = query_chunk(b * h, nq, nk, max_scores) if chunk_queries else nq
    if chunk >= nq:
        return _attend(q, k, v, key_mask)
    n = -(-nq // chunk)
    pad = n * chunk - nq  # padded queries are computed and dropped; they touch no real row
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    qc = q.reshape(b, h, n, chunk, d).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda qq: _attend(qq, k, v, key_mask), qc)
    return out.transpose(1, 2, 0, 3, 4).reshape(b, h, n * chunk, d)[:, :, :nq]
