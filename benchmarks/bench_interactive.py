"""Interactive 3D session, JAX VolumePredictor vs torch SAM2VideoPredictor, same volume, same machine.

    python benchmarks/bench_interactive.py [--model sam2.1_hiera_t] [--sizes 512,1024] [--slices 48]

One object, the steps a user takes: a click on the middle slice and propagation forward and
backward through every slice (time to the first full 3D mask, from handing over the volume), then
negative corrective clicks on tracked slices, each followed by a re-propagation from the corrected
slice outwards through the whole volume (torch: add_new_points_or_box on that slice, then
propagate_in_video(start_frame_idx=t) both ways). The JAX engine encodes every slice once and
re-uses the host-cached features for corrections; SAM2VideoPredictor keeps the features of the
last frame only and re-encodes every slice it tracks.

JAX's first session in a fresh process compiles every step (its first mask is reported as
"cold"; its corrections re-propagate only 7 slices each way, enough to compile what the corrections
need); a second session on the same volume (a new feature cache, nothing left to compile: the
script checks) is the one compared with torch ("warm"). Each (framework, size)
runs in its own process, in turn, so the peak host memory (ru_maxrss) is each one's own; torch uses
2 threads, XLA the same 2 cores. Both load the same weights: torch's default random init (seeded),
converted by the project's CLI. The JAX process also times the compiled pieces of one slice
(image encoder, memory attention, SAM heads, memory encoder) to show where its time goes.
The volume is synthetic (a bright disk that shrinks away from the middle slice, on noise).
`--pause-s S`: both sides idle S seconds (untimed) before each correction, as a user looks at the
result before clicking again. The JAX side runs with the app's host allocator
(safeclick_jax/host_memory.py), torch with glibc's huge-page malloc.
Writes benchmarks/results/interactive.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss keeps the high-water
    mark across exec, so a child started by a large parent would report at least the parent's."""
    with open("/proc/self/status") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    return kib / 2**20


