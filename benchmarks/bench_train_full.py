"""One full training step of SAM 2 on a clip: JAX (safeclick_jax/training/full.py, clip loss,
global-norm clipping + AdamW, one jit-compiled step) against PyTorch (sam2's SAM2Train forward +
MultiStepMultiMasksAndIous + backward + clip_grad_norm_ + AdamW), same weights, same clip, same
CPU (or GPU), each framework in a worker process of its own, the two steps called in turn
(common.time_in_processes). JAX runs with the host allocator train.py uses (jemalloc where
installed, safeclick_jax/host_memory.py), torch with glibc's huge-page malloc (faster for it).

    python benchmarks/bench_train_full.py --sizes 128,512 --frames 4 --objects 2 --repeats 3
    python benchmarks/bench_train_full.py --sizes 512 --frames 8 --dtype bfloat16   # GPU

The clip: T frames, K objects; frame 0 is the conditioning frame, prompted by a click at each
object's centre, then `--corrections` corrective clicks drawn from the error region (sam2's
num_correction_pt_per_frame, 7 in its yaml); the other frames are tracked through the memory.
Both sides do exactly that (SAM2Train with prob_to_use_pt_input 1, one initial conditioning frame,
one corrected frame); the click positions differ (each side draws its own), the work does not.
Dropout off on both sides (it changes no shape or FLOP count).

Memory a step allocates besides the weights and optimizer state both sides keep: on a CPU, for JAX
XLA's own account of the compiled step (temporary + output buffers), for torch the growth of the
resident set at the peak of its first step (Linux: VmHWM reset through /proc/self/clear_refs; later
steps reuse the heap's freed blocks, so their growth says nothing). On a GPU,
torch.cuda.max_memory_allocated and JAX's peak_bytes_in_use of the device.
bf16 (`--dtype bfloat16`): torch under autocast (sam2's amp), JAX with bf16 compute and float32
master weights (safeclick_jax/training/step.py's scheme).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import cpu_info, ratio, serve, time_in_processes, torch_device, write  # noqa: E402
from convert.sam2_to_flax import convert_state_dict  # noqa: E402
from safeclick_jax.host_memory import glibc_env  # noqa: E402
from safeclick_jax.models.config import get_config  # noqa: E402
from safeclick_jax.models.memory import SAM2Memory  # noqa: E402
from safeclick_jax.training import full  # noqa: E402
from safeclick_jax.training.step import cast_floats  # noqa: E402
from tests.sam2_torch import SAM2_LOSS, import_training  # noqa: E402

LR, WD, CLIP = 5e-6, 0.1, 0.1  # sam2's yaml: base lr, weight decay, max_norm


def torch_model(name: str, size: int, corrections: int):
    from sam2.build_sam import build_sam2

    import_training()
    args = dict(
        prob_to_use_pt_input_for_train=1.0, prob_to_use_box_input_for_train=0.0, prob_to_sample_from_gt_for_train=0.0,
        num_init_cond_frames_for_train=1, rand_init_cond_frames_for_train=False,
        num_frames_to_correct_for_train=1, rand_frames_to_correct_for_train=False,
        num_correction_pt_per_frame=max(corrections, 1), add_all_frames_to_correct_as_cond=True,
    )  # fmt: skip
    version = name.split("_hiera_")[0]
    torch.manual_seed(0)
    tm = build_sam2(
        f"configs/{version}/{name}.yaml", None, "cpu", mode="train", apply_postprocessing=False,
        hydra_overrides_extra=[f"++model.image_size={size}", "++model._target_=training.model.sam2.SAM2Train"]
        + [f"++model.{k}={v}" for k, v in args.items()],
    )  # fmt: skip
    for m in tm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return tm.train()


def clip(size: int, frames: int, objects: int, seed: int = 0):
    """images [1,T,S,S,3], masks [1,T,K,S,S] bool: K ellipses that move and grow from frame to frame."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(1, frames, size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    masks = np.zeros((1, frames, objects, size, size), bool)
    centres = np.zeros((objects, 2), np.float32)
    for t in range(frames):
        for k in range(objects):
            cy, cx = (0.3 + 0.4 * k / max(objects - 1, 1)) + 0.01 * t, 0.4 + 0.1 * k - 0.01 * t
            masks[0, t, k] = ((yy - cy) / (0.1 + 0.005 * t)) ** 2 + ((xx - cx) / 0.15) ** 2 < 1
            images[0, t][masks[0, t, k]] += 1.0 + k
            if t == 0:
                centres[k] = (cx * size, cy * size)
    return images, masks, centres


