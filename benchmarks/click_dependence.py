"""Does a model's mask follow the click? Each object alone, one positive click at the deepest point
of its largest slice (the zero-shot protocol's click), SAM's three multimask outputs:

  python benchmarks/click_dependence.py --checkpoint workdir/standin/export [--data procedural]

Per object: the Dice of each of the three masks, of the one the IoU head picks, of the single-mask
output, and the predicted areas. A model that has learned to segment what is clicked has an
IoU-picked Dice near the best of three (its IoU head ranks its masks) and areas that differ
between the objects of one slice; an untrained decoder gives about the same masks whatever the
click. The last line is the mean over the objects.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safeclick_jax.evaluation import interactive, zero_shot  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory")
    p.add_argument("--data", choices=sorted(zero_shot.DATASETS), default="procedural")
    p.add_argument("--max-cases", type=int, default=2, help="volumes of the dataset's split")
    a = p.parse_args(argv)

    from safeclick_jax.inference import load_model
    from safeclick_jax.predictor import ImagePredictor

    ds = zero_shot.DATASETS[a.data]
    zero_shot.ensure(ds)
    names = zero_shot.label_names(ds.root)
    m = load_model(a.checkpoint, None)
    predictor = ImagePredictor(m.network, m.description)
    three, picked, single = [], [], []
    for case in zero_shot.load_cases(ds, a.max_cases):
        for lab in interactive.present_labels(case):
            z, row, col = zero_shot.deepest_click(case.labels == lab)
            gt = case.labels[z] == lab
            predictor.set_image(np.repeat(case.image[z][..., None], 3, axis=-1))
            click = {"point_coords": [[float(col), float(row)]], "point_labels": [1]}
            masks, iou, _ = predictor.predict(**click, multimask_output=True)
            one, _, _ = predictor.predict(**click, multimask_output=False)
            d = [zero_shot.dice(np.asarray(mk, bool), gt) for mk in masks]
            three.append(d)
            picked.append(d[int(np.argmax(iou))])
            single.append(zero_shot.dice(np.asarray(one[0], bool), gt))
            areas = [int(np.asarray(mk, bool).sum()) for mk in masks]
            print(
                f"{case.name} {names.get(lab, str(lab)):20s} pixels {int(gt.sum()):5d}  Dice of the three "
                f"{' '.join(f'{x:.2f}' for x in d)}  picked {picked[-1]:.2f}  single {single[-1]:.2f}  "
                f"areas {areas}  IoU {' '.join(f'{x:.2f}' for x in np.asarray(iou))}"
            )
    if not three:
        print(f"{ds.root}: no object in {a.max_cases} volumes")
        return 1
    t = np.array(three)
    print(
        f"{len(t)} objects: best of three {t.max(1).mean():.3f}, IoU-picked {np.mean(picked):.3f}, "
        f"single-mask {np.mean(single):.3f}, each output {' '.join(f'{x:.3f}' for x in t.mean(0))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
