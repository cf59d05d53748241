"""SAM 2 image path, JAX vs PyTorch eager, same machine, one run.

    python benchmarks/bench_sam2.py [--model sam2.1_hiera_t] [--repeats 5]

Image encoding (1024 px) and prompt decoding (one click, multimask), median of repeated runs after
warm-up, JAX and torch called in turn (the ratio is the median of per-round ratios); JAX compile
time (the first call) is reported separately. Random weights (speed does not
depend on them). Writes benchmarks/results/sam2_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import ratio, time_interleaved, write  # noqa: E402
from convert.sam2_to_flax import convert_state_dict  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402
from safeclick_jax.predictor import ImagePredictor  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-repeats", type=int, default=30)
    a = p.parse_args()

    from sam2.build_sam import build_sam2

    version = a.model.split("_hiera_")[0]
    tmodel = build_sam2(f"configs/{version}/{a.model}.yaml", ckpt_path=None, device="cpu").eval()
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    cfg = get_config(a.model)
    jmodel, _ = convert_state_dict(sd, cfg)
    pred = ImagePredictor(jmodel)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    x_t = torch.randn(1, 3, 1024, 1024)

    def jax_encode():
        pred.set_image(image)
        jax.block_until_ready(pred._features)

    @torch.no_grad()
    def torch_encode():
        out = tmodel.forward_image(x_t)
        _, feats, _, _ = tmodel._prepare_backbone_features(out)
        return feats

    rows = []
    r = time_interleaved({"jax": jax_encode, "torch": torch_encode}, a.repeats)
    je, te = r["jax"], r["torch"]
    rows.append(
        {
            "stage": "image encoder (1024 px, incl. preprocessing in JAX)",
            "jax_ms": je["median_s"] * 1e3,
            "torch_ms": te["median_s"] * 1e3,
            "jax/torch": ratio(je, te),
            "jax_compile_s": je["first_s"] - je["median_s"],
        }
    )

    # decoding: one positive click, multimask (the interactive loop's unit of work)
    pts = np.array([[500.0, 400.0]])
    lab = np.array([1])

    def jax_decode():
        pred.predict(point_coords=pts, point_labels=lab, return_logits=True)

    pe, md = tmodel.sam_prompt_encoder, tmodel.sam_mask_decoder
    feats = torch_encode()
    emb = feats[-1].permute(1, 2, 0).view(1, 256, 64, 64) + 0
    hr = [feats[0].permute(1, 2, 0).view(1, 32, 256, 256), feats[1].permute(1, 2, 0).view(1, 64, 128, 128)]

    @torch.no_grad()
    def torch_decode():
        c = torch.tensor(pts, dtype=torch.float)[None]
        sparse, dense = pe(points=(c, torch.tensor(lab, dtype=torch.int)[None]), boxes=None, masks=None)
        low, iou, _, _ = md(emb, pe.get_dense_pe(), sparse, dense, True, False, hr)
        return torch.nn.functional.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False).numpy()

    r = time_interleaved({"jax": jax_decode, "torch": torch_decode}, a.decode_repeats, warmup=3)
    jd, td = r["jax"], r["torch"]
    rows.append(
        {
            "stage": "prompt decoding (1 click, multimask, upsampled to 1024)",
            "jax_ms": jd["median_s"] * 1e3,
            "torch_ms": td["median_s"] * 1e3,
            "jax/torch": ratio(jd, td),
            "jax_compile_s": jd["first_s"] - jd["median_s"],
        }
    )
    write(
        f"sam2_{a.model}",
        rows,
        ["stage", "jax_ms", "torch_ms", "jax/torch", "jax_compile_s"],
        {"model": a.model, "repeats": a.repeats, "decode_repeats": a.decode_repeats},
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator(jemalloc=False)  # torch in this process too: glibc's huge-page malloc (host_memory.py)
    main()
