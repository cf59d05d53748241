"""Numerics of reduced-precision inference: SafeClick (tiny, 1024 px, random weights) encode +
decode of 8 prompts (4 clicks, 4 boxes) in float32 at full matmul precision (the reference),
float32 at the backend's default matmul precision (TF32 on NVIDIA GPUs), and bf16 weights and
activations. Reports, per variant: relative L2 error and max-abs error of the mask logits and the
IoU predictions, and the IoU between the binarised masks (logit > 0) and the reference's. On a
CPU also float32 with XLA:CPU's dots in oneDNN (`--xla_cpu_use_onednn=true
--xla_cpu_experimental_onednn_fusion_type=dot` as compile options), whose precision follows
ONEDNN_DEFAULT_FPMATH_MODE: BF16 lets oneDNN compute the fp32 dots in bf16, on AMX where the CPU
has it (the reference's dots stay XLA's own).

    python benchmarks/bf16_numerics.py [--image-size 1024] [--name bf16_numerics]

    ONEDNN_DEFAULT_FPMATH_MODE=BF16 python benchmarks/bf16_numerics.py --name bf16_numerics_onednn

On a CPU the default matmul precision is already full fp32. Writes <name>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import ONEDNN_DOTS, write  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402
from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickModel  # noqa: E402


def prompts(size, n=8, seed=0):
    rng = np.random.default_rng(seed)
    coords = np.zeros((n, 8, 2), np.float32)
    labels = np.full((n, 8), -2, np.int32)
    for i in range(n):
        cx, cy = rng.uniform(0.25 * size, 0.75 * size, 2)
        if i % 2:  # a box: corners labelled 2, 3
            r = rng.uniform(0.05, 0.15) * size
            coords[i, :2] = [[cx - r, cy - r], [cx + r, cy + r]]
            labels[i, :2] = [2, 3]
        else:
            coords[i, 0] = [cx, cy]
            labels[i, 0] = 1
    return jnp.asarray(coords), jnp.asarray(labels)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--name", default="bf16_numerics")
    a = p.parse_args()
    cfg = get_config("sam2.1_hiera_t").replace(image_size=a.image_size)
    model = SafeClickModel(cfg, SafeClickConfig(), nnx.Rngs(0))
    g, st = nnx.split(model)
    # Perturb every weight (random init leaves zero biases, unit norms and a zero-initialised CRL
    # conv, which would hide their rounding).
    leaves, tdef = jax.tree.flatten(st)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        x + 0.02 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x, k in zip(leaves, keys)
    ]
    st = jax.tree.unflatten(tdef, leaves)
    img = np.random.default_rng(0).normal(size=(1, a.image_size, a.image_size, 3)).astype(np.float32)
    coords, labels = prompts(a.image_size)
    m = 4 * cfg.embedding_size
    n = coords.shape[0]
    mask, has = jnp.zeros((n, m, m, 1)), jnp.zeros((n,), bool)

    def run(st, x):
        model = nnx.merge(g, st)
        f = model.encode_image(x)
        logits, iou, _, _ = model.decode(f, coords, labels, mask.astype(x.dtype), has, True)
        return logits.astype(jnp.float32), iou.astype(jnp.float32)

    with jax.default_matmul_precision("highest"):
        ref = jax.device_get(jax.jit(run)(st, jnp.asarray(img)))
    variants = {"float32, default matmul precision": (st, jnp.asarray(img), None)}
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
    variants["bfloat16 weights + activations"] = (bf, jnp.asarray(img, jnp.bfloat16), None)
    if jax.default_backend() == "cpu":
        fpmath = os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "STRICT")
        variants[f"float32, dots in oneDNN, fpmath {fpmath}"] = (st, jnp.asarray(img), ONEDNN_DOTS)
    rows = []
    for name, (s, x, options) in variants.items():
        out = jax.device_get(jax.jit(run).lower(s, x).compile(compiler_options=options)(s, x))
        row = {"variant": name}
        for what, o, r in (("logits", out[0], ref[0]), ("iou", out[1], ref[1])):
            row[f"{what}_rel_l2"] = float(np.linalg.norm(o - r) / np.linalg.norm(r))
            row[f"{what}_max_abs"] = float(np.abs(o - r).max())
        mo, mr = out[0] > 0, ref[0] > 0
        inter, union = (mo & mr).sum((-2, -1)), (mo | mr).sum((-2, -1))
        agree = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        row["mask_iou_min"], row["mask_iou_mean"] = float(agree.min()), float(agree.mean())
        row["ref_logit_abs_mean"] = float(np.abs(ref[0]).mean())
        rows.append(row)
        print(row, flush=True)
    write(
        a.name,
        rows,
        [
            "variant",
            "logits_rel_l2",
            "logits_max_abs",
            "iou_rel_l2",
            "iou_max_abs",
            "mask_iou_min",
            "mask_iou_mean",
            "ref_logit_abs_mean",
        ],
        {**vars(a), "onednn_fpmath": os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "")},
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
