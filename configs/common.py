"""Shared base of the training configs (configs/sam2_t.py etc. pick the model and call `make`).

Paper settings (sec. 3): AdamW, lr 1e-4 with cosine annealing, batch 8, 20 epochs, image encoder
frozen. Everything is overridable from the command line, e.g.
    python train.py --config configs/sam2_t.py:no_crl --config.optim.lr=3e-4 --workdir w

`arg` (after the colon) is a comma-separated list of variants:
  baseline  fine-tune SAM 2's own mask decoder (no SafeClick head): the paper's "SAM 2" rows
  no_e1, no_e2, no_crl   the paper's ablations (sec. 4)
  smoke     a miniature model (64 px, tiny widths) on a small synthetic dataset, a few steps:
            for tests, well under a minute on a CPU once compiled
  paper     the paper's resolution (1024 px, 512 for MedSAM 2) and 20 epochs, even on a CPU
  full      the whole model (image encoder, memory path, decoder) on T-slice clips with up to K
            objects, as sam2's SAM2Train trains it (task `clips`, sections `clip`, `optim`, `loss`;
            see `_full`). Composes with smoke, baseline, paper and the data flags.

Image size: `data.image_size = -1` means "auto": the model's own input size (1024 / 512) on a
GPU/TPU, `data.cpu_image_size` (128) on a CPU, so `make train` finishes on a laptop. The choice is
printed at start; set `--config.data.image_size=1024` to force one. Likewise `train.epochs = -1`
means 20 (paper) on accelerators and `train.cpu_epochs` (4) on a CPU.
"""

from __future__ import annotations

import ml_collections

from safeclick_jax import compile_cache, standin
from safeclick_jax.data import default_data_config
from safeclick_jax.models.config import get_config as get_sam2_config
from safeclick_jax.training.train_state import PARTS

VARIANTS = ("baseline", "no_e1", "no_e2", "no_crl", "smoke", "paper", "full")


