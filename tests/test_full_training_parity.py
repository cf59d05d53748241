"""Full SAM 2 training (safeclick_jax/training/full.py) against sam2's training code: `SAM2Train`
(training/model/sam2.py) tracking a clip and `MultiStepMultiMasksAndIous` (training/loss_fns.py),
random perturbed sam2.1 tiny weights at 128 px, fp32, dropout off. The prompts torch's sampler
draws (initial clicks / boxes, corrective clicks) are recorded and replayed in JAX.

Cases, both with 2 objects: a 2-frame clip with a mask prompt; a 4-frame clip with two
conditioning frames and corrective clicks on three frames. Per decoding step: multimask logits,
IoUs, object scores; per frame: the pointer and the memory features (rel <= 1e-4); the loss
(rel <= 1e-5) and the gradients of encoder, memory and decoder tensors (rel <= 1e-4)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safeclick_jax.inference.loader import load_model
from safeclick_jax.models.memory import SAM2Memory
from safeclick_jax.models.sam2 import IMAGE_PATH_PREFIXES
from safeclick_jax.training import full
from tests.sam2_torch import SAM2_LOSS, config_path, import_training, numpy_state_dict, rel_err, torch

MODEL, SIZE, K = "sam2.1_hiera_t", 128, 2
REL, LOSS_REL = 1e-4, 1e-5
# Gradients: the memory path's move by this much between two float32 JAX programs whose forward
# values differ by rounding alone (the encoder's LayerNorm backward written by hand or by autodiff;
# benchmarks/RESULTS.md, "Parity"), so they are checked at that level. A wrong gradient is off by O(1).
GRAD_REL = 1e-3


def build_sam2_train(**train_args):
    """SAM2Train from the sam2.1 tiny yaml at SIZE px, every tensor perturbed, dropout off."""
    from sam2.build_sam import build_sam2

    import_training()  # hydra resolves SAM2Train by name
    args = [f"++model.{k}={v}" for k, v in train_args.items()]
    torch.manual_seed(0)
    tm = build_sam2(
        config_path(MODEL), None, "cpu", mode="train", apply_postprocessing=False,
        hydra_overrides_extra=[f"++model.image_size={SIZE}", "++model._target_=training.model.sam2.SAM2Train", *args],
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, t in tm.state_dict().items():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(3.0)
    for m in tm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return tm.train()


def clip_data(num_frames, seed=0):
    """A clip of num_frames slices with K ellipse objects that move and grow."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(1, num_frames, SIZE, SIZE, 3)).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((1, num_frames, K, SIZE, SIZE), bool)
    for t in range(num_frames):
        for k in range(K):
            cy, cx = 40 + 40 * k + 3 * t, 50 + 20 * k - 2 * t
            masks[0, t, k] = ((yy - cy) / (14 + t)) ** 2 + ((xx - cx) / (20 - 2 * k)) ** 2 < 1
            images[0, t][masks[0, t, k]] += 1.0 + k
    return images, masks


