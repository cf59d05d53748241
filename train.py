"""Train SafeClick (or fine-tune SAM 2's decoder) on prepared medical slices.

    python train.py --config configs/sam2_t.py --workdir workdir/sam2_t
    python train.py --config configs/sam2_t.py:no_crl --config.init.checkpoint=ckpt/sam2.1_t \
        --config.data.image_size=1024 --config.optim.lr=3e-4 --workdir workdir/no_crl

A restart with the same --workdir resumes from its newest checkpoint that restores (damaged ones
are moved to checkpoints/<step>.damaged). Exit codes: 0 done; 2 bad input that stops the run (a
model directory that does not load, no checkpoint restores, a checkpoint save failed); 3 the loss
diverged (NaN/Inf; the last good checkpoint is kept); 4 preempted (SIGTERM: the current step was
finished and saved; a restart resumes exactly); 2 also for a config value the run cannot use
(unknown train.parts, a memory path of another model size), found before anything is written.
See docs/training.md.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sam2_t.py", "training config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, logs and the exported model", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from safeclick_jax import checkpoint, standin
    from safeclick_jax.training import loop

    config = _CONFIG.value
    print(standin.encoder_line(config.init.checkpoint, config.variant.startswith("standin")), flush=True)
    try:
        loop.train(_CONFIG.value, _WORKDIR.value)
    except checkpoint.ModelDirError as e:
        checkpoint.exit_on_model_error(e)
    except (loop.ConfigError, loop.ResumeError, loop.SaveError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except loop.DivergenceError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except loop.Preempted as e:
        print(str(e), flush=True)
        sys.exit(4)


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # re-executes once with the host allocator (safeclick_jax/host_memory.py)
    app.run(main)
