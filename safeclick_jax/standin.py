"""The stand-in SAM 2: a sam2.1 tiny pretrained here from random weights on procedural data
(`make pretrain`, configs/standin.py), because no SAM 2 weights can be downloaded where this
project is built. It is not SA-1B's SAM 2; it gives the project an encoder and a memory path that
have learned something.

This module is the one rule by which the project's commands start from it: `make train`,
`make table2`, `make app` (its demo model is `make train`'s) and `evaluate.py` use
`default_checkpoint()` (the stand-in when its export exists, else None: random weights) and print
`encoder_line(...)`, which says what they use, or how to build the stand-in and how long it takes.

    python -m safeclick_jax.standin [MODEL_DIR ...]   # is the stand-in there; what each model builds on
"""

from __future__ import annotations

import json
import os
import sys

EXPORT = "workdir/standin/export"  # relative to the repository root, where `make` runs
BUILD = "make pretrain"
BUILD_TIME = "its schedule is sized for 30 minutes on a 2-core CPU"


def available(export: str = EXPORT) -> bool:
    return os.path.isfile(os.path.join(export, "model.json"))


def default_checkpoint() -> str | None:
    """The init.checkpoint the configs start from: the stand-in's export when it exists."""
    return EXPORT if available() else None


def is_standin(directory: str | None) -> bool:
    return directory is not None and os.path.realpath(directory) == os.path.realpath(EXPORT)


def absent_line() -> str:
    return f"no stand-in at {EXPORT}: `{BUILD}` pretrains one, {BUILD_TIME}"


def encoder_line(checkpoint: str | None, pretraining: bool = False) -> str:
    """What a run initialised from `checkpoint` (None: random weights) starts from, in one line;
    `pretraining`: the run is a phase of the stand-in's own pretraining (configs/standin.py)."""
    if checkpoint is None and pretraining:
        return "encoder: RANDOM weights (the stand-in's pretraining starts from them)"
    if checkpoint is None:
        return (
            f"encoder: RANDOM weights ({absent_line()}; or convert a SAM 2 checkpoint and pass "
            "--config.init.checkpoint=DIR)"
        )
    if is_standin(checkpoint):
        return f"encoder: the stand-in SAM 2 pretrained here ({EXPORT}, `{BUILD}`: procedural data, not SA-1B)"
    return f"encoder: {checkpoint}"


def _read_json(path):
    try:
        out = json.loads(open(path).read())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def model_line(directory: str) -> str:
    """What a model directory is built on: a training export's init.checkpoint, from its model.json
    (`training.init`) or its training workdir's config.json."""
    if is_standin(directory):
        return f"{directory}: the stand-in SAM 2 itself (zero-shot)"
    model_dir = directory
    if not os.path.isfile(os.path.join(directory, "model.json")):
        model_dir = os.path.join(directory, "export")  # a training workdir
    desc = _read_json(os.path.join(model_dir, "model.json"))
    if desc is None:  # the loader reports a broken directory in its own words
        return f"{directory}: no readable model.json"
    training = desc["training"] if "training" in desc else None
    config = _read_json(os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.json"))
    if training is not None and "init" in training:
        init = training["init"]
    elif training is not None and config is not None and "init" in config:
        init = config["init"]["checkpoint"]
    else:
        return f"{directory}: its own weights (not a training export)"
    return f"{directory}: fine-tuned from {init or 'RANDOM weights'}" + (" (the stand-in)" if is_standin(init) else "")


def main(argv=None) -> int:
    print(encoder_line(default_checkpoint()))
    for directory in sys.argv[1:] if argv is None else argv:
        if os.path.isdir(directory):
            print(model_line(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