def run_torch(tm, images, masks, monkeypatch):
    """SAM2Train forward + loss + backward; records the prompts its sampler draws."""
    sam2_train, loss_fns = import_training()
    corrections = []
    draw = sam2_train.get_next_point

    def recording_next_point(gt_masks, pred_masks, method):
        pts, labels = draw(gt_masks, pred_masks, method)
        if pred_masks is not None:
            corrections.append((pts[:, 0].numpy(), labels[:, 0].numpy()))
        return pts, labels

    monkeypatch.setattr(sam2_train, "get_next_point", recording_next_point)
    _, num_frames, k = masks.shape[:3]
    img = torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy())
    tmask = torch.from_numpy(masks[0])
    inp = types.SimpleNamespace(
        masks=tmask, num_frames=num_frames, flat_obj_to_img_idx=torch.arange(num_frames)[:, None].repeat(1, k)
    )
    backbone = tm.prepare_prompt_inputs(tm.forward_image(img), inp)
    out = tm.forward_tracking(backbone, inp, return_dict=True)
    frames = {**out["cond_frame_outputs"], **out["non_cond_frame_outputs"]}
    loss_fn = loss_fns.MultiStepMultiMasksAndIous(
        {"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
        supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True,
        focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1.0,
    )  # fmt: skip
    losses = loss_fn([frames[t] for t in range(num_frames)], tmask)
    tm.zero_grad()
    losses["core_loss"].backward()
    return backbone, frames, corrections, losses


def replay_plan(backbone, corrections, num_frames, c):
    """The JAX plan of torch's draws (safeclick_jax/training/full.py, module docstring)."""
    init = backbone["init_cond_frames"]
    correct = backbone["frames_to_add_correction_pt"]
    order = init + backbone["frames_not_in_init_cond"]
    plan = {
        "order": np.array(order, np.int32),
        "init_cond": np.isin(np.arange(num_frames), init),
        "correct": np.isin(np.arange(num_frames), correct),
        "use_pt": np.bool_(backbone["use_pt_input"]),
        "coords": np.zeros((num_frames, K, 2, 2), np.float32),
        "labels": np.full((num_frames, K, 2), -2, np.int32),
        "from_gt": np.zeros((num_frames, c), bool),
        "corr_coords": np.zeros((num_frames, c, K, 2), np.float32),
        "corr_labels": np.zeros((num_frames, c, K), np.int32),
    }
    for t, p in backbone["point_inputs_per_frame"].items():
        n = p["point_labels"].shape[1]
        plan["coords"][t, :, :n] = p["point_coords"].numpy()
        plan["labels"][t, :, :n] = p["point_labels"].numpy()
    it = iter(corrections)
    for t in order:
        if t in correct:
            for j in range(c):
                plan["corr_coords"][t, j], plan["corr_labels"][t, j] = next(it)
    assert next(it, None) is None
    return plan


def jax_pair(tm, tmp_path):
    from convert.sam2_to_flax import main as convert_main
    from convert.torch_io import save_torch_state_dict

    save_torch_state_dict(numpy_state_dict(tm), str(tmp_path / "model.pt"))
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "ckpt"), "--image-size", str(SIZE)]
    assert convert_main(args) == 0
    loaded = load_model(str(tmp_path / "ckpt"), memory="required")
    return loaded.network, loaded.memory


def check(name, got, ref, tol=REL):
    r = rel_err(got, ref)
    print(f"{name}: rel {r:.2e}")
    assert r <= tol, f"{name}: relative error {r:.2e} > {tol}"
    return r


def to_np(t):
    return t.detach().numpy()


# torch parameter -> layout change of its Flax array (T: linear kernel, conv: HWIO, tpos: NHWC)
GRADS = {
    "image_encoder.trunk.blocks.0.attn.qkv.weight": "T",
    "image_encoder.trunk.blocks.11.mlp.layers.1.weight": "T",
    "image_encoder.neck.convs.1.conv.weight": "conv",
    "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight": "T",
    "sam_mask_decoder.output_hypernetworks_mlps.2.layers.0.weight": "T",
    "sam_prompt_encoder.point_embeddings.1.weight": "",
    "memory_attention.layers.2.cross_attn_image.k_proj.weight": "T",
    "memory_encoder.fuser.layers.0.pwconv1.weight": "T",
    "obj_ptr_proj.layers.0.weight": "T",
    "maskmem_tpos_enc": "same",
}


def flax_path(name: str, how: str) -> tuple:
    """The path of a torch parameter in the (image model, memory path) pair's state."""
    keys = [int(k) if k.isdigit() else k for k in name.split(".")]
    if keys[-1] == "weight":
        keys[-1] = "embedding" if how == "" else "kernel"
    return (0 if name.startswith(IMAGE_PATH_PREFIXES) else 1, *keys)


def torch_layout(g, how):
    g = np.asarray(g)
    if how == "T":
        return g.T
    if how == "conv":
        return g.transpose(3, 2, 0, 1)
    if how == "tpos":
        return g.transpose(0, 3, 1, 2)
    return g


