"""Training-step benchmark: the JAX SafeClick train step against the PyTorch reference decoder's
step (convert/safeclick_torch.py) on the same batch, plus the embedding cache's speed-up.

    python benchmarks/bench_train.py [--model sam2.1_hiera_t] [--image-size 128] [--batch 8] [--steps 10]

Both sides train the same parts (SafeClick head + SAM 2 mask decoder; encoder, prompt encoder and
conv_s0/s1 frozen) with the same loss (SAM 2's focal 20 + dice 1 + IoU MSE 1 + object BCE 1, masks
upsampled to the input size) and AdamW with global-norm clipping, on one batch of frozen-encoder
features computed once (what the embedding cache provides). The weights are random on both sides
(speed does not depend on their values). "jax, encoder in the step" runs the frozen encoder
inside every step (training without the cache). Each side runs in its own process, so the peak
RSS (resource.getrusage) is its own. Writes benchmarks/results/train_<size>px.{json,md}.
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
    return {"image": images, "mask": np.stack(masks), "point_coords": np.asarray(pts, np.float32),
            "box": np.asarray(boxes, np.float32), "prompt_type": prompt_type}


def run_jax(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from configs import common
    from safeclick_jax.models.sam2 import encode_image
    from safeclick_jax.training import loop, step as step_lib, train_state as ts

    config = common.make(args.model)
    loop.setup_compilation_cache(config.compilation_cache_dir)
    config.data.image_size = args.image_size
    config.data.batch_size = args.batch
    mesh = ts.make_mesh()
    model = ts.build_model(config, args.image_size, log=lambda *a: None)
    keep = model.keep_block
    raw = _batch(args.image_size, args.batch)
    graphdef, params, frozen = ts.split_model(model, config)
    feats = jax.jit(lambda m, x: encode_image(m, x, keep_block=keep))(model, raw["image"])
    cached = {"feat_image_embed": feats["image_embed"], "feat_high_res_0": feats["high_res_feats"][0],
              "feat_high_res_1": feats["high_res_feats"][1], "feat_block": feats["block"]}
    cached = {k: np.asarray(v).astype(np.float16) for k, v in cached.items()}
    hb = step_lib.host_batch({**raw}, cache=None)
    rows = []
    for name, extra in (("jax (cached features)", cached), ("jax, encoder in the step", None)):
        b = dict(hb)
        if extra is not None:
            b.pop("image")
            b.update(extra)
        schedule = ts.learning_rate(config, 1000)
        opt = ts.make_optimizer(config, 1000)
        rep = ts.replicated(mesh)
        fresh = jax.tree.map(lambda x: x.copy(), params)  # the step donates (deletes) its state
        state = jax.device_put(ts.init_state(fresh, opt, 0), rep)
        fz = jax.device_put(frozen, rep)
        fn = step_lib.make_train_step(graphdef, opt, schedule, config, mesh, keep)
        gb = ts.global_batch(b, mesh)
        t0 = time.perf_counter()
        state, m = fn(state, fz, gb)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = fn(state, fz, gb)
        jax.block_until_ready(m)
        sec = (time.perf_counter() - t0) / args.steps
        mem = jax.devices()[0].memory_stats() or {}
        rows.append({"impl": name, "compile_s": first, "step_s": sec, "steps_per_s": 1 / sec,
                     "images_per_s": args.batch / sec, "loss": float(m["loss"]),
                     "device_peak_mb": mem.get("peak_bytes_in_use", 0) / 2**20 or None})
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
    model, cfg = build_safeclick_torch(args.model, SafeClickConfig(), image_size=args.image_size)
    raw = _batch(args.image_size, args.batch)
    store = {}
    h = model.image_encoder.trunk.blocks[model.keep_block].register_forward_hook(
        lambda m, i, o: store.__setitem__("block", o))
    with torch.no_grad():
        images = torch.from_numpy(raw["image"]).permute(0, 3, 1, 2).contiguous()
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
    coords, labels = torch.from_numpy(coords), torch.from_numpy(labels)
    target = torch.from_numpy(raw["mask"]).float()[:, None]
    frozen = ("image_encoder", "sam_prompt_encoder", "no_mem_embed", "sam_mask_decoder.conv_s0",
              "sam_mask_decoder.conv_s1")
    params = [p for n, p in model.named_parameters() if not n.startswith(frozen)]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    model.train()

    def step():
        refined = model.safeclick.image_features(block, embed)
        masks, iou, _, obj = model.decode(embed, hr, refined, coords, labels, None, True)
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
        loss = (20 * focal[ar, best].mean() + dice[ar, best].mean() + ((iou - actual) ** 2).mean()
                + F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        return float(loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sec = (time.perf_counter() - t0) / args.steps
    return {"rows": [{"impl": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
                      "compile_s": first, "step_s": sec, "steps_per_s": 1 / sec,
                      "images_per_s": args.batch / sec, "loss": loss, "peak_rss_mb": _rss_mb(),
                      "device_peak_mb": None}]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--which", choices=("all", "jax", "torch"), default="all")
    args = p.parse_args()
    if args.which != "all":
        res = run_jax(args) if args.which == "jax" else run_torch(args)
        print("RESULT " + json.dumps(res))
        return
    rows = []
    for which in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--which", which, "--model", args.model, "--image-size",
               str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            rows.append({"impl": which, "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.extend(json.loads(line[0][7:])["rows"])
    by = {r["impl"].split(" ")[0].rstrip(",") + (" enc" if "encoder" in r["impl"] else ""): r
          for r in rows if "step_s" in r}
    meta = {"model": args.model, "image_size": args.image_size, "batch": args.batch, "steps": args.steps}
    if "jax" in by and "torch" in by:
        meta["jax_vs_torch_speedup"] = by["torch"]["step_s"] / by["jax"]["step_s"]
    if "jax" in by and "jax enc" in by:
        meta["embedding_cache_speedup"] = by["jax enc"]["step_s"] / by["jax"]["step_s"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import write
    write(f"train_{args.image_size}px", rows, ["impl", "steps_per_s", "images_per_s", "step_s", "compile_s", "peak_rss_mb",
                          "device_peak_mb", "loss"], meta)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
