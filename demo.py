"""The web app's demo: `make app` (or `python demo.py [APP OPTIONS]`).

Serves the model `make train` exports (workdir/sam2_t/export, trained first when absent) with a
synthetic abdominal CT (`example_case`) in its data folder (workdir/app_data), through
`python -m safeclick_jax.app`. The demo model is trained from scratch without SAM 2's memory
path, so propagation runs with an untrained one (--untrained-memory). Further options go to the
app (`python -m safeclick_jax.app --help`). See docs/app.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib

REPO = Path(__file__).resolve().parent
DEMO_WORKDIR = REPO / "workdir" / "sam2_t"
DEMO_DATA = REPO / "workdir" / "app_data"

# The example volume: synthetic abdomen number 15 of seed 0 (safeclick_jax.data.synthetic_abdomen),
# the generator and seed of `make train`'s data, one past the 15 volumes it trains, validates and
# tests on, so the demo model has never seen it.
EXAMPLE_SEED = 15


def example_case():
    """(image int16 HU, labels uint8, affine) of the example volume."""
    from safeclick_jax.data.synthetic_abdomen import make_volume

    return make_volume(EXAMPLE_SEED)


def example_volume(out_dir: Path) -> Path:
    """Writes the example volume (`example_case`) into out_dir once (again when the generator's grid
    changed); returns its path."""
    from safeclick_jax.data.synthetic_abdomen import SHAPE

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "synthetic_abdomen_015.nii.gz"
    if not path.exists() or nib.load(str(path)).shape != SHAPE:
        image, _, affine = example_case()
        nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def demo_checkpoint() -> Path:
    """The model `make train` exports; trained first when absent."""
    export = DEMO_WORKDIR / "export"
    if not (export / "model.json").exists():
        print(
            f"no trained model in {export}: training the demo model first "
            "(python train.py --config configs/sam2_t.py, about 5 minutes on 2 CPU cores)...",
            flush=True,
        )
        cmd = [sys.executable, "train.py", "--config", "configs/sam2_t.py", "--workdir", str(DEMO_WORKDIR)]
        if subprocess.call(cmd, cwd=REPO) != 0 or not (export / "model.json").exists():
            raise SystemExit(f"error: training the demo model failed; run `{' '.join(cmd)}` to see why")
    return export


def main(argv=None) -> int:
    from safeclick_jax.app.__main__ import main as app_main

    argv = list(sys.argv[1:] if argv is None else argv)
    example_volume(DEMO_DATA)
    demo = ["--checkpoint", str(demo_checkpoint()), "--data-dir", str(DEMO_DATA), "--untrained-memory"]
    return app_main(demo + argv)


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # re-executes once with the host allocator (safeclick_jax/host_memory.py)
    sys.exit(main())
