"""Training-step benchmark: the JAX SafeClick train step against the PyTorch reference decoder's
step (convert/safeclick_torch.py) on the same batch, plus the embedding cache's speed-up.

    python benchmarks/bench_train.py [--model sam2.1_hiera_t] [--image-size 128] [--batch 8] [--steps 10]
                                     [--dtype float32|bfloat16] [--no-encoder-step] [--rounds 1]

Both sides train the same parts (SafeClick head + SAM 2 mask decoder; encoder, prompt encoder and
conv_s0/s1 frozen) with the same loss (SAM 2's focal 20 + dice 1 + IoU MSE 1 + object BCE 1, masks
upsampled to the input size) and AdamW with global-norm clipping, on one batch of frozen-encoder
features computed once (what the embedding cache provides). The weights are random on both sides
(speed does not depend on their values). "jax, encoder in the step" runs the frozen encoder
inside every step (training without the cache). Each side runs in its own process, so the peak
RSS (resource.getrusage) is its own. On a GPU both sides run on it (torch: `--torch-device`,
default cuda when available) and device memory is reported: `step_mb`, what XLA's compiled step
needs (memory_analysis: arguments + outputs + temporaries - donated aliases; weights, optimizer
state, batch and activations), `device_peak_mb`, the allocator's peak over the whole process (for
JAX it includes the encoder pass that made the features; for torch it is
torch.cuda.max_memory_allocated over the timed steps, weights included). `--dtype bfloat16`: JAX with
train.compute_dtype = bfloat16 (float32 master weights), torch under autocast(bfloat16). Writes
benchmarks/results/train_<size>px[_<model>][_<dtype>].{json,md} ($BENCH_RESULTS overrides the folder).
Both sides run with glibc's huge-page malloc, as train.py (`safeclick_jax/host_memory.py`;
SAFECLICK_SYSTEM_MALLOC=1: glibc's defaults).
`--rounds N` runs N processes per side alternately (a b b a ...) and reports each side's median.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _progress(msg):
    print(f"[bench_train] {msg}", file=sys.stderr, flush=True)


def _batch(image_size: int, batch: int, seed: int = 0):
    """A synthetic batch: normalised images, masks (a disc per row), half clicks, half boxes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    s = image_size
    yy, xx = np.mgrid[:s, :s]
    masks, pts, boxes = [], [], []
    for _ in range(batch):
        cx, cy, r = rng.uniform(0.3 * s, 0.7 * s), rng.uniform(0.3 * s, 0.7 * s), rng.uniform(0.08 * s, 0.2 * s)
        masks.append(((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).astype(np.uint8))
        pts.append([[cx, cy]])
        boxes.append([cx - r, cy - r, cx + r, cy + r])
    images = rng.normal(0, 1, (batch, s, s, 3)).astype(np.float32)
    prompt_type = (np.arange(batch) % 2).astype(np.int32)
    return {
        "image": images,
        "mask": np.stack(masks),
        "point_coords": np.asarray(pts, np.float32),
        "box": np.asarray(boxes, np.float32),
        "prompt_type": prompt_type,
    }


def run_jax(args) -> dict:
    import jax
    import numpy as np

    from configs import common
    from safeclick_jax import compile_cache, parallel
    from safeclick_jax.models.sam2 import encode_image
    from safeclick_jax.training import model_init
    from safeclick_jax.training import step as step_lib
    from safeclick_jax.training import train_state as ts

    config = common.make(args.model)
    compile_cache.enable(config.compilation_cache_dir)
    config.data.image_size = args.image_size
    config.data.batch_size = args.batch
    config.train.compute_dtype = args.dtype
    mesh = parallel.make_mesh()
    model = model_init.build_model(config, args.image_size, log=lambda *a: None)
    keep = model.keep_block
    raw = _batch(args.image_size, args.batch)
    graphdef, params, frozen = ts.split_model(model, config)
    encode = lambda m, x: encode_image(m, x, keep_block=keep)
    if args.features == "encoder":
        feats = jax.jit(encode)(model, raw["image"])
    else:  # same shapes, random values: the step's speed does not depend on them (no encoder compile)
        rng = np.random.default_rng(0)
        feats = jax.tree.map(lambda a: rng.normal(size=a.shape), jax.eval_shape(encode, model, raw["image"]))
    cached = {
        "feat_image_embed": feats["image_embed"],
        "feat_high_res_0": feats["high_res_feats"][0],
        "feat_high_res_1": feats["high_res_feats"][1],
        "feat_block": feats["block"],
    }
    cached = {k: np.asarray(v).astype(np.float16) for k, v in cached.items()}
    _progress(f"model built, features ready ({args.features})")
    hb = step_lib.host_batch({**raw}, cache=None)
    rows = []
    variants = [("jax (cached features)", cached)] + ([("jax, encoder in the step", None)] if args.encoder_step else [])
    for name, extra in variants:
        b = dict(hb)
        if extra is not None:
            b.pop("image")
            b.update(extra)
        schedule = ts.learning_rate(config, 1000)
        opt = ts.make_optimizer(config, 1000)
        rep = parallel.replicated(mesh)
        fresh = jax.tree.map(lambda x: x.copy(), params)  # the step donates (deletes) its state
        state = jax.device_put(ts.init_state(fresh, opt, 0), rep)
        fz = jax.device_put(frozen, rep)
        fn = step_lib.make_train_step(graphdef, opt, schedule, config, mesh, keep)
        gb = parallel.global_batch(b, mesh)
        t0 = time.perf_counter()
        fn = fn.lower(state, fz, gb).compile()
        ma = fn.memory_analysis()
        step_mb = (
            None
            if ma is None
            else (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
            / 2**20
        )
        state, m = fn(state, fz, gb)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        _progress(f"{name}: compiled + first step in {first:.1f} s")
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = fn(state, fz, gb)
        jax.block_until_ready(m)
        sec = (time.perf_counter() - t0) / args.steps
        mem = jax.devices()[0].memory_stats() or {}
        rows.append(
            {
                "impl": f"{name} {args.dtype}",
                "compile_s": first,
                "step_s": sec,
                "steps_per_s": 1 / sec,
                "images_per_s": args.batch / sec,
                "loss": float(m["loss"]),
                "step_mb": step_mb,
                "device_peak_mb": mem.get("peak_bytes_in_use", 0) / 2**20 or None,
            }
        )
        _progress(f"{name}: {sec * 1e3:.1f} ms/step")
    for r in rows:
        r["peak_rss_mb"] = _rss_mb()
    return {"rows": rows}


def run_torch(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from convert.safeclick_torch import build_safeclick_torch
    from safeclick_jax import prompting
    from safeclick_jax.models.safeclick import SafeClickConfig

    torch.set_num_threads(os.cpu_count() or 1)
    dev = torch.device(args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    model, cfg = build_safeclick_torch(args.model, SafeClickConfig(), image_size=args.image_size)
    model = model.to(dev)
    raw = _batch(args.image_size, args.batch)
    store = {}
    h = model.image_encoder.trunk.blocks[model.keep_block].register_forward_hook(
        lambda m, i, o: store.__setitem__("block", o)
    )
    with torch.no_grad():
        images = torch.from_numpy(raw["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
        out = model.forward_image(images)
        _, vision_feats, _, sizes = model._prepare_backbone_features(out)
        e = args.image_size // 16
        embed = (vision_feats[-1] + model.no_mem_embed).permute(1, 2, 0).reshape(args.batch, -1, e, e)
        hr = [f.permute(1, 2, 0).reshape(args.batch, -1, *s) for f, s in zip(vision_feats[:-1], sizes[:-1])]
        block = store["block"].permute(0, 3, 1, 2).contiguous()
    h.remove()
    is_box = raw["prompt_type"] == 1
    coords, labels = prompting.click_or_box_tokens(raw["point_coords"], raw["box"], is_box)
    labels = np.where(labels == -2, -1, labels)  # torch has no padding label: an extra pad point
    coords, labels = torch.from_numpy(coords).to(dev), torch.from_numpy(labels).to(dev)
    target = torch.from_numpy(raw["mask"]).float()[:, None].to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    frozen = (
        "image_encoder",
        "sam_prompt_encoder",
        "no_mem_embed",
        "sam_mask_decoder.conv_s0",
        "sam_mask_decoder.conv_s1",
    )
    params = [p for n, p in model.named_parameters() if not n.startswith(frozen)]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    model.train()

    def step():
        with amp:
            refined = model.safeclick.image_features(block, embed)
            masks, iou, _, obj = model.decode(embed, hr, refined, coords, labels, None, True)
        masks, iou, obj = masks.float(), iou.float(), obj.float()  # loss in float32 (as the JAX step)
        up = F.interpolate(masks, (args.image_size, args.image_size), mode="bilinear", align_corners=False)
        t = target.expand_as(up)
        prob = up.sigmoid()
        ce = F.binary_cross_entropy_with_logits(up, t, reduction="none")
        p_t = prob * t + (1 - prob) * (1 - t)
        focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).flatten(2).mean(-1)
        dice = 1 - (2 * (prob * t).flatten(2).sum(-1) + 1) / (prob.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
        best = (20 * focal + dice).argmin(-1)
        ar = torch.arange(len(best))
        with torch.no_grad():
            pm, gm = up > 0, t > 0
            actual = (pm & gm).flatten(2).sum(-1).float() / (pm | gm).flatten(2).sum(-1).float().clamp(min=1)
        loss = (
            20 * focal[ar, best].mean()
            + dice[ar, best].mean()
            + ((iou - actual) ** 2).mean()
            + F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _progress("torch: model and features ready")
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    sec = (time.perf_counter() - t0) / args.steps
    loss = float(loss)
    where = torch.cuda.get_device_name(dev) if cuda else f"{torch.get_num_threads()} threads"
    return {
        "rows": [
            {
                "impl": f"torch {torch.__version__} ({where}) {args.dtype}",
                "compile_s": first,
                "step_s": sec,
                "steps_per_s": 1 / sec,
                "images_per_s": args.batch / sec,
                "loss": loss,
                "peak_rss_mb": _rss_mb(),
                "device_peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
            }
        ]
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--which", choices=("all", "jax", "torch"), default="all")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--no-encoder-step", dest="encoder_step", action="store_false", help="skip the 'encoder in the step' row"
    )
    p.add_argument("--torch-device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="processes per side, run alternately (a b b a ...); rows are the median rounds",
    )
    p.add_argument(
        "--features",
        choices=("encoder", "random"),
        default="encoder",
        help="JAX's cached features: from the encoder, or random of the same shapes (no encoder compile)",
    )
    args = p.parse_args()
    if args.which != "all":
        res = run_jax(args) if args.which == "jax" else run_torch(args)
        print("RESULT " + json.dumps(res))
        return
    # One process per side and round, in the order a b b a a b ...: the machine's speed drifts by
    # 10-20 % over minutes, and alternating cancels most of it. Each impl's row is its median round.
    runs, errors = {}, []
    for r in range(args.rounds):
        for which in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
            if r > 0 and which == "jax":
                args_enc = ["--no-encoder-step"]  # the cache-less row is measured in round 1 only
            else:
                args_enc = [] if args.encoder_step else ["--no-encoder-step"]
            cmd = [
                sys.executable,
                __file__,
                "--which",
                which,
                "--model",
                args.model,
                "--image-size",
                str(args.image_size),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--dtype",
                args.dtype,
            ]
            cmd += (
                ["--features", args.features]
                + args_enc
                + (["--torch-device", args.torch_device] if args.torch_device else [])
            )
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # stderr: progress, live
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(out.stdout[-2000:], file=sys.stderr)
                errors.append({"impl": which, "error": f"exit {out.returncode}"})
                continue
            for row in json.loads(line[0][7:])["rows"]:
                runs.setdefault(row["impl"], []).append(row)
    rows = []
    for impl, rs in runs.items():
        rs = sorted(rs, key=lambda x: x["step_s"])
        row = dict(rs[(len(rs) - 1) // 2])
        row["round_step_s"] = [x["step_s"] for x in rs]
        rows.append(row)
    rows += errors
    by = {
        r["impl"].split(" ")[0].rstrip(",") + (" enc" if "encoder" in r["impl"] else ""): r
        for r in rows
        if "step_s" in r
    }
    meta = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "dtype": args.dtype,
        "attention": os.environ.get("SAFECLICK_ATTENTION", "auto"),
        "attention_max_scores": os.environ.get("SAFECLICK_ATTENTION_MAX_SCORES"),
    }
    if "jax" in by and "torch" in by:
        meta["jax_vs_torch_speedup"] = by["torch"]["step_s"] / by["jax"]["step_s"]
    if "jax" in by and "jax enc" in by:
        meta["embedding_cache_speedup"] = by["jax enc"]["step_s"] / by["jax"]["step_s"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write

    name = (
        f"train_{args.image_size}px"
        + ("" if args.model == "sam2.1_hiera_t" else "_" + args.model)
        + ("" if args.dtype == "float32" else "_" + args.dtype)
        + ("" if os.environ.get("SAFECLICK_ATTENTION", "auto") == "auto" else "_" + os.environ["SAFECLICK_ATTENTION"])
    )
    write(
        name,
        rows,
        [
            "impl",
            "steps_per_s",
            "images_per_s",
            "step_s",
            "compile_s",
            "peak_rss_mb",
            "step_mb",
            "device_peak_mb",
            "loss",
        ],
        meta,
    )
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
