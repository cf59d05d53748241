"""Does a corrective click improve a model's mask on one slice? Each object of the synthetic
abdomen's test split on its largest slice: a first prompt, then one corrective click, as the
interactive protocol and the app's users give them:

  python benchmarks/corrective_click.py --checkpoint A [--checkpoint B ...] [--data abdomen]

First prompts: the tight box (single-mask output), or one click at the object's deepest point
(SAM's three masks, the IoU head's pick). The correction: the interactive protocol's click rule
(clicks.corrective_click_3d) on the slice, at the deepest point of the largest connected error
region of that mask (positive where the object was missed, negative where the mask spilled
over), added to the first prompt and decoded with the first mask's low-res logits as mask
prompt (as SAM 2's predictors refine a mask); `box + click` also without the mask prompt. Prints
the mean Dice of each column; a model trained with corrective clicks (SAM2Train, the `full`
task) gains from the correction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safeclick_jax.data.prompts import tight_box  # noqa: E402
from safeclick_jax.evaluation import clicks, interactive, zero_shot  # noqa: E402

COLUMNS = ("box", "box + click", "box + click, mask prompt", "click", "click + click, mask prompt")


def scores(predictor, gt: np.ndarray, click: tuple[int, int]) -> dict:
    """The Dice of every column of COLUMNS for one object on one slice (the image already set),
    first clicked at (row, col)."""
    box = tight_box(gt)
    cy, cx = click
    out = {}
    for first, prompt in (("box", {"box": box}), ("click", {"point_coords": [[cx, cy]], "point_labels": [1]})):
        masks, iou, low = predictor.predict(multimask_output=first == "click", **prompt)
        k = int(np.argmax(iou))
        pred = masks[k] > 0
        out[first] = zero_shot.dice(pred, gt)
        fix = clicks.corrective_click_3d(pred, gt, np.random.default_rng(0))
        if fix is None:  # nothing to correct: the refined columns keep the first mask
            out.update({c: out[first] for c in COLUMNS if c.startswith(first + " +")})
            continue
        (y, x), label = fix[0], int(fix[1])
        mask_prompt = {"mask_input": low[k][None]}
        if first == "box":
            pts = {"box": box, "point_coords": [[x, y]], "point_labels": [label]}
            out["box + click"] = zero_shot.dice(predictor.predict(multimask_output=False, **pts)[0][0] > 0, gt)
            refined = predictor.predict(multimask_output=False, **pts, **mask_prompt)
            out["box + click, mask prompt"] = zero_shot.dice(refined[0][0] > 0, gt)
        else:
            pts = {"point_coords": [[cx, cy], [x, y]], "point_labels": [1, label]}
            refined = predictor.predict(multimask_output=False, **pts, **mask_prompt)
            out["click + click, mask prompt"] = zero_shot.dice(refined[0][0] > 0, gt)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="model directory (repeatable)")
    p.add_argument("--data", choices=sorted(zero_shot.DATASETS), default="abdomen")
    p.add_argument("--max-cases", type=int, default=None, help="volumes of the dataset's split")
    a = p.parse_args(argv)

    from safeclick_jax.inference import load_model
    from safeclick_jax.predictor import ImagePredictor

    ds = zero_shot.DATASETS[a.data]
    zero_shot.ensure(ds)
    cases = zero_shot.load_cases(ds, a.max_cases)
    print("| model | objects | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for directory in a.checkpoint:
        m = load_model(directory, None)
        predictor = ImagePredictor(m.network, m.description)
        rows = []
        for case in cases:
            for label in interactive.present_labels(case):
                obj = case.labels == label
                z, row, col = zero_shot.deepest_click(obj)
                predictor.set_image(np.repeat(case.image[z][..., None], 3, axis=-1))
                rows.append(scores(predictor, obj[z], (row, col)))
        means = [np.mean([r[c] for r in rows]) for c in COLUMNS]
        print(f"| {directory} | {len(rows)} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