def make_volume(n: int, hw: int):
    """float volume [hw, hw, n] and the uint8 slice stack [n, hw, hw] the JAX engine makes of it."""
    import numpy as np

    from safeclick_jax.data.preprocess import normalize_intensity, to_slices, to_uint8

    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, (hw, hw, n))
    xx, yy = np.mgrid[:hw, :hw]
    for z in range(n):
        r = hw / 5 * (1 - 0.5 * abs(z - n // 2) / n)
        vol[((xx - hw / 2) ** 2 + (yy - hw / 2) ** 2) < r**2, z] += 150
    return vol, to_slices(to_uint8(normalize_intensity(vol)), 2)


def plan(n: int, hw: int, corrections: int):
    """(prompted slice, its click, [(slice, negative click)] corrections on slices either side)."""
    mid = n // 2
    step = max(n // (2 * corrections + 2), 1)
    steps = [(mid + (c + 1) * step * (-1) ** c, [[hw / 2 + 10.0, hw / 2]]) for c in range(corrections)]
    return mid, [[hw / 2, hw / 2]], steps


def median_time(fn) -> float:
    """Median of two timed calls of fn() (which blocks until done), after one untimed call."""
    from benchmarks.common import time_fn

    return time_fn(fn, repeats=2)["median_s"]


def slice_breakdown(p, t: int) -> dict:
    """Seconds per compiled piece of one tracked slice t (the engine's last object, compiled
    steps): image encoder, the whole tracking step, and its parts (memory attention, SAM heads,
    memory encoder), each jitted on its own."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from safeclick_jax import video
    from safeclick_jax.inference import steps

    obj = p.object_state(1)
    feats = p.slice_features(t)
    memory = p.memory_inputs(obj, t, False)  # (entries, t, reverse, slots...)
    entries, args = memory[0], memory[1:]
    size = p.cfg.image_size

    @jax.jit
    def attention(state, entries, feats, *a):
        model, mem = nnx.merge(p.model_key.graphdef, state)
        return video.condition_features(model, mem, feats, entries, *a)

    @jax.jit
    def heads(state, feats, pix):
        model, mem = nnx.merge(p.model_key.graphdef, state)
        coords, labels = video.no_prompt()
        e = feats["pix"].shape[1]
        mask_in = jnp.zeros((1, 4 * e, 4 * e, 1), jnp.float32)
        return video.sam_heads(model, mem, feats, pix, coords, labels, mask_in, jnp.zeros((1,), bool), True)

    @jax.jit
    def memory_encoder(state, feats, low, obj):
        _, mem = nnx.merge(p.model_key.graphdef, state)
        return video.encode_memory(mem, feats, low, obj, False, size)

    pix = attention(p.state, entries, feats, *args)
    low, _, score = heads(p.state, feats, pix)
    ready = jax.block_until_ready
    return {
        "image_encoder_s": median_time(lambda: ready(p._encode_slice(t))),
        "track_step_s": median_time(lambda: ready(steps.track(p.model_key, p.state, feats, memory))),
        "bank_gather_s": median_time(lambda: ready(p.memory_inputs(obj, t, False))),
        "memory_attention_s": median_time(lambda: ready(attention(p.state, entries, feats, *args))),
        "sam_heads_s": median_time(lambda: ready(heads(p.state, feats, pix))),
        "memory_encoder_s": median_time(lambda: ready(memory_encoder(p.state, feats, low, score))),
        "cache_get_s": median_time(lambda: ready(p.slice_features(t))),
    }


def run_jax(a, vol, slices):
    import jax
    import numpy as np

    from safeclick_jax.inference import VolumePredictor

    p = VolumePredictor.from_checkpoint(a.checkpoint, fill_hole_area=0)
    n, hw = slices.shape[0], slices.shape[1]
    mid, click, steps = plan(n, hw, a.corrections)
    compiles = [0]  # XLA compilations in this process (jax.monitoring)

    def on_event(event, duration_s, **kw):
        compiles[0] += "backend_compile" in event

    jax.monitoring.register_event_duration_secs_listener(on_event)
    res, masks = {}, {}
    # The cold session compiles every step the warm one runs. Its corrections go at most 7 slices
    # each way: enough to meet every compiled shape (memory-slot buckets of 2, 4 and 6 previous
    # slices, the conditioning-slot counts of the warm session's prompts) without tracking the
    # whole volume again. The warm session re-uses the compiled steps on the same volume:
    # set_volume starts a new feature cache, so every slice is encoded again.
    for session, reach in (("cold", 7), ("warm", None)):
        compiled = compiles[0]
        t0 = time.perf_counter()
        p.set_volume(vol, axis=2)
        p.add_prompt(mid, points=click, labels=[1])
        p.propagate()
        res[f"first_mask_{session}_s"] = time.perf_counter() - t0
        masks["first"] = p.slice_logits(1) > 0
        corr = []
        for t, pt in steps:
            time.sleep(a.pause_s)  # untimed: the user looks before clicking again
            t0 = time.perf_counter()
            p.add_prompt(t, points=pt, labels=[0])
            p.propagate(start=t, max_slices=reach)
            corr.append(time.perf_counter() - t0)
        res[f"correction_{session}_s"] = corr
        res[f"compiled_{session}"] = compiles[0] - compiled
    if res["compiled_warm"]:
        print(f"warning: the warm session compiled {res['compiled_warm']} steps", file=sys.stderr)
    assert np.array_equal(p.slices, slices), "the engine's slices differ from the torch side's frames"
    masks["final"] = p.slice_logits(1) > 0
    res.update(cache=p.cache_info(), device=str(jax.devices()[0]))
    if a.profile:
        res["slice_breakdown"] = slice_breakdown(p, steps[-1][0] + 1)
    return res, masks


def run_torch(a, vol, slices):
    import numpy as np
    import sam2.sam2_video_predictor as svp
    import torch

    from benchmarks.common import torch_device, torch_frames, torch_video_predictor

    torch.set_num_threads(2)
    device = torch_device()
    tm = torch_video_predictor(a.model, a.image_size).to(device)
    tm.load_state_dict(torch.load(a.torch_checkpoint, weights_only=True)["model"])  # the JAX side's weights
    n, hw = slices.shape[0], slices.shape[1]
    mid, click, steps = plan(n, hw, a.corrections)
    # SAM2VideoPredictor reads JPEG folders or an mp4; it gets the same slices (resized and
    # normalised as its loader does) when it asks for its frames
    svp.load_video_frames = lambda **kw: (torch_frames(slices, a.image_size).to(device), hw, hw)

    def propagate(state, start=None):
        out = {}
        for rev in (False, True):
            for f, _, m in tm.propagate_in_video(state, start_frame_idx=start, reverse=rev):
                out[f] = (m[0, 0] > 0).cpu().numpy()  # .cpu() also waits for the GPU
        return np.stack([out[f] for f in range(n)])

    res, masks = {}, {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        state = tm.init_state(video_path="(slices)")
        tm.add_new_points_or_box(state, mid, 1, points=click, labels=[1])
        masks["first"] = propagate(state)
        res["first_mask_s"] = time.perf_counter() - t0
        corr = []
        for t, pt in steps:
            time.sleep(a.pause_s)
            t0 = time.perf_counter()
            tm.add_new_points_or_box(state, t, 1, points=pt, labels=[0], clear_old_points=False)
            masks["final"] = propagate(state, start=t)
            corr.append(time.perf_counter() - t0)
        res["correction_s"] = corr
        if a.profile:
            img = torch_frames(slices[:1], a.image_size).to(device)
            res["slice_breakdown"] = {"image_encoder_s": median_time(lambda: tm.forward_image(img))}
    res["torch_threads"] = torch.get_num_threads()
    return res, masks


class LoadSampler:
    """The 1-minute load average every `every` seconds while a child runs (the machine is shared)."""

    def __init__(self, every: float = 10.0):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "mean": statistics.mean(s), "max": max(s)}


def dice(x, y) -> float:
    inter, total = int((x & y).sum()), int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2 * inter / total


def child(a) -> None:
    """One framework at one size; prints RESULT {json} and saves its masks next to the volume."""
    import numpy as np

    vol, slices = np.load(a.volume_file), np.load(a.slices_file)
    res, masks = (run_jax if a.side == "jax" else run_torch)(a, vol, slices)
    res["peak_rss_gib"] = peak_rss_gib()
    np.savez(a.masks_file, **masks)
    print("RESULT " + json.dumps(res), flush=True)


def convert_checkpoint(model: str, size: int, tmp: str) -> tuple[str, str]:
    """(torch .pt, converted JAX model directory) of the seeded random model at `size` px."""
    from benchmarks.common import torch_video_predictor
    from convert.sam2_to_flax import main as convert
    from convert.torch_io import save_torch_state_dict

    pt, out = os.path.join(tmp, f"model_{size}.pt"), os.path.join(tmp, f"ckpt_{size}")
    tm = torch_video_predictor(model, size)
    save_torch_state_dict({k: v.numpy() for k, v in tm.state_dict().items()}, pt)
    if convert(["--checkpoint", pt, "--out", out, "--image-size", str(size)]) != 0:
        raise SystemExit(f"converting {pt} failed")
    return pt, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--sizes", default="512,1024", help="model input sizes (comma-separated)")
    p.add_argument("--slices", default="48", help="slices per volume: one number, or one per size")
    p.add_argument("--hw", type=int, default=256, help="slice height and width in voxels")
    p.add_argument("--corrections", type=int, default=2, help="corrections timed (the median is reported)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-slice breakdown")
    p.add_argument("--pause-s", type=float, default=0.0, help="idle seconds before each correction (untimed)")
    for hidden in ("--side", "--image-size", "--volume-file", "--slices-file", "--masks-file"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--torch-checkpoint", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.side:
        a.image_size = int(a.image_size)
        child(a)
        return

    import numpy as np

    from benchmarks.common import write
    from safeclick_jax.host_memory import glibc_env

    sizes = [int(s) for s in a.sizes.split(",")]
    counts = [int(s) for s in a.slices.split(",")]
    counts = counts * len(sizes) if len(counts) == 1 else counts
    if len(counts) != len(sizes):
        sys.exit(f"--slices {a.slices}: give one number or one per size ({a.sizes})")
    tmp = tempfile.mkdtemp()
    rows, raw = [], {}
    for size, n in zip(sizes, counts):
        vol, slices = make_volume(n, a.hw)
        vpath, spath = os.path.join(tmp, f"vol_{n}.npy"), os.path.join(tmp, f"slices_{n}.npy")
        np.save(vpath, vol)
        np.save(spath, slices)
        pt, ckpt = convert_checkpoint(a.model, size, tmp)
        out, masks = {}, {}
        for side in ("jax", "torch"):
            mpath = os.path.join(tmp, f"masks_{side}_{size}.npz")
            cmd = [sys.executable, __file__, "--side", side, "--image-size", str(size), "--model", a.model]
            cmd += ["--volume-file", vpath, "--slices-file", spath, "--masks-file", mpath]
            cmd += ["--checkpoint", ckpt, "--torch-checkpoint", pt, "--corrections", str(a.corrections)]
            cmd += [] if a.profile else ["--no-profile"]
            cmd += ["--pause-s", str(a.pause_s)]
            t0 = time.perf_counter()
            with LoadSampler() as load:
                env = glibc_env(os.environ) if side == "torch" else None  # JAX as the app runs, torch on glibc
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} @ {size} px failed:\n{proc.stderr[-3000:]}")
            out[side] = json.loads(line[-1][len("RESULT ") :])
            out[side].update(load_average=load.summary(), wall_s=time.perf_counter() - t0)
            masks[side] = np.load(mpath)
            print(side, size, json.dumps(out[side]), flush=True)
        out["dice"] = {k: dice(masks["jax"][k], masks["torch"][k]) for k in ("first", "final")}
        raw[f"{size}px_{n}slices"] = out
        j, t = out["jax"], out["torch"]
        jc, tc = statistics.median(j["correction_warm_s"]), statistics.median(t["correction_s"])
        rows.append(
            {
                "size px": size,
                "slices": n,
                "first mask JAX cold s": j["first_mask_cold_s"],
                "first mask JAX warm s": j["first_mask_warm_s"],
                "first mask torch s": t["first_mask_s"],
                "first mask torch/JAX (warm)": t["first_mask_s"] / j["first_mask_warm_s"],
                "correction JAX s": jc,
                "correction torch s": tc,
                "correction torch/JAX": tc / jc,
                "peak RSS JAX GiB": j["peak_rss_gib"],
                "peak RSS torch GiB": t["peak_rss_gib"],
                "Dice JAX-torch final": out["dice"]["final"],
                "JAX warm compiles": j["compiled_warm"],
                "load avg mean (max)": f"{statistics.mean([j['load_average']['mean'], t['load_average']['mean']]):.2f} "
                f"({max(j['load_average']['max'], t['load_average']['max']):.2f})",
            }
        )
    write(
        "interactive",
        rows,
        list(rows[0]),
        {
            "model": a.model,
            "hw": a.hw,
            "corrections": a.corrections,
            "volume": "synthetic: a bright disk shrinking away from the middle slice, on Gaussian noise",
            "command": " ".join(["python", "benchmarks/bench_interactive.py"] + sys.argv[1:]),
            "raw": raw,
            "note": "one run; each framework and size in its own process, in turn; JAX correction = median of the "
            "warm session's corrections; load average: 1-minute, sampled every 10 s during each process",
        },
    )


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # the JAX side as the app runs; the torch side gets glibc_env
    main()