CASES = {
    # 2 frames, mask prompt on frame 0
    "mask_2f": dict(num_frames=2, args=dict(prob_to_use_pt_input_for_train=0.0), c=0),
    # 4 frames: clicks / boxes on 2 conditioning frames, 2 corrective clicks on 3 frames
    "clicks_4f": dict(
        num_frames=4,
        c=2,
        args=dict(
            prob_to_use_pt_input_for_train=1.0,
            prob_to_use_box_input_for_train=0.5,
            num_init_cond_frames_for_train=2,
            rand_init_cond_frames_for_train=False,
            num_frames_to_correct_for_train=3,
            rand_frames_to_correct_for_train=False,
            num_correction_pt_per_frame=2,
            add_all_frames_to_correct_as_cond=True,
        ),
    ),  # fmt: skip
}


# the 4-frame case compiles 2 x 4 decodings with corrections: ~2 min on CI's 2 cores, so `slow`
@pytest.mark.parametrize("case", ["mask_2f", pytest.param("clicks_4f", marks=pytest.mark.slow)])
def test_full_training_step_matches_sam2_train(case, tmp_path, monkeypatch):
    spec = CASES[case]
    num_frames, c = spec["num_frames"], spec["c"]
    tm = build_sam2_train(**spec["args"])
    model, mem = jax_pair(tm, tmp_path)
    images, masks = clip_data(num_frames)
    backbone, frames, corrections, losses = run_torch(tm, images, masks, monkeypatch)
    plan = replay_plan(backbone, corrections, num_frames, c)
    if case == "clicks_4f":
        assert len(backbone["init_cond_frames"]) == 2 and len(backbone["frames_to_add_correction_pt"]) == 3

    cfg = types.SimpleNamespace(
        num_correction_pt_per_frame=c,
        num_init_cond_frames=2,
        add_all_frames_to_correct_as_cond=True,
        binarize_mask_from_pts_for_mem_enc=False,
    )
    loss_cfg = types.SimpleNamespace(**SAM2_LOSS)
    graphdef, params, rest = nnx.split((model, mem), nnx.Param, ...)

    def loss_fn(params):
        m, me = nnx.merge(graphdef, params, rest)
        return full.clip_loss(m, me, jnp.asarray(images), jnp.asarray(masks), plan, jax.random.key(0), cfg, loss_cfg)

    (loss, (terms, out)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    worst = 0.0
    for i, t in enumerate(np.asarray(out["frame"])):
        ref = frames[int(t)]
        steps = len(ref["multistep_pred_multimasks"])
        assert int(np.sum(np.asarray(out["valid"][i]))) == steps
        for j in range(steps):
            mm = bool(out["multimask"][i, j])
            sel = slice(1, 4) if mm else slice(0, 1)
            ref_m = to_np(ref["multistep_pred_multimasks"][j])
            assert ref_m.shape[1] == (3 if mm else 1), (t, j)
            worst = max(worst, check(f"frame {t} step {j} masks", np.asarray(out["masks"][i, j][:, sel]), ref_m))
            worst = max(
                worst,
                check(
                    f"frame {t} step {j} ious",
                    np.asarray(out["iou"][i, j][:, sel]),
                    to_np(ref["multistep_pred_ious"][j]),
                ),
            )
            check(
                f"frame {t} step {j} object scores",
                np.asarray(out["obj"][i, j]),
                to_np(ref["multistep_object_score_logits"][j]),
            )
        check(f"frame {t} pointer", np.asarray(out["ptr"][i]), to_np(ref["obj_ptr"]))
        check(
            f"frame {t} memory", np.asarray(out["mem_feats"][i]).transpose(0, 3, 1, 2), to_np(ref["maskmem_features"])
        )

    check("loss", float(loss), float(losses["core_loss"].detach()), LOSS_REL)
    for name in ("mask", "dice", "iou", "class"):
        check(f"loss_{name}", float(terms[name]), float(losses[f"loss_{name}"].detach()), LOSS_REL)

    tparams = dict(tm.named_parameters())
    flat = {k: v for k, v in nnx.to_flat_state(grads)}
    for name, how in GRADS.items():
        g = flat[flax_path(name, how)]
        g = g[...] if isinstance(g, nnx.Variable) else g
        check(f"grad {name}", torch_layout(g, how), to_np(tparams[name].grad), GRAD_REL)


OPTIM = types.SimpleNamespace(lr=5e-6, vision_lr_mult=0.6, layer_decay=0.9, min_lr_ratio=0.1)  # the yaml's 5e-6 / 3e-6


def test_lr_and_weight_decay_per_parameter_match_sam2():
    """Every parameter's lr equals what sam2's layer_decay_param_modifier gives on the base / vision
    lr groups of sam2.1_hiera_b+_MOSE_finetune.yaml (hiera tiny here), and weight decay is off
    exactly on '*bias*' and torch.nn.LayerNorm parameters."""
    import fnmatch

    from safeclick_jax.models.config import get_config
    from safeclick_jax.models.memory import MemoryConfig
    from safeclick_jax.models.sam2 import SAM2Image
    from safeclick_jax.training import full_optim

    import_training()
    from training.optimizer import layer_decay_param_modifier

    tm = build_sam2_train()
    names = {n for n, _ in tm.named_parameters()}
    vision = {n for n in names if fnmatch.fnmatchcase(n, "image_encoder.*")}
    const = lambda v: lambda where: v
    groups = [
        [
            {"option": "lr", "scheduler": const(OPTIM.lr), "parameter_names": names - vision},
            {"option": "lr", "scheduler": const(OPTIM.lr * OPTIM.vision_lr_mult), "parameter_names": vision},
        ]
    ]
    groups = layer_decay_param_modifier(
        groups,
        tm,
        OPTIM.layer_decay,
        apply_to="image_encoder.trunk",
        overrides=[{"pattern": "*pos_embed*", "value": 1.0}],
    )
    expected = {n: g["scheduler"](0.0) for g in groups[0] for n in g["parameter_names"]}
    norms = {
        f"{mn}.{pn}"
        for mn, m in tm.named_modules()
        if isinstance(m, torch.nn.LayerNorm)
        for pn, _ in m.named_parameters(recurse=False)
    }

    cfg = get_config(MODEL)
    pair = nnx.eval_shape(lambda: (SAM2Image(cfg, nnx.Rngs(0)), SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(0))))
    params = nnx.state(pair, nnx.Param)
    scales, decay = full_optim.per_parameter(params, OPTIM)
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    value = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v
    ours = {full_optim.torch_name(p): OPTIM.lr * float(value(s)) for p, s in flat(scales)}
    ours_decay = {full_optim.torch_name(p): bool(value(d)) for p, d in flat(decay)}
    assert set(ours) == names
    assert len(set(expected.values())) == 15  # base, vision, 12 trunk blocks, patch embedding
    for n in sorted(names):
        assert ours[n] == pytest.approx(expected[n], rel=1e-12), n
        assert ours_decay[n] == (not (fnmatch.fnmatchcase(n, "*bias*") or n in norms)), n


