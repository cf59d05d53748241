"""SafeClick vs the plain SAM 2 decoder in JAX, and JAX vs the PyTorch reference, same machine, one run.

    python benchmarks/bench_safeclick.py [--model sam2.1_hiera_t] [--image-size 1024] \
        [--train-image-size 512 --train-batch 8]
                                         [--dtype float32|bfloat16] [--torch-device cpu|cuda] [--name safeclick]

1. Overhead of SafeClick over SAM 2 in JAX (`--model`, default tiny; batch 1): per prompt (decode from cached image
   features) and end to end (encode + decode one click). The paper reports +18 % inference time.
2. SafeClick's image-level head (batch 1, `--image-size`), the decoder forward and one AdamW
   training step, JAX vs the torch reference (convert/safeclick_torch.py)
   on the same batch of frozen-encoder features (trainable: SafeClick head + mask decoder).
Part 1 also times SafeClick's image-level head alone (`head_ms`: F_transform, E1, E2, CRL refine) and
gives `e2e_from_parts` = 1 + (head + extra decode time) / SAM 2's end-to-end time, steadier than
the direct end-to-end ratio when the encoder is large and the machine drifts.
`--dtype bfloat16` runs part 1 with bf16 weights and activations (serving on a GPU); part 2 is float32.
torch runs on cuda when available (`--torch-device`). Writes benchmarks/results/<name>.{json,md}
($BENCH_RESULTS overrides the folder).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import ratio, time_interleaved, write  # noqa: E402
from convert.safeclick_torch import build_safeclick_torch  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402
from safeclick_jax.models.safeclick import SafeClickConfig, SafeClickModel, trainable_filter  # noqa: E402
from safeclick_jax.models.sam2 import SAM2Image, encode_image  # noqa: E402
from safeclick_jax.models.weight_map import load_state_dict  # noqa: E402

PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed", "safeclick.")


def prompt(b):
    coords = np.zeros((b, 8, 2), np.float32)
    coords[:, 0] = [300.0, 400.0]
    labels = np.full((b, 8), -2, np.int32)
    labels[:, 0], labels[:, 1] = 1, -1
    return jnp.asarray(coords), jnp.asarray(labels)


def overhead_rows(size, repeats, dtype="float32", model_name="sam2.1_hiera_t"):
    cfg = get_config(model_name).replace(image_size=size)
    base = SAM2Image(cfg, nnx.Rngs(0))
    sc = SafeClickModel(cfg, SafeClickConfig(), nnx.Rngs(0))
    img = jnp.asarray(np.random.default_rng(0).normal(size=(1, size, size, 3)), dtype)
    coords, labels = prompt(1)
    m = 4 * cfg.embedding_size
    mask, has = jnp.zeros((1, m, m, 1)), jnp.zeros((1,), bool)
    rows = []
    dec_fns, e2e_fns = {}, {}
    for name, model in [("sam2", base), ("safeclick", sc)]:
        g, st = nnx.split(model)
        st = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
        enc = jax.jit(lambda st, x, g=g: nnx.merge(g, st).encode_image(x))
        dec = jax.jit(lambda st, f, g=g: nnx.merge(g, st).decode(f, coords, labels, mask, has, True)[0])
        feats = jax.block_until_ready(enc(st, img))
        dec_fns[name] = lambda dec=dec, st=st, feats=feats: jax.block_until_ready(dec(st, feats))
        e2e_fns[name] = lambda dec=dec, enc=enc, st=st: jax.block_until_ready(dec(st, enc(st, img)))
    # SafeClick's image-level work alone (F_transform, E1, E2, the CRL's channel attention: once per
    # image, whatever the number of clicks). The end-to-end ratio of a large encoder drifts by more
    # than this share between rounds, so the row also gives 1 + (head + extra decode) / SAM 2's time.
    g, st = nnx.split(sc)
    head = jax.jit(lambda st, blk, emb: nnx.merge(g, st).safeclick.image_features(blk, emb))
    f = jax.jit(lambda st, x: encode_image(nnx.merge(g, st), x, keep_block=sc.keep_block))(st, img)
    f = {k: f[k].astype(dtype) for k in ("block", "image_embed")}
    st = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
    head_fn = {"head": lambda: jax.block_until_ready(head(st, f["block"], f["image_embed"]))}
    res = {
        "decode": time_interleaved(dec_fns, repeats * 6, warmup=3),
        "e2e": time_interleaved(e2e_fns, repeats),
        "head": time_interleaved(head_fn, repeats * 2, warmup=2),
    }
    for stage in ("decode", "e2e"):
        a, b = res[stage]["sam2"], res[stage]["safeclick"]
        what = "per prompt (cached image features)" if stage == "decode" else "end to end (encode + 1 click)"
        rows.append(
            {
                "measure": f"JAX {what}, {model_name}, {size} px, {dtype}",
                "sam2_ms": a["median_s"] * 1e3,
                "safeclick_ms": b["median_s"] * 1e3,
                "safeclick/sam2": ratio(b, a),
                "sam2_round_ms": [t * 1e3 for t in a["round_s"]],
                "safeclick_round_ms": [t * 1e3 for t in b["round_s"]],
            }
        )
    h = res["head"]["head"]["median_s"]
    extra = h + res["decode"]["safeclick"]["median_s"] - res["decode"]["sam2"]["median_s"]
    rows[-1].update(head_ms=h * 1e3, e2e_from_parts=1 + extra / res["e2e"]["sam2"]["median_s"])
    return rows


def paired_models(size, device):
    """The torch reference (tiny) and the JAX SafeClick model with the same weights, on device."""
    sc_cfg = SafeClickConfig()
    tmodel, cfg = build_safeclick_torch("sam2.1_hiera_t", sc_cfg, image_size=size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fmodel = nnx.eval_shape(lambda: SafeClickModel(cfg, sc_cfg, nnx.Rngs(0)))
    load_state_dict(fmodel, {k: v.detach().numpy() for k, v in tmodel.state_dict().items() if k.startswith(PREFIXES)})
    nnx.update(fmodel, jax.device_put(nnx.state(fmodel)))  # device arrays, not per-call numpy copies
    return tmodel, fmodel, cfg, dev, sync


def head_vs_torch_row(size, repeats, device):
    """SafeClick's image-level head alone (F_transform, E1, E2, CRL refine; batch 1), JAX vs the
    torch reference on the same weights and features: what SafeClick adds per image."""
    tmodel, fmodel, cfg, dev, sync = paired_models(size, device)
    g, st = nnx.split(fmodel)
    e = cfg.embedding_size
    rng = np.random.default_rng(0)
    blk = rng.normal(size=(1, e, e, 384)).astype(np.float32)
    emb = rng.normal(size=(1, e, e, 256)).astype(np.float32)
    head = jax.jit(lambda st, b, x: nnx.merge(g, st).safeclick.image_features(b, x))
    jb, je = jnp.asarray(blk), jnp.asarray(emb)
    tmodel = tmodel.to(dev)
    tb, te = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(dev) for a in (blk, emb))

    def t_head():
        with torch.no_grad():
            tmodel.safeclick.image_features(tb, te)
        sync()

    r = time_interleaved(
        {"jax": lambda: jax.block_until_ready(head(st, jb, je)), "torch": t_head}, repeats * 2, warmup=2
    )
    j, t = r["jax"], r["torch"]
    return {
        "measure": f"SafeClick image-level head (F_transform, E1, E2, CRL), batch 1, {size} px",
        "jax_ms": j["median_s"] * 1e3,
        "torch_ms": t["median_s"] * 1e3,
        "torch/jax speed-up": ratio(t, j),
        "jax_compile_s": j["first_s"] - j["median_s"],
    }


def torch_vs_jax_rows(size, batch, repeats, device):
    tmodel, fmodel, cfg, dev, sync = paired_models(size, device)
    e = cfg.embedding_size
    rng = np.random.default_rng(0)
    x = {
        "image_embed": rng.normal(size=(batch, e, e, 256)),
        "s0": rng.normal(size=(batch, 4 * e, 4 * e, 32)),
        "s1": rng.normal(size=(batch, 2 * e, 2 * e, 64)),
        "block": rng.normal(size=(batch, e, e, 384)),
        "target": (rng.random((batch, 4 * e, 4 * e)) > 0.5),
    }
    x = {k: v.astype(np.float32) for k, v in x.items()}
    coords, labels = prompt(batch)
    m = 4 * e
    mask, has = jnp.zeros((batch, m, m, 1)), jnp.zeros((batch,), bool)

    # --- JAX
    is_trainable = trainable_filter()
    graphdef, params, rest = nnx.split(fmodel, is_trainable, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    feats = {
        "image_embed": jnp.asarray(x["image_embed"]),
        "high_res_feats": (jnp.asarray(x["s0"]), jnp.asarray(x["s1"])),
    }
    block, target = jnp.asarray(x["block"]), jnp.asarray(x["target"], jnp.float32)

    def forward(params):
        model = nnx.merge(graphdef, params, rest)
        f = dict(feats, refined=model.safeclick.image_features(block, feats["image_embed"]))
        return model.decode(f, coords, labels, mask, has, False, dynamic_multimask=False)

    def loss_fn(params):
        logits, iou, _, _ = forward(params)
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], target).mean() + jnp.mean(iou**2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fwd = jax.jit(lambda p: forward(p)[0])
    state = {"p": params, "o": opt_state}

    def jax_step():
        state["p"], state["o"], loss = step(state["p"], state["o"])
        jax.block_until_ready(loss)

    # --- torch (same batch; one decode call for the whole batch)
    tmodel = tmodel.to(dev)
    tt = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy()).to(dev) for k, v in x.items() if k != "target"}
    ttarget = torch.from_numpy(x["target"].astype(np.float32)).to(dev)
    tc = torch.from_numpy(np.asarray(coords)[:, :1].copy()).to(dev)
    tl = torch.from_numpy(np.asarray(labels)[:, :1].copy()).to(dev)
    trainable = [
        p
        for k, p in tmodel.named_parameters()
        if k.startswith(("safeclick.", "sam_mask_decoder.")) and ".conv_s" not in k
    ]
    for k, p in tmodel.named_parameters():
        p.requires_grad_(k.startswith(("safeclick.", "sam_mask_decoder.")) and ".conv_s" not in k)
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def t_forward():
        refined = tmodel.safeclick.image_features(tt["block"], tt["image_embed"])
        return tmodel.decode(tt["image_embed"], (tt["s0"], tt["s1"]), refined, tc, tl, None, False)

    def t_fwd():
        with torch.no_grad():
            t_forward()
        sync()

    def t_step():
        tmodel.train()
        opt.zero_grad()
        logits, iou, _, _ = t_forward()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], ttarget) + (iou**2).mean()
        loss.backward()
        opt.step()
        sync()

    r = time_interleaved({"jax": lambda: jax.block_until_ready(fwd(params)), "torch": t_fwd}, repeats, warmup=2)
    jf, tf = r["jax"], r["torch"]
    r = time_interleaved({"jax": jax_step, "torch": t_step}, repeats, warmup=2)
    js, ts = r["jax"], r["torch"]
    return [
        {
            "measure": f"decoder forward, batch {batch}, {size} px",
            "jax_ms": jf["median_s"] * 1e3,
            "torch_ms": tf["median_s"] * 1e3,
            "torch/jax speed-up": ratio(tf, jf),
            "jax_compile_s": jf["first_s"] - jf["median_s"],
        },
        {
            "measure": f"training step (fwd+bwd+AdamW), batch {batch}, {size} px",
            "jax_ms": js["median_s"] * 1e3,
            "torch_ms": ts["median_s"] * 1e3,
            "torch/jax speed-up": ratio(ts, js),
            "jax_compile_s": js["first_s"] - js["median_s"],
            "jax_images_per_s": batch / js["median_s"],
            "torch_images_per_s": batch / ts["median_s"],
        },
    ]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sam2.1_hiera_t", help="base model of the overhead rows (part 1)")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--train-image-size", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--torch-device", default=None)
    p.add_argument("--name", default="safeclick")
    a = p.parse_args()
    rows = overhead_rows(a.image_size, a.repeats, a.dtype, a.model) if a.image_size else []
    rows2 = [head_vs_torch_row(a.image_size, a.repeats, a.torch_device)] if a.image_size and a.train_batch else []
    rows2 += torch_vs_jax_rows(a.train_image_size, a.train_batch, a.repeats, a.torch_device) if a.train_batch else []
    cols = [
        "measure",
        "sam2_ms",
        "safeclick_ms",
        "safeclick/sam2",
        "head_ms",
        "e2e_from_parts",
        "jax_ms",
        "torch_ms",
        "torch/jax speed-up",
        "jax_images_per_s",
        "torch_images_per_s",
        "jax_compile_s",
    ]
    write(a.name, rows + rows2, cols, vars(a))


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
