"""Small building blocks shared by the SAM 2 modules.

Naming rule used across the project: every Flax attribute path mirrors the PyTorch state_dict key
(`blocks.3.attn.qkv` <-> `blocks[3].attn.qkv`), so one generic rule converts checkpoints
(safeclick_jax/models/weight_map.py): Linear weight -> kernel (transposed), Conv weight -> kernel (HWIO),
LayerNorm weight -> scale, Embedding weight -> embedding; every other tensor keeps its torch layout.
Feature maps are NHWC throughout.

Random initialisation is torch's, so that a model trained from scratch starts where sam2's
SAM2Train starts: Linear / Conv weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's
kaiming_uniform(a=sqrt(5)) and its bias rule), Embedding N(0, 1), and sam2_base's
trunc_normal(std 0.02) for its learned position / "no memory" tensors (`small_normal`). Flax's
defaults (lecun normal, zero biases, embeddings of std 1/sqrt(dim)) differ: prompt and output
tokens 16x smaller, weights 1.7x larger.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """A tensor loaded from the checkpoint that is never trained (torch `register_buffer`)."""


def torch_uniform(fan_in: int):
    """torch's default init of a Linear / Conv weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / (max(fan_in, 1) ** 0.5)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def small_normal(rngs: nnx.Rngs, shape) -> nnx.Param:
    """sam2_base's trunc_normal_(std=0.02) (truncated at +-2, i.e. 100 std: a plain normal)."""
    return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, jnp.float32))