# sam2 binarises only outside training (SAM2Base._encode_new_memory: `binarize and not self.training`),
# so the reference is SAM2Train in eval mode, its prompt settings the `_for_eval` ones
BINARIZED = dict(
    binarize_mask_from_pts_for_mem_enc=True,
    prob_to_use_pt_input_for_eval=1.0,
    prob_to_use_box_input_for_eval=0.0,
    num_init_cond_frames_for_eval=1,
    rand_init_cond_frames_for_eval=False,
    num_frames_to_correct_for_eval=1,
    rand_frames_to_correct_for_eval=False,
    num_correction_pt_per_frame=1,
    pt_sampling_for_eval="uniform",  # the replay takes torch's clicks; "center" would need OpenCV
)


def test_binarized_click_masks_enter_the_memory_as_sam2_does(tmp_path, monkeypatch):
    """clip.binarize_mask_from_pts_for_mem_enc: frame 0 (a click, then one corrective click) enters
    the memory encoder as (logits > 0), frame 1 (tracked, no click) as sigmoid(logits). Both frames'
    memory features equal sam2's with that flag (rel <= 1e-4) and so does the loss (rel <= 1e-5);
    without the flag frame 0's memory is another one."""
    tm = build_sam2_train(**BINARIZED).eval()
    model, mem = jax_pair(tm, tmp_path)
    images, masks = clip_data(2)
    backbone, frames, corrections, losses = run_torch(tm, images, masks, monkeypatch)
    plan = replay_plan(backbone, corrections, 2, 1)
    assert backbone["use_pt_input"] and backbone["frames_to_add_correction_pt"] == [0]
    graphdef, state = nnx.split((model, mem))
    loss_cfg = types.SimpleNamespace(**SAM2_LOSS)

    def forward(binarize: bool):
        cfg = types.SimpleNamespace(
            num_correction_pt_per_frame=1,
            num_init_cond_frames=1,
            add_all_frames_to_correct_as_cond=True,
            binarize_mask_from_pts_for_mem_enc=binarize,
        )
        fn = lambda s: full.clip_loss(
            *nnx.merge(graphdef, s), jnp.asarray(images), jnp.asarray(masks), plan, jax.random.key(0), cfg, loss_cfg
        )
        loss, (_, out) = jax.jit(fn)(state)
        return float(loss), np.asarray(out["mem_feats"]).transpose(0, 1, 4, 2, 3)  # [T, N, m, E, E]

    loss, memory = forward(True)
    for t in (0, 1):
        check(f"frame {t} memory (binarised clicks)", memory[t], to_np(frames[t]["maskmem_features"]))
    check("loss (binarised clicks)", loss, float(losses["core_loss"].detach()), LOSS_REL)
    _, sigmoid_memory = forward(False)
    assert rel_err(sigmoid_memory[0], to_np(frames[0]["maskmem_features"])) > 1e-2