def make(
    model_name: str, arg: str | None = None, cpu_image_size: int = 128, checkpoint: str | None = None
) -> ml_collections.ConfigDict:
    variants = [v for v in (arg or "").split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown config variant(s) {unknown}; known: {VARIANTS}")

    c = ml_collections.ConfigDict()
    c.variant = ",".join(variants) or "safeclick"

    c.model = ml_collections.ConfigDict()
    c.model.name = model_name  # a key of safeclick_jax.models.config.CONFIGS
    c.model.kind = "sam2" if "baseline" in variants else "safeclick"
    c.model.arch = ml_collections.ConfigDict(type_safe=False)  # SAM2Config overrides (smoke only)
    # auto | chunked | full | cudnn (safeclick_jax/models/attention.py); SAFECLICK_ATTENTION overrides it
    c.model.attention = "auto"
    c.model.attention_max_scores = -1  # chunk size in score elements; -1: attention.MAX_SCORES
    c.model.drop_path = 0.0  # Hiera's stochastic depth when the encoder trains (`full`)
    c.model.dropout = 0.0  # memory attention dropout when the memory path trains (`full`)
    c.model.safeclick = ml_collections.ConfigDict(
        dict(
            intermediate_block=-1,
            channels=256,
            num_heads=8,
            mlp_dim=1024,
            alpha_init=1.0,
            leaky_slope=0.01,
            use_e1="no_e1" not in variants,
            use_e2="no_e2" not in variants,
            use_crl="no_crl" not in variants,
        )
    )

    c.init = ml_collections.ConfigDict()
    # A converted SAM 2 / MedSAM 2 model directory (python -m convert.sam2_to_flax). Default: the
    # stand-in SAM 2 pretrained here (`make pretrain`, safeclick_jax/standin.py) when it exists,
    # else None: random weights everywhere (a loud warning; fine for tests, useless for research).
    if checkpoint is None:
        checkpoint = standin.default_checkpoint()
    c.init.checkpoint = ml_collections.FieldReference(checkpoint, field_type=str)
    c.init.seed = 0  # the SafeClick head's init (and everything without checkpoint)
    # The memory path written into every export (so volume propagation works on it) when the task
    # does not train it: from this model directory (a converted SAM 2 of the same size), else from
    # init.checkpoint, else random from init.seed (with a warning).
    c.init.memory_checkpoint = ml_collections.FieldReference(None, field_type=str)

    c.task = ml_collections.ConfigDict()
    # 'slices': the decoder (+ SafeClick head) on single slices, the encoder frozen and cached
    # (training/slice_task.py); 'clips': the whole model on T-slice clips (variant `full`).
    c.task.name = "slices"

    data = default_data_config().to_dict()
    data["roots"] = tuple(data["roots"])  # a tuple: overridable as --config.data.roots='("a", "b")'
    c.data = ml_collections.ConfigDict(data, type_safe=False)
    c.data.image_size = -1  # -1: auto (see module docstring)
    c.data.cpu_image_size = cpu_image_size
    # The embedded data, generated (+ prepared) when a root equals synthetic_root and is missing:
    # synthetic_kind 'abdomen' (synthetic_abdomen.py: touching organs of similar intensity, where a
    # bad prompt costs a fine-tuned SAM 2 >= 10 Dice points; docs/data.md) or 'smoke' (synthetic.py).
    c.data.roots = ("data/abdomen",)
    c.data.cache_dir = "data/cache/abdomen"
    c.data.synthetic_root = "data/abdomen"
    c.data.synthetic_kind = "abdomen"
    c.data.synthetic_volumes = 15  # split 10 / 2 / 3
    c.data.num_threads = 2

    c.train = ml_collections.ConfigDict()
    c.train.epochs = -1  # -1: auto, 20 (paper) on a GPU/TPU, cpu_epochs on a CPU
    c.train.cpu_epochs = 4
    c.train.steps_per_epoch = -1  # -1: train ROIs // global batch
    c.train.total_steps = -1  # -1: epochs * steps_per_epoch
    c.train.log_every = 10
    c.train.seed = 0  # the train state's PRNG key
    c.train.multimask = True  # SAM 2: three masks for a single click, loss on the best
    # 1: each slice is decoded a second time with a corrective click drawn from the first mask's
    # error region and that mask as prompt, both decodings in the loss (SAM2Train's iterative
    # correction, one step). 0: one prompt per slice, the paper's setting. Measured in
    # benchmarks/RESULTS.md (benchmarks/corrective_click.py).
    c.train.corrective_clicks = 0
    # What trains, among training.train_state.PARTS: the slice task trains the mask decoder (E3, tokens, upscaling,
    # heads) and the SafeClick head ('safeclick', ignored for `baseline`), optionally the prompt
    # encoder; the clip task (`full`) any of them. The rest stays as init.checkpoint has it.
    c.train.parts = ("mask_decoder", "safeclick")
    c.train.progress = True
    # FSDP: split weights and Adam moments of at least fsdp_min_size elements over the `data` axis
    # (memory per device ~1/N for the large sizes) instead of replicating them.
    c.train.fsdp = False
    # "bfloat16": mixed precision (bf16 matmuls, float32 master weights, optimizer and loss); for
    # GPUs/TPUs. On a CPU bf16 matmuls are slower than float32.
    c.train.compute_dtype = "float32"
    c.train.fsdp_min_size = 1 << 16

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4  # paper
    c.optim.schedule = "cosine"  # paper: cosine annealing to min_lr_ratio * lr
    c.optim.min_lr_ratio = 0.0
    c.optim.warmup_steps = 0
    # The SafeClick modules new to SAM 2 (F_transform, E1, E2, the CRL with its zero-initialised
    # F_conv of eq. 9 and alpha of eq. 8) learn at head_lr_mult * lr after a linear warm-up of
    # head_warmup_steps; SAM 2's own decoder (E3, heads) stays at lr. 1.0 (one lr, the paper's) is
    # measured: at 10 (50 warm-up steps) F_conv opens 10x faster but the model stops following the
    # prompt (test Dice 15 instead of 60 on a synthetic abdomen; benchmarks/RESULTS.md); 3 is no better.
    c.optim.head_lr_mult = 1.0
    c.optim.head_warmup_steps = 0
    c.optim.weight_decay = 0.01  # AdamW; SAM 2's fine-tuning recipe
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip = 0.1  # SAM 2's recipe clips the global norm at 0.1; 0 disables

    c.loss = ml_collections.ConfigDict()  # SAM 2's training weights (see training/losses.py)
    c.loss.mask_weight = 20.0
    c.loss.dice_weight = 1.0
    c.loss.iou_weight = 1.0
    c.loss.class_weight = 1.0
    c.loss.focal_alpha = 0.25
    c.loss.focal_gamma = 2.0
    c.loss.iou_loss = "mse"  # 'mse' (issue, SAM) or 'l1' (SAM 2.1's yaml)
    c.loss.supervise_all_iou = True
    c.loss.resolution = "input"  # 'input': logits upsampled to S x S as SAM 2; 'low_res'

    c.embed = ml_collections.ConfigDict()
    c.embed.enabled = True  # False: run the frozen encoder inside every step
    c.embed.root = ml_collections.FieldReference(None, field_type=str)  # None: DATA_CACHE/embeddings
    c.embed.dtype = "float16"
    c.embed.batch_size = 8

    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 1
    c.eval.max_rois = -1  # -1: every val ROI (x 10 prompt conditions)
    c.eval.seed = 0
    # An empty validation split (small datasets): "holdout" validates on the last holdout_fraction
    # of each training volume's slices (not trained on; flagged in the logs and metrics.jsonl);
    # "none" trains without validation and keeps the last checkpoint as the best.
    c.eval.when_no_val = "holdout"
    c.eval.holdout_fraction = 0.2

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = -1  # -1: at every evaluation (each epoch)
    c.checkpoint.keep = 3  # last K, plus the best by val Dice
    c.checkpoint.export_best = True  # WORKDIR/best: the best model as a model directory

    c.debug = ml_collections.ConfigDict()  # test hooks
    c.debug.nan_at_step = -1  # make the loss NaN at this step (-1: never)
    c.debug.step_delay_s = 0.0  # sleep after each step (to kill a run mid-way)

    c.compilation_cache_dir = compile_cache.DEFAULT_DIR  # persistent XLA cache; '' disables
    c.plot = True

    if "paper" in variants:  # the paper's resolution and schedule on any backend
        c.data.image_size = get_sam2_config(model_name).image_size
        c.train.epochs = 20
    if "full" in variants:
        _full(c, model_name)
    if "smoke" in variants:
        _smoke(c)
        if "full" in variants:
            _smoke_full(c)
    return c


def _full(c, model_name: str):
    """Whole-model training on clips, sam2's recipe (configs/sam2.1_training/*.yaml of the sam2
    package: SAM2Train's prompt simulation, MultiStepMultiMasksAndIous, AdamW with a lower lr for
    the vision trunk and layer-wise decay). Every field is settable with --config.clip.X etc."""
    c.task.name = "clips"
    c.train.parts = PARTS
    c.embed.enabled = False  # the encoder trains: no cached features

    c.clip = ml_collections.ConfigDict()
    # Clips: num_frames (T) consecutive slices of one volume with up to max_objects (K) of its labels
    # present in them (sam2's RandomUniformSampler num_frames / max_num_objects). T = 1: images.
    c.clip.num_frames = -1  # -1: auto, accelerator_num_frames on a GPU/TPU, cpu_num_frames on a CPU
    c.clip.accelerator_num_frames = 8  # sam2's yaml and MedSAM 2
    c.clip.cpu_num_frames = 4  # the CPU size, with data.cpu_image_size (128 px)
    c.clip.max_objects = 3
    c.clip.min_object_pixels = 0  # > 0: draw only objects at least this large on a clip's first slice
    # Prompts (SAM2Train.prepare_prompt_inputs; sam2's names without _for_train). With probability
    # prob_to_use_pt_input the initial conditioning frames get clicks or boxes, else their mask;
    # given clicks, prob_to_use_box_input makes it a box (0.5 x 0.5 = a box a quarter of the time).
    c.clip.prob_to_use_pt_input = 0.5
    c.clip.prob_to_use_box_input = 0.5
    # 1..num_init_cond_frames initial conditioning frames (frame 0 always; random count if rand_*)
    c.clip.num_init_cond_frames = 2
    c.clip.rand_init_cond_frames = True
    # corrections: num_correction_pt_per_frame iterative clicks from the error region on
    # 1..num_frames_to_correct frames (the initial conditioning frames first)
    c.clip.num_frames_to_correct = 2
    c.clip.rand_frames_to_correct = True
    c.clip.num_correction_pt_per_frame = 7
    c.clip.prob_to_sample_from_gt = 0.1  # a correction click drawn from the GT mask, not the error
    c.clip.add_all_frames_to_correct_as_cond = True  # a corrected frame becomes a conditioning frame
    # masks entering the memory encoder: sigmoid of the logits (SAM2Train, training mode); True
    # binarises masks of frames prompted by clicks (SAM2Base in eval mode)
    c.clip.binarize_mask_from_pts_for_mem_enc = False
    # validation (each evaluation): this many fixed clips of the val split, one click per object on
    # the first frame, no corrections (training/clip_task.py); 0 trains without validation
    c.clip.val_clips = 8

    # sam2's optimiser: the image encoder at vision_lr_mult * lr (3e-6 / 5e-6 in the yaml), the Hiera
    # trunk's blocks with layer-wise decay layer_decay^(depth - layer) (layer_decay_param_modifier;
    # pos_embed at 1.0), no weight decay on biases and norms, cosine to min_lr_ratio * lr.
    c.optim.lr = 5e-6
    c.optim.vision_lr_mult = 0.6
    c.optim.layer_decay = 0.9
    c.optim.weight_decay = 0.1
    c.optim.min_lr_ratio = 0.1
    c.optim.grad_clip = 0.1
    c.model.drop_path = 0.1  # Hiera's stochastic depth (drop_path_rate)
    c.model.dropout = 0.1  # memory attention (dropout of its layers)

    c.loss.iou_loss = "l1"  # iou_use_l1_loss: true
    c.data.batch_size = 1  # clips per step (train_batch_size); each has up to K objects
    if "paper" in c.variant.split(","):
        c.clip.num_frames = c.clip.accelerator_num_frames


def _smoke_full(c):
    """`smoke,full`: 2-frame clips of 2 objects, 2 corrective clicks, a few steps (tests)."""
    c.clip.update(num_frames=2, max_objects=2, num_correction_pt_per_frame=2)
    c.data.batch_size = 1
    c.train.steps_per_epoch = 3


def _smoke(c):
    """Miniature model and data: the whole pipeline in seconds (tests)."""
    c.model.arch = ml_collections.ConfigDict(
        dict(
            d_model=32,
            transformer_mlp_dim=64,
            transformer_num_heads=2,
            iou_head_hidden_dim=32,
            mask_in_chans=4,
            mem_dim=16,  # <= d_model: an object pointer is d_model / mem_dim memory tokens
            hiera=dict(
                embed_dim=8,
                num_heads=1,
                stages=(1, 1, 2, 1),
                global_att_blocks=(2,),
                window_spec=(8, 4, 4, 2),
                window_pos_embed_bkg_spatial_size=(4, 4),
            ),
        ),
        type_safe=False,
    )
    c.model.safeclick.update(channels=32, num_heads=2, mlp_dim=64)
    c.init.checkpoint = None
    c.data.image_size = 64
    c.data.batch_size = 4
    c.data.roots = ("data/synthetic_smoke",)
    c.data.synthetic_root = "data/synthetic_smoke"
    c.data.synthetic_kind = "smoke"
    c.data.cache_dir = "data/cache/synthetic_smoke"
    c.data.synthetic_volumes = 5  # split 3 / 1 / 1
    c.train.epochs = 2
    c.train.steps_per_epoch = 4
    c.train.log_every = 1
    c.eval.max_rois = 4
    c.checkpoint.keep = 2
    c.embed.batch_size = 4
