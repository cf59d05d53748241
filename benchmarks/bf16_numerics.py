"""Numerics of reduced-precision inference: SafeClick (tiny, 1024 px, random weights) encode +
decode of 8 prompts (4 clicks, 4 boxes) in float32 at full matmul precision (the reference),
float32 at the backend's default matmul precision (TF32 on NVIDIA GPUs), and bf16 weights and
activations. Reports, per variant: relative L2 error and max-abs error of the mask logits and the
IoU predictions, and the IoU between the binarised masks (logit > 0) and the reference's. On a
CPU also float32 with every dot's operands rounded to bf16 (what bf16 dots on AMX compute, by any
route), and float32 with XLA:CPU's dots in oneDNN (`--xla_cpu_use_onednn=true
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


def with_bf16_dots(fn):
    """fn with the operands of every float32 dot rounded to bf16 and the products accumulated in
    float32, everything else as it was: what oneDNN computes for fp32 dots under BF16 fpmath (on AMX
    where the CPU has it), whatever the route. A small interpreter of fn's jaxpr: XLA:CPU ignores
    matmul precision, so there is no flag for this. Forward only (custom derivatives are dropped)."""
    from jax.extend import core as jcore

    def retrace(cj):
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in cj.jaxpr.invars]
        return jax.make_jaxpr(lambda *a: evaluate(cj.jaxpr, cj.consts, a))(*avals)

    def param(v):  # loop bodies, branches, nested jits: the same rewrite inside
        if isinstance(v, jcore.ClosedJaxpr):
            return retrace(v)
        if isinstance(v, tuple) and v and all(isinstance(x, jcore.ClosedJaxpr) for x in v):
            return tuple(retrace(x) for x in v)
        return v

    def evaluate(jaxpr, consts, args):
        env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name == "dot_general" and all(x.dtype == jnp.float32 for x in ins):
                bf = [x.astype(jnp.bfloat16) for x in ins]
                outs = jax.lax.dot_general(*bf, eqn.params["dimension_numbers"], preferred_element_type=jnp.float32)
            elif name.startswith("custom_"):  # custom_jvp_call / custom_vjp_call: the function itself
                cj = next(eqn.params[k] for k in ("call_jaxpr", "fun_jaxpr") if k in eqn.params)
                outs = evaluate(cj.jaxpr, cj.consts, ins)
            else:
                outs = eqn.primitive.bind(
                    *ins, **eqn.primitive.get_bind_params({k: param(v) for k, v in eqn.params.items()})
                )
            env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
        return [read(v) for v in jaxpr.outvars]

    def wrapped(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        return jax.tree.unflatten(
            jax.tree.structure(shapes), evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        )

    return wrapped


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--name", default="bf16_numerics")
    p.add_argument(
        "--checkpoint", help="a model directory (e.g. workdir/standin/export): its masks on --cache's slices"
    )
    p.add_argument("--cache", default="data/cache/procedural", help="prepared slices for --checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--batches", type=int, default=8, help="batches of 8 prompts (one per slice) for --checkpoint")
    a = p.parse_args()
    if a.checkpoint:
        return trained_model(a)
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
        variants["float32, dots with bf16 operands (fp32 accumulation)"] = (st, jnp.asarray(img), "bf16 dots")
        fpmath = os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE", "STRICT")
        variants[f"float32, dots in oneDNN, fpmath {fpmath}"] = (st, jnp.asarray(img), ONEDNN_DOTS)
    rows = []
    for name, (s, x, options) in variants.items():
        fn = jax.jit(with_bf16_dots(run) if options == "bf16 dots" else run)
        options = None if options == "bf16 dots" else options
        out = jax.device_get(fn.lower(s, x).compile(compiler_options=options)(s, x))
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


def trained_model(a) -> None:
    """--checkpoint: a trained model on prepared slices, one click or box per slice (the evaluation's
    prompts), float32 against its variants: the IoU of each binarised mask with float32's and the
    Dice of each with the ground truth (both at the decoder's mask resolution)."""
    from safeclick_jax.data.pipeline import make_eval_dataset
    from safeclick_jax.inference.loader import load_model

    loaded = load_model(a.checkpoint, image_size=a.image_size)
    g, st = nnx.split(loaded.network)
    ds = make_eval_dataset(a.cache, a.split, image_size=a.image_size, batch_size=8)
    batches = [ds[i * len(ds) // a.batches] for i in range(min(a.batches, len(ds)))]  # spread over the split

    def run(st, image, coords, labels):
        model = nnx.merge(g, st)
        b, m = coords.shape[0], image.shape[1] // 4
        none = jnp.zeros((b, m, m, 1), image.dtype)
        logits = model.decode(model.encode_image(image), coords, labels, none, jnp.zeros((b,), bool), False)[0]
        return logits[:, 0].astype(jnp.float32)

    def inputs(batch):  # a click (label 1) or a box (corners labelled 2, 3), padded to 2 points
        box = batch["prompt_type"] == 1
        click = np.concatenate([batch["point_coords"], np.zeros_like(batch["point_coords"])], 1)
        coords = np.where(box[:, None, None], batch["box"].reshape(-1, 2, 2), click)
        labels = np.where(box[:, None], [[2, 3]], [[1, -2]]).astype(np.int32)
        return jnp.asarray(batch["image"]), jnp.asarray(coords, jnp.float32), jnp.asarray(labels)

    variants = {"float32": (st, jnp.float32, run)}
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
    variants["bfloat16 weights + activations"] = (bf, jnp.bfloat16, run)
    variants["float32, dots with bf16 operands (fp32 accumulation)"] = (st, jnp.float32, with_bf16_dots(run))
    masks = {name: [] for name in variants}
    truth, valid = [], []
    for batch in batches:
        image, coords, labels = inputs(batch)
        for name, (s, dtype, fn) in variants.items():
            masks[name].append(np.asarray(jax.jit(fn)(s, image.astype(dtype), coords, labels)) > 0)
        m = masks["float32"][-1].shape[-1]
        step = batch["mask"].shape[-1] // m
        truth.append(batch["mask"][:, ::step, ::step] > 0)
        valid.append(batch["valid"])
    valid, truth = np.concatenate(valid), np.concatenate(truth)[np.concatenate(valid)]
    ref = np.concatenate(masks["float32"])[valid]

    def overlap(x, y):
        inter, union, total = (x & y).sum((-2, -1)), (x | y).sum((-2, -1)), x.sum((-2, -1)) + y.sum((-2, -1))
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0), np.where(
            total > 0, 2 * inter / np.maximum(total, 1), 1.0
        )

    rows = []
    for name in variants:
        got = np.concatenate(masks[name])[valid]
        agree, _ = overlap(got, ref)
        _, dice = overlap(got, truth)
        row = {"variant": name, "prompts": len(got), "mask_iou_min": agree.min(), "mask_iou_mean": agree.mean()}
        rows.append({**row, "dice_gt_mean": dice.mean()})
        print(rows[-1], flush=True)
    cols = ["variant", "prompts", "mask_iou_min", "mask_iou_mean", "dice_gt_mean"]
    write(a.name, rows, cols, vars(a))


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