def jax_plan(frames: int, objects: int, corrections: int, centres):
    """full.py's plan: frame 0 conditioning (a click at each object's centre) and corrected, the
    rest tracked in order; corrective clicks drawn in the graph."""
    coords = np.zeros((frames, objects, 2, 2), np.float32)
    labels = np.full((frames, objects, 2), -2, np.int32)
    coords[0, :, 0], labels[0, :, 0] = centres, 1
    return {
        "order": np.arange(frames, dtype=np.int32),
        "init_cond": np.arange(frames) == 0,
        "correct": np.arange(frames) == 0,
        "use_pt": np.bool_(True),
        "coords": coords,
        "labels": labels,
        "from_gt": np.zeros((frames, max(corrections, 1)), bool),
    }


def jax_step(model, mem, corrections: int, dtype):
    cfg = types.SimpleNamespace(
        num_correction_pt_per_frame=corrections, num_init_cond_frames=1, add_all_frames_to_correct_as_cond=True,
        binarize_mask_from_pts_for_mem_enc=False,
    )  # fmt: skip
    loss_cfg = types.SimpleNamespace(**SAM2_LOSS)
    graphdef, params, rest = nnx.split((model, mem), nnx.Param, ...)
    decay = jax.tree.map(lambda x: x.ndim > 1, params)  # sam2: no weight decay on biases and norms
    opt = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=WD, mask=decay))
    state = {"params": params, "opt": opt.init(params)}

    @functools.partial(jax.jit, donate_argnums=(0,))  # as the trainer: the old state's buffers are reused
    def step(state, rest, images, masks, plan, key):
        def loss_fn(p):
            m, me = nnx.merge(graphdef, cast_floats(p, dtype), cast_floats(rest, dtype))
            return full.clip_loss(m, me, images.astype(dtype), masks, plan, key, cfg, loss_cfg)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, o = opt.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": o}, loss

    return step, state, rest


