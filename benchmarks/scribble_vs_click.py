"""How a scribble should become SAM 2 prompts, measured against one click (docs/interactive.md).

    python benchmarks/scribble_vs_click.py [--checkpoint workdir/sam2_t/export] [--out benchmarks/results/scribble]

On the example volume of the web app (demo.example_case: synthetic abdomen 15, unseen by the
demo model), every labelled structure on every slice where it covers >= --min-area pixels gets
one prompt on a fresh object, and the 2D Dice of the slice's mask against the label is taken:
- click: one foreground click at the object's deepest pixel (largest distance to its boundary);
- two simulated scribbles, each turned into prompts several ways:
  - `axis`: a straight stroke along the object's long axis (principal axis of its pixels) through
    its deepest pixel, kept where it stays >= 1 px inside the object (the longest such run);
  - `walk`: a random walk from the deepest pixel (1.5 px steps, heading jittered by 0.5 rad,
    turned back at 1 px from the boundary; about 2 sqrt(area) steps, seeded per case);
  (in a structure too thin for that, a one-pixel stroke through its deepest pixel);
- conversions: `even k` (k = 2..8 points evenly spaced by arc length, ends included);
  `centred k` (k = 1..8: the middles of k equal parts of the stroke; k = 1 is its midpoint, one
  click, which SAM 2 answers with its best of three masks as for any single click);
  `ends+bends` (the two ends and the two points of largest
  turning, 4 points); `mask` (the stroke's pixels, dilated by one pixel, as the slice's mask
  prompt: SAM 2's add_new_mask makes it the output); `mask+even 4` (that mask, then 4 points,
  which refine it with the mask as the dense prompt).
Writes OUT.json / OUT.md (mean and median Dice per variant, ms per prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package


def deepest(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance transform, (x, y) of its maximum)."""
    depth = ndimage.distance_transform_edt(mask)
    r, c = np.unravel_index(np.argmax(depth), depth.shape)
    return depth, np.array([c, r], np.float64)


def axis_stroke(mask: np.ndarray) -> np.ndarray:
    depth, start = deepest(mask)
    rows, cols = np.nonzero(mask)
    xy = np.stack([cols, rows], 1).astype(np.float64)
    _, _, vt = np.linalg.svd(xy - xy.mean(0), full_matrices=False)
    d = vt[0]
    s = np.arange(-max(mask.shape), max(mask.shape) + 1, 0.5)
    line = start + s[:, None] * d
    r = np.rint(line[:, 1]).astype(int)
    c = np.rint(line[:, 0]).astype(int)
    ok = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    inside = np.zeros(len(s), bool)
    inside[ok] = depth[r[ok], c[ok]] >= min(1.5, depth.max())  # >= 1 px from the boundary (if it can)
    i0 = int(np.argmin(np.abs(s)))  # the run through the deepest pixel
    lo, hi = i0, i0
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    while hi < len(s) - 1 and inside[hi + 1]:
        hi += 1
    if hi == lo:  # too thin for a stroke along the axis: a one-pixel stroke through the deepest pixel
        return np.stack([start - d * 0.5, start + d * 0.5])
    return line[lo : hi + 1]


def walk_stroke(mask: np.ndarray, seed: int) -> np.ndarray:
    depth, start = deepest(mask)
    rng = np.random.default_rng(seed)
    steps = int(np.clip(2 * np.sqrt(mask.sum()), 10, 80))
    pos, heading, out = start.copy(), rng.uniform(0, 2 * np.pi), [start.copy()]
    for _ in range(steps):
        for _try in range(20):
            h = heading + rng.normal(0, 0.5)
            nxt = pos + 1.5 * np.array([np.cos(h), np.sin(h)])
            r, c = int(round(nxt[1])), int(round(nxt[0]))
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and depth[r, c] >= min(1.5, depth.max()):
                pos, heading = nxt, h
                out.append(pos.copy())
                break
            heading += np.pi / 2 + rng.normal(0, 0.5)  # turn away from the boundary
    if len(out) == 1:  # no room to move: a one-pixel stroke through the deepest pixel
        out.append(start + [1.0, 0.0])
    return np.asarray(out)