def embed(num: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
    """torch nn.Embedding: N(0, 1) rows."""
    return nnx.Embed(num, dim, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)


def gelu(x):
    # SAM 2 uses torch's exact (erf) GELU everywhere; flax's default is the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # eps differs per module in SAM 2 (1e-6 Hiera/LayerNorm2d, 1e-5 two-way transformer), so it is
    # always passed explicitly. use_fast_variance=False computes E[(x-mean)^2] like torch.
    return LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm (same parameters, same forward values) with a hand-written backward pass
    (`normalize_last_axis`)."""

    def __call__(self, x):
        return normalize_last_axis(x, self.scale[...], self.bias[...], self.epsilon)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_last_axis(x, scale, bias, eps: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, computed in float32 (also
    for bf16 inputs, as flax), output in the promoted dtype of x, scale and bias.

    Why a custom VJP: autodiff of the two-pass variance differentiates mean, (x - mean)^2 and
    rsqrt one by one, and XLA:CPU runs the result as several full passes over x and the cotangent.
    The closed form dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * scale, needs one
    pass for the two row means and one for dx."""
    return _ln_fwd(x, scale, bias, eps)[0]


def _ln_stats(x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return x32, mean, var


def _ln_fwd(x, scale, bias, eps):
    dtype = jnp.result_type(x, scale, bias)
    x32, mean, var = _ln_stats(x)
    rstd = jax.lax.rsqrt(var + eps)
    # flax's order of operations (nnx.normalization._normalize), so the values are flax's
    y = (x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(dtype), (x, mean, rstd, scale, bias)


def _ln_bwd(eps, res, dy):
    x, mean, rstd, scale, bias = res
    f32 = jnp.float32
    xhat = (x.astype(f32) - mean) * rstd
    dy32 = dy.astype(f32)
    g = dy32 * scale.astype(f32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    axes = tuple(range(dy.ndim - 1))
    dscale = (dy32 * xhat).sum(axes)
    dbias = dy32.sum(axes)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


normalize_last_axis.defvjp(_ln_fwd, _ln_bwd)


def linear(din: int, dout: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    init = torch_uniform(din)
    return Linear(din, dout, use_bias=use_bias, kernel_init=init, bias_init=init, rngs=rngs)


class Linear(nnx.Linear):
    """nnx.Linear (same parameters and forward values) whose kernel gradient transposes the
    narrower of the input and the output cotangent (`dense`)."""

    def __call__(self, x):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else jnp.zeros((kernel.shape[1],), kernel.dtype)
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        return dense(x, kernel, bias)


@jax.custom_vjp
def dense(x, kernel, bias):
    """x @ kernel + bias over x's last axis.

    Why a custom VJP: the kernel gradient x^T dy sums over the tokens, the leading (major) axis
    of both x [T, din] and dy [T, dout], and XLA:CPU's dot kernels take the summed axis minor on
    the left operand, so one operand is transposed in memory first. Autodiff leaves the choice to
    XLA, which also transposed the wider one (dqkv [T, 3 * dim] rather than x [T, dim]); here the
    narrower one is the left operand."""
    return _dense_fwd(x, kernel, bias)[0]


def _dense_fwd(x, kernel, bias):
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,)), (x, kernel)


def _dense_bwd(res, dy):
    x, kernel = res
    din, dout = kernel.shape
    x2, dy2 = x.reshape(-1, din), dy.reshape(-1, dout)
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    if din <= dout:
        dk = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
    else:
        dk = jax.lax.dot_general(dy2, x2, (((0,), (0,)), ((), ()))).T
    return dx.astype(x.dtype), dk.astype(kernel.dtype), dy2.sum(0).astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def conv(
    din: int,
    dout: int,
    k: int,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    zero_init: bool = False,
):
    """torch Conv2d on NHWC. A conv whose kernel equals its stride (1x1 projections, patchify
    convs) becomes PatchConv, the same parameters computed as one matmul."""
    if k == stride and padding == 0 and groups == 1:
        return PatchConv(din, dout, k, rngs, zero_init)
    if groups == din == dout and stride == 1 and not zero_init:
        return DepthwiseConv(din, k, padding, rngs)
    # Explicit symmetric padding, as torch: 'SAME' would pad asymmetrically for strided convs.
    init = nnx.initializers.zeros if zero_init else torch_uniform(din // groups * k * k)
    return nnx.Conv(
        din,
        dout,
        (k, k),
        strides=(stride, stride),
        padding=[(padding, padding)] * 2,
        feature_group_count=groups,
        rngs=rngs,
        kernel_init=init,
        bias_init=init,
    )


class DepthwiseConv(nnx.Module):
    """torch Conv2d(dim, dim, k, padding=p, groups=dim) on NHWC, stride 1: nnx.Conv's parameters
    (kernel (k, k, 1, dim), bias) and values, computed by `depthwise_conv`."""

    def __init__(self, dim: int, k: int, padding: int, rngs: nnx.Rngs):
        self.padding = padding
        init = torch_uniform(k * k)
        self.kernel = nnx.Param(init(rngs.params(), (k, k, 1, dim)))
        self.bias = nnx.Param(init(rngs.params(), (dim,)))

    def __call__(self, x):
        y = depthwise_conv(x, self.kernel[...].astype(x.dtype), self.padding)
        return y + self.bias[...].astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x, kernel, padding: int):
    """Depthwise k x k convolution, stride 1: x [N, H, W, C], kernel [k, k, 1, C].

    Why not only XLA's grouped convolution: on a CPU, XLA computes it (and its input gradient)
    with a generic convolution loop, and its kernel gradient as a dense convolution over all
    channel pairs ([C, k, k, C], then the diagonal). There the three are written as what they are:
    y = sum over taps (a, b) of x_pad[:, a:a+H, b:b+W] * kernel[a, b] (one elementwise fusion,
    vectorised over C), dx the same with the flipped kernel over dy, and dk[a, b] = sum over n, h, w
    of x_pad[n, h+a, w+b] * dy[n, h, w], summed over h as elementwise adds of rows (XLA:CPU's
    reductions of such products run far slower than the adds). Elsewhere the library's convolution
    and its gradients."""
    return _depthwise_fwd(x, kernel, padding)[0]


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _depthwise(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _shifted_sum(x, kernel, padding):
    """sum over taps (a, b) of x_pad[:, a:a+H_out, b:b+W_out, :] * kernel[a, b, 0, :], accumulated in
    float32."""
    k = kernel.shape[0]
    h, w = x.shape[1] + 2 * padding - k + 1, x.shape[2] + 2 * padding - k + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kf = kernel.astype(jnp.float32)
    y = 0.0
    for a in range(k):
        for b in range(k):
            y = y + xp[:, a : a + h, b : b + w, :].astype(jnp.float32) * kf[a, b, 0]
    return y.astype(x.dtype)


def _depthwise_fwd(x, kernel, padding):
    y = _shifted_sum(x, kernel, padding) if _on_cpu() else _depthwise(x, kernel, padding)
    return y, (x, kernel)


def _depthwise_bwd(padding, res, dy):
    x, kernel = res
    if not _on_cpu():
        _, vjp = jax.vjp(lambda x_, k_: _depthwise(x_, k_, padding), x, kernel)
        return vjp(dy)
    k = kernel.shape[0]
    # dx[i, j] = sum over taps of dy[i + p - a, j + p - b] * kernel[a, b]: the flipped kernel over dy
    # padded by k - 1 - p
    dx = _shifted_sum(dy, kernel[::-1, ::-1], k - 1 - padding)
    h, w = dy.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))).astype(jnp.float32)
    dy32 = dy.astype(jnp.float32)

    def kernel_row(xa):
        """dk[a, :] before the sum over N and W, from xa = x_pad[:, a:a+H]: [k, N, W, C], the sum
        over h as adds of rows."""
        taps = []
        for b in range(k):
            rows = 0.0
            for i in range(h):
                rows = rows + xa[:, i, b : b + w, :] * dy32[:, i]
            taps.append(rows)
        return tuple(taps)

    # A loop over the kernel's rows (not unrolled): its body cannot fuse the ops that produce x
    # and dy, which XLA would otherwise recompute in every tap.
    shifted = jnp.stack([xp[:, a : a + h] for a in range(k)])
    dk = jnp.stack(jax.lax.map(kernel_row, shifted), 1).sum((2, 3)).reshape(k, k, 1, -1)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class PatchConv(nnx.Module):
    """torch Conv2d(kernel_size=k, stride=k, padding=0) on NHWC as reshape + one matmul.

    Non-overlapping k x k patches: out[n, i, j, o] = sum_{a,b,c} x[n, k*i+a, k*j+b, c] *
    kernel[a, b, c, o] + bias[o]; trailing rows/columns that do not fill a patch are dropped, as
    torch does. Same parameters as nnx.Conv (kernel (k, k, in, out), bias). Why: XLA:CPU ran the
    kernel gradient of the equivalent nnx.Conv as a convolution with a poor layout (a 1x1
    384 -> 256 conv on 8 x 32 x 32 tokens: 219 ms, against ~15 ms for the matmul)."""

    def __init__(self, din: int, dout: int, k: int, rngs: nnx.Rngs, zero_init: bool = False):
        init = nnx.initializers.zeros if zero_init else torch_uniform(din * k * k)
        self.k = k
        self.kernel = nnx.Param(init(rngs.params(), (k, k, din, dout), jnp.float32))
        self.bias = nnx.Param(init(rngs.params(), (dout,), jnp.float32))

    def __call__(self, x):
        n, h, w, c = x.shape
        k = self.k
        ho, wo = h // k, w // k
        if k == 1:
            y = jnp.einsum("nhwc,co->nhwo", x, self.kernel[0, 0].astype(x.dtype))
        else:
            x = x[:, : ho * k, : wo * k].reshape(n, ho, k, wo, k, c)
            y = jnp.einsum("nhawbc,abco->nhwo", x, self.kernel[...].astype(x.dtype))
        return y + self.bias[...].astype(x.dtype)


class ConvTranspose2x2(nnx.Module):
    """torch ConvTranspose2d(kernel_size=2, stride=2) on NHWC, written as one matmul + reshape.

    With kernel = stride the output pixels (2i+a, 2j+b) come from input pixel (i, j) alone:
    out[n, 2i+a, 2j+b, o] = sum_c x[n, i, j, c] * kernel[a, b, o, c] + bias[o]. XLA:CPU computes
    the kernel gradient of the equivalent nnx.ConvTranspose as a dilated convolution: 1.35 s of a
    1.7 s SAM 2 decoder training step (512 px, batch 8); as a matmul it is a few ms.
    Parameters are nnx.ConvTranspose's (kernel (2, 2, out, in) = torch W(in, out, 2, 2)
    .transpose(2, 3, 1, 0), bias), so checkpoints and the weight map are unchanged."""

    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        init = torch_uniform(dout * 2 * 2)  # torch takes a ConvTranspose2d's fan-in from W(in, out, k, k)'s dim 1
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, dout, din), jnp.float32))
        self.bias = nnx.Param(init(rngs.params(), (dout,), jnp.float32))

    def __call__(self, x):
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,aboc->nhawbo", x, self.kernel[...].astype(x.dtype))
        return y.reshape(n, 2 * h, 2 * w, -1) + self.bias[...].astype(x.dtype)