def torch_step(tm, corrections: int, dtype, device):
    _, loss_fns = import_training()
    loss_fn = loss_fns.MultiStepMultiMasksAndIous(
        {"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
        supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True,
        focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1.0,
    )  # fmt: skip
    decay = [p for n, p in tm.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in tm.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}], lr=LR)

    def step(images, masks):
        frames, k = masks.shape[1], masks.shape[2]
        img = torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy()).to(device)
        tmask = torch.from_numpy(masks[0]).to(device)
        inp = types.SimpleNamespace(
            masks=tmask,
            num_frames=frames,
            flat_obj_to_img_idx=torch.arange(frames, device=device)[:, None].repeat(1, k),
        )
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            backbone = tm.prepare_prompt_inputs(tm.forward_image(img), inp)
            out = tm.forward_tracking(backbone, inp, return_dict=True)
            outs = {**out["cond_frame_outputs"], **out["non_cond_frame_outputs"]}
            loss = loss_fn([outs[t] for t in range(frames)], tmask)["core_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), CLIP)
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.item()

    return step


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_step_mb(fn) -> float:
    """MB the call adds to the resident set at its peak (Linux: VmHWM reset via clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) / 1024


def jax_model(tm, name: str, size: int):
    """(model, memory path) in JAX with the torch model's weights."""
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    cfg = get_config(name).replace(image_size=size)
    model, extra = convert_state_dict(sd, cfg)
    return model, SAM2Memory.from_extra(cfg, extra)


def worker(a):
    """(step, report) for serve(): one framework's training step on the clip, in this process."""
    device, size, box = torch_device(), a.size, {}
    on_gpu = jax.default_backend() != "cpu"
    tm = torch_model(a.model, size, a.corrections)
    images, masks, centres = clip(size, a.frames, a.objects)
    if a.worker == "jax":
        model, mem = jax_model(tm, a.model, size)
        del tm
        plan = jax.tree.map(jnp.asarray, jax_plan(a.frames, a.objects, a.corrections, centres))
        step, box["state"], rest = jax_step(model, mem, a.corrections, jnp.dtype(a.dtype))
        args = (jnp.asarray(images), jnp.asarray(masks), plan, jax.random.key(0))
        t0 = time.perf_counter()
        step = step.lower(box["state"], rest, *args).compile()
        compile_s = time.perf_counter() - t0
        xla = step.memory_analysis()  # what the step allocates besides its arguments (CPU and GPU)
        box["memory_mb"] = (xla.temp_size_in_bytes + xla.output_size_in_bytes) / 2**20

        def run():
            box["state"], loss = step(box["state"], rest, *args)
            box["loss"] = float(loss)

        def peak_mb():
            run()
            return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
    else:
        tstep = torch_step(tm.to(device), a.corrections, a.dtype, device)
        compile_s = 0.0

        def run():
            box["loss"] = tstep(images, masks)

        def peak_mb():
            torch.cuda.reset_peak_memory_stats()
            run()
            return torch.cuda.max_memory_allocated() / 2**20

        if not on_gpu:  # the first step, before the heap holds freed blocks to reuse
            box["memory_mb"] = peak_step_mb(run)

    def report():
        out = {"loss": box["loss"], "compile_s": compile_s}  # loss of the timed steps
        return {**out, "memory_mb": peak_mb() if on_gpu else box["memory_mb"]}

    return run, report


def measure(a, size: int, on_gpu: bool) -> dict:
    flags = [f"--{k}={v}" for k, v in vars(a).items() if k in ("model", "frames", "objects", "corrections", "dtype")]
    cmd = [sys.executable, os.path.abspath(__file__), *flags, f"--size={size}", "--worker"]
    workers = {"jax": cmd + ["jax"], "torch": cmd + ["torch"]}
    t, rep = time_in_processes(workers, a.repeats, envs={"torch": glibc_env(os.environ)})
    mem = "peak_mb" if on_gpu else "step_mb"
    row = {
        "case": f"{a.model} {size} px, {a.frames} frames x {a.objects} objects, {a.corrections} corrections",
        "jax_s": t["jax"]["median_s"],
        "torch_s": t["torch"]["median_s"],
        "jax/torch time": ratio(t["jax"], t["torch"]),
        "jax_compile_s": rep["jax"]["compile_s"],
        "jax_loss": rep["jax"]["loss"],
        "torch_loss": rep["torch"]["loss"],
        f"jax_{mem}": rep["jax"]["memory_mb"],
        f"torch_{mem}": rep["torch"]["memory_mb"],
        "jax_round_s": t["jax"]["round_s"],
        "torch_round_s": t["torch"]["round_s"],
    }
    print(row, flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--sizes", default="128,512")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--corrections", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--name", default=None)
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)  # time_in_processes' workers
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return serve(*worker(a))
    on_gpu = jax.default_backend() != "cpu"
    rows = [measure(a, int(size), on_gpu) for size in a.sizes.split(",")]
    mem_cols = ["jax_peak_mb", "torch_peak_mb"] if on_gpu else ["jax_step_mb", "torch_step_mb"]
    write(
        a.name or f"train_full_{jax.default_backend()}_{a.dtype}",
        rows,
        ["case", "jax_s", "torch_s", "jax/torch time", *mem_cols, "jax_compile_s"],
        {"args": vars(a), "cpu_info": cpu_info(), "torch_device": torch_device(), "time": time.strftime("%F %H:%M")},
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # JAX's worker as train.py; torch's gets glibc_env (safeclick_jax/host_memory.py)
    main()