def ends_and_bends(stroke: np.ndarray, bends: int = 2) -> np.ndarray:
    from safeclick_jax.inference.prompts import along

    length = np.hypot(*np.diff(stroke, axis=0).T).sum()
    n = max(int(length), 2)
    s = along(stroke, np.linspace(0, length, n + 1))
    if n < 8:
        return s[[0, -1]]
    w = 3
    a = s[w:-w] - s[: -2 * w]
    b = s[2 * w :] - s[w:-w]
    turn = np.abs(np.angle((b[:, 0] + 1j * b[:, 1]) / (a[:, 0] + 1j * a[:, 1] + 1e-9)))
    picked = []
    for i in np.argsort(-turn):
        if all(abs(i - j) > n / (bends + 2) for j in picked):
            picked.append(i)
        if len(picked) == bends:
            break
    return np.concatenate([s[:1], s[w + np.array(sorted(picked), int)], s[-1:]])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="workdir/sam2_t/export")
    p.add_argument("--out", default="benchmarks/results/scribble")
    p.add_argument("--min-area", type=int, default=20)
    a = p.parse_args(argv)

    from demo import example_case, example_volume
    from safeclick_jax.inference import VolumePredictor, load_model
    from safeclick_jax.inference.prompts import along, stroke

    _, labels, _ = example_case()
    # one slice's prompt runs no memory step: the demo model's untrained memory path is not used
    m = load_model(a.checkpoint, memory="untrained")
    vp = VolumePredictor(m.network, m.memory, m.description)
    vp.set_volume(example_volume(Path(tempfile.mkdtemp())), axis=2)  # as the web app reads it
    stack = vp.geometry.to_slice_stack(labels)
    hw = vp.slice_hw

    def points(xy, label=1):
        return dict(points=np.asarray(xy, np.float32), labels=np.full(len(xy), label, np.int32))

    def run(t, fn):
        vp.reset_all()
        t0 = time.perf_counter()
        m = fn(t)
        return m, time.perf_counter() - t0

    def even(k):
        return lambda st: along(st, np.linspace(0, np.hypot(*np.diff(st, axis=0).T).sum(), k))

    def stroke_mask(st):
        m = np.zeros(hw, bool)
        length = np.hypot(*np.diff(st, axis=0).T).sum()
        q = np.rint(along(st, np.linspace(0, length, int(length * 4) + 2))).astype(int)
        m[np.clip(q[:, 1], 0, hw[0] - 1), np.clip(q[:, 0], 0, hw[1] - 1)] = True
        return ndimage.binary_dilation(m)

    def centred(k):  # the middles of k equal parts of the stroke: its ends, often near the boundary, left out
        return lambda st: along(st, np.hypot(*np.diff(st, axis=0).T).sum() * (np.arange(k) + 0.5) / k)

    conversions = {f"even {k}": even(k) for k in range(2, 9)}
    conversions.update({f"centred {k}": centred(k) for k in range(1, 9)})
    conversions["ends+bends"] = ends_and_bends
    results: dict[str, list[float]] = {"click": []}
    times: dict[str, list[float]] = {"click": []}
    cases = []
    for t in range(vp.num_slices):
        vp.encode_slice(t)
        for k in np.unique(stack[t]):
            gt = stack[t] == k
            if k == 0 or gt.sum() < a.min_area:
                continue
            cases.append((t, int(k)))
            _, xy = deepest(gt)
            m, dt = run(t, lambda t: vp.add_prompt(t, **points([xy])))
            results["click"].append(dice(m, gt))
            times["click"].append(dt)
            for kind, st in (("axis", axis_stroke(gt)), ("walk", walk_stroke(gt, seed=1000 * t + int(k)))):
                st = stroke(st, hw, t, "scribble")
                for name, conv in conversions.items():
                    m, dt = run(t, lambda t: vp.add_prompt(t, **points(conv(st))))
                    results.setdefault(f"{kind} {name}", []).append(dice(m, gt))
                    times.setdefault(f"{kind} {name}", []).append(dt)
                m, dt = run(t, lambda t: vp.add_mask(t, stroke_mask(st)))
                results.setdefault(f"{kind} mask", []).append(dice(m, gt))
                times.setdefault(f"{kind} mask", []).append(dt)

                def mask_then_points(t):
                    vp.add_mask(t, stroke_mask(st))
                    return vp.add_prompt(t, **points(even(4)(st)))

                m, dt = run(t, mask_then_points)
                results.setdefault(f"{kind} mask+even 4", []).append(dice(m, gt))
                times.setdefault(f"{kind} mask+even 4", []).append(dt)
    structures = sorted({k for _, k in cases})
    per_label = {
        name: {k: float(np.mean([d for d, (_, kk) in zip(v, cases) if kk == k])) for k in structures}
        for name, v in results.items()
    }
    rows = {
        name: {
            "mean_dice": float(np.mean(v)),
            "median_dice": float(np.median(v)),
            "ms": 1000 * statistics.median(times[name][1:] or times[name]),
        }
        for name, v in results.items()
    }
    out = {
        "checkpoint": a.checkpoint,
        "cases": len(cases),
        "objects": sorted({k for _, k in cases}),
        "rows": rows,
        "per_structure": per_label,
        "dice": results,
        "machine": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg()[0],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(out, indent=1))
    lines = [
        f"{len(cases)} (object, slice) cases, structures {out['objects']}, 2D Dice on the slice",
        "",
        "| prompt | mean Dice | median Dice | ms / prompt |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['mean_dice']:.3f} | {r['median_dice']:.3f} | {r['ms']:.0f} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
