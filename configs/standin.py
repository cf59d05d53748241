"""The stand-in SAM 2 (`make pretrain` = python pretrain.py): sam2.1 tiny trained from random
weights on procedural data (safeclick_jax/data/procedural.py), in three phases:

  python train.py --config configs/standin.py:decoder --workdir workdir/standin/decoder
  python train.py --config configs/standin.py:image --workdir workdir/standin/image \
      --config.init.checkpoint=workdir/standin/decoder/export
  python train.py --config configs/standin.py:clip --workdir workdir/standin/clip \
      --config.init.checkpoint=workdir/standin/image/export

`decoder`: the prompt encoder and mask decoder on single slices over the frozen random image
encoder (the slice task, its features computed once and cached), so that the decoder learns to
segment what is clicked before the encoder moves; `image`: clips of one slice with several
objects each, SAM 2's image training (every part trains); `clip`: clips of consecutive slices, so
the memory path learns to carry a mask from slice to slice. `image` and `clip` are the `full`
task of configs/common.py (the whole model on clips); all three use SAM 2's own decoder (no
SafeClick head). `smoke` (after a comma) shrinks the model and data for tests.

Sizes: the sam2.1 tiny architecture at the CPU image size (128 px) on a CPU, at its own 1024 px on
a GPU/TPU (data.image_size = -1). Length: a fixed number of steps per phase (`train.total_steps`),
fewer on a CPU (sized for 30 minutes on 2 cores in all; docs/pretraining.md) than elsewhere.
The stand-in never starts from a previous stand-in: init.checkpoint is None for the decoder phase
(pretrain.py passes each phase's export to the next).
"""

import jax

from configs import common

PHASES = ("decoder", "image", "clip")


def get_config(arg=None):
    variants = [v for v in (arg or "").split(",") if v]
    phases = [v for v in variants if v in PHASES]
    if len(phases) != 1:
        raise ValueError(f"configs/standin.py needs one phase of {PHASES} after the colon, got {arg!r}")
    phase, rest = phases[0], [v for v in variants if v not in PHASES]
    task = [] if phase == "decoder" else ["full"]
    c = common.make("sam2.1_hiera_t", ",".join([*task, "baseline", *rest]), cpu_image_size=128, checkpoint=None)
    c.variant = ",".join(["standin", *variants])
    c.init.checkpoint = None  # random weights: never the stand-in itself (common's default when it exists)

    # The pretraining data (seed 0; the zero-shot protocol's held-out volumes are seed 1): on a CPU 40
    # volumes of 128 x 128 x 48 for 128 px training; elsewhere 100 of 512 x 512 x 64, so
    # that 1024 px training does not see 8x upsampled slices; `smoke`: 5 of 48 x 48 x 12.
    cpu = jax.default_backend() == "cpu"
    smoke = "smoke" in rest
    if smoke:
        name, volumes, shape = "procedural_smoke", 5, (48, 48, 12)
    elif cpu:
        name, volumes, shape = "procedural", 40, (128, 128, 48)
    else:
        name, volumes, shape = "procedural_512", 100, (512, 512, 64)
    c.data.roots = (f"data/{name}",)
    c.data.cache_dir = f"data/cache/{name}"
    c.data.synthetic_root = f"data/{name}"
    c.data.synthetic_kind = "procedural"
    c.data.synthetic_volumes = volumes
    c.data.synthetic_seed = 0
    c.data.synthetic_shape = shape

    # From scratch, not a fine-tuning (docs/pretraining.md has the measurements behind each choice):
    # - one lr for every part with a linear warm-up, then cosine, as SAM's pretraining: sam2's
    #   fine-tuning lr (5e-6, the trunk at 3e-6 with layer decay 0.9) would barely move random weights;
    # - focal x1 instead of x20: from random weights focal x20 drives every logit to background
    #   within a few steps, where the dice term's gradient vanishes;
    # - one corrective click per corrected frame instead of 7: half the step time, and the first
    #   decoding is what a random decoder has to learn;
    # - objects of at least 100 pixels (at 128 px) on a clip's first slice: smaller ones are a
    #   pixel or two of the decoder's 32 x 32 output.
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 30
    c.optim.vision_lr_mult = 1.0
    c.optim.layer_decay = 1.0
    c.loss.mask_weight = 1.0
    if phase == "decoder":
        return _decoder_phase(c, cpu, smoke)
    c.clip.num_correction_pt_per_frame = 1
    c.clip.min_object_pixels = 100 if cpu else 100 * 8 * 8  # the same share of a 1024 px image

    # Validation (8 fixed clips of the val split, one click per object): a handful of times a
    # phase, not every epoch of 7 or 28 steps
    c.eval.every_epochs = 30 if phase == "image" else 3
    if phase == "image":
        _phase(c, frames=1, objects=6, batch=4, cpu_steps=1000, steps=20000)  # an image: many objects (>= 7 a volume)
        # A mask prompt on a single frame is its own output (SAM2Train): only clicks and boxes teach
        # a random decoder to segment, so the image phase always gets one of them.
        c.clip.prob_to_use_pt_input = 1.0
    else:
        _phase(c, frames=-1, objects=2, batch=1, cpu_steps=700, steps=20000)  # -1: 8 slices, 4 on a CPU
        # Only the memory path trains: the image encoder keeps what the image phase taught it (twice
        # the clip steps in the same time) and the decoder keeps segmenting the clicked slice. With
        # the decoder training too, one run in four learned to propagate (the others' masks shrank
        # as they were carried) and the clicked slice lost a third of its Dice (benchmarks/RESULTS.md).
        c.train.parts = ("memory",)
    if smoke:
        _phase(c, frames=1 if phase == "image" else 2, objects=2, batch=1, cpu_steps=3, steps=3)
        c.eval.every_epochs = 1
    return c


def _decoder_phase(c, cpu: bool, smoke: bool):
    """The slice task on the procedural slices: prompt encoder and mask decoder from random weights
    over the frozen random encoder (features cached on a CPU; computed in each step elsewhere,
    where 1024 px features of every slice would not fit a disk cache), one click or box per slice.
    Why first: the whole-model image phase from random weights learns to follow the click slowly
    (benchmarks/RESULTS.md), the cached decoder steps are 15x faster on a CPU."""
    c.train.parts = ("prompt_encoder", "mask_decoder")
    c.embed.enabled = cpu
    c.train.total_steps = 3000 if cpu else 5000
    c.eval.max_rois = 200  # x 10 prompt conditions, at each epoch (976 steps of 8 slices)
    if smoke:
        c.train.total_steps = 3
        c.eval.max_rois = 4
    return c


def _phase(c, frames: int, objects: int, batch: int, cpu_steps: int, steps: int) -> None:
    """Clip length, objects per clip, clips per batch and the number of steps of one phase."""
    c.clip.num_frames = frames
    c.clip.max_objects = objects
    c.data.batch_size = batch
    c.train.total_steps = cpu_steps if jax.default_backend() == "cpu" else steps