def test_drop_path_and_dropout_change_the_loss_only_when_on():
    """model.drop_path (Hiera's stochastic depth) and model.dropout (memory attention) at 0.3 change
    the loss and follow the key; at 0 (the parity tests above) the key changes nothing. The smoke
    model on a 2-slice clip of 2 objects, clicks without corrections (no other use of the key)."""
    from configs import common
    from safeclick_jax.data import clips
    from safeclick_jax.models.memory import MemoryConfig
    from safeclick_jax.training import model_init

    config = common.make(MODEL, "smoke,full")
    # frame 1 tracked (memory attention, where the dropout is): one conditioning frame
    config.clip.update(num_correction_pt_per_frame=0, prob_to_use_pt_input=1.0, num_init_cond_frames=1)
    size = config.data.image_size
    model = model_init.build_model(config, size, log=lambda *a: None)
    mem = SAM2Memory(MemoryConfig.for_model(model.cfg), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    masks = np.stack([[(yy - 20 - 20 * k - t) ** 2 + (xx - 30 + 2 * t) ** 2 < 70 for k in range(2)] for t in range(2)])
    images = jnp.asarray(rng.normal(size=(1, 2, size, size, 3)), jnp.float32)
    plan = clips.prompt_plan(rng, masks, config.clip)
    graphdef, state = nnx.split((model, mem))
    loss_cfg = types.SimpleNamespace(**config.loss.to_dict())
    cfg = types.SimpleNamespace(**config.clip.to_dict())

    compiled = {}

    def loss(drop_path, dropout, seed):
        if (drop_path, dropout) not in compiled:
            fn = lambda s, key: full.clip_loss(
                *nnx.merge(graphdef, s), images, jnp.asarray(masks[None]), plan, key, cfg, loss_cfg, drop_path, dropout
            )[0]
            compiled[drop_path, dropout] = jax.jit(fn)
        return float(compiled[drop_path, dropout](state, jax.random.key(seed)))

    off = loss(0.0, 0.0, 0)
    assert loss(0.0, 0.0, 1) == off
    # the threshold is above float32 noise (~1e-7), not more: at sam2's initialisation the
    # miniature encoder's features move this loss little, so its drop path is tested at 0.9
    for rates in ((0.9, 0.0), (0.0, 0.3)):
        on = loss(*rates, 0)
        assert abs(on - off) / off > 1e-6, (rates, on, off)
        assert loss(*rates, 1) != on, rates