def conv_transpose2x2(din: int, dout: int, rngs: nnx.Rngs) -> ConvTranspose2x2:
    return ConvTranspose2x2(din, dout, rngs)


class MLP(nnx.Module):
    """sam2_utils.MLP: `num_layers` linears with an activation between them (ReLU by default)."""

    def __init__(
        self,
        din: int,
        hidden: int,
        dout: int,
        num_layers: int,
        rngs: nnx.Rngs,
        activation: Callable = jax.nn.relu,
        sigmoid_output: bool = False,
    ):
        dims = [din] + [hidden] * (num_layers - 1) + [dout]
        self.layers = nnx.List([linear(a, b, rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.activation = activation
        self.sigmoid_output = sigmoid_output

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75):
    """Row-stochastic (n_out, n_in) matrix of torch's bicubic upsampling (align_corners=False).

    torch uses Keys' cubic with A=-0.75 and clamps indices at the border; jax.image.resize('cubic')
    uses A=-0.5, which differs by up to 0.34 on SAM 2's pos-embed. Built in numpy at trace time."""
    import numpy as np

    def cubic(t):
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return (((t - 5) * t + 8) * t - 4) * a
        return 0.0

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        i0 = int(np.floor(src))
        frac = src - i0
        for k in range(-1, 3):
            idx = min(max(i0 + k, 0), n_in - 1)
            m[o, idx] += cubic(k - frac)
    return m.astype(np.float32)


def resize_bicubic_nchw(x, hw: tuple[int, int]):
    """torch F.interpolate(x, size=hw, mode='bicubic') for a (N, C, h, w) array."""
    mh = jnp.asarray(bicubic_matrix(x.shape[2], hw[0]))
    mw = jnp.asarray(bicubic_matrix(x.shape[3], hw[1]))
    return jnp.einsum("oh,nchw,pw->ncop", mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def _linear_taps(n_in: int, n_out: int):
    """Source indices and weights of torch's bilinear resize along one axis (align_corners=False,
    no antialias): src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0, two taps."""
    import numpy as np

    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w


def resize_bilinear_last2(x, hw: tuple[int, int]):
    """torch F.interpolate(x, hw, mode='bilinear', align_corners=False) over the last two axes.

    An axis upsampled by a power-of-two factor takes two gathers and a lerp (equal to torch within
    1e-6), without jax.image.resize's dense resampling matmul: SAM 2's mask post-processing
    upsamples 256^2 logits to the image size for every prompt (8 ms at 1024^2 on CPU, against 20 ms
    for jax.image.resize).
    Other ratios go through jax.image.resize, which matches torch to 5e-7 there; the two-tap form
    differs by up to 4e-5 where 1/factor is inexact in float (torch's rounding of the source index)."""
    for axis, n_out in ((x.ndim - 2, hw[0]), (x.ndim - 1, hw[1])):
        n_in = x.shape[axis]
        factor = n_out // n_in
        if n_out % n_in or factor & (factor - 1):  # not a power-of-two factor
            x = jax.image.resize(x, x.shape[:axis] + (n_out,) + x.shape[axis + 1 :], "linear", antialias=False)
            continue
        i0, i1, w = _linear_taps(n_in, n_out)
        shape = [1] * x.ndim
        shape[axis] = n_out
        w = jnp.asarray(w).reshape(shape)
        x = jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w
    return x
