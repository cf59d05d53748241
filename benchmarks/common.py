"""Timing helpers shared by the benchmark scripts: median of repeated runs after warm-up,
compile time (first call) reported separately, results written as JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

# XLA:CPU's dots through oneDNN's graph API, the path from XLA to AMX (benchmarks/RESULTS.md): as
# compile options (DebugOptions fields) and as XLA_FLAGS. ONEDNN_DEFAULT_FPMATH_MODE=BF16 then lets
# oneDNN compute these fp32 dots in bf16.
ONEDNN_DOTS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
ONEDNN_DOTS_FLAGS = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"


def time_fn(fn, repeats: int, warmup: int = 1) -> dict:
    """fn() must block until its result is ready. Returns first-call and steady-state seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def time_interleaved(fns: dict, repeats: int, warmup: int = 1, settle_s: float = 0.1) -> dict:
    """Like time_fn for several functions, called in turn (a, b, b, a, ...) so that each round sees
    the same machine state: on a shared 2-core VM the speed drifts by 10-20 % over a minute, which
    would bias back-to-back blocks of runs. Returns {name: time_fn-style dict}; each dict also has
    `round_s`, the per-round times, from which `ratio` computes a median of per-round ratios.

    Before each timed call the process sleeps settle_s (untimed): torch's OpenMP threads keep
    spinning for some milliseconds after a torch call and would take the cores from a JAX call that
    starts at once, so every call starts from an idle machine instead."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[name] = {"first_s": time.perf_counter() - t0, "round_s": []}
    for _ in range(max(warmup - 1, 0)):
        for fn in fns.values():
            fn()
    names = list(fns)
    for i in range(repeats):
        # Odd rounds run in reverse order (a b, b a, ...): a call can leave the machine warmer or
        # colder (caches, allocator state) for the next one; alternating cancels that bias.
        for name in names if i % 2 == 0 else names[::-1]:
            fn = fns[name]
            time.sleep(settle_s)
            t0 = time.perf_counter()
            fn()
            out[name]["round_s"].append(time.perf_counter() - t0)
    for r in out.values():
        r.update(median_s=statistics.median(r["round_s"]), min_s=min(r["round_s"]), repeats=repeats)
    return out


def serve(fn, report) -> None:
    """The worker side of time_in_processes: calls fn once (compile, warm-up) and replies with its
    time, then answers each `run` on stdin with fn's time and `report` with report()'s dict, until
    stdin closes. Replies are stdout lines `BENCH <json>`; other output passes through."""
    t0 = time.perf_counter()
    fn()
    _reply({"first_s": time.perf_counter() - t0})
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            fn()
            _reply({"s": time.perf_counter() - t0})
        elif line.strip() == "report":
            _reply(report())


def _reply(d: dict) -> None:
    print("BENCH " + json.dumps(d), flush=True)


def _ask(proc, name: str, command: str | None) -> dict:
    if command:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH ") :])
        print(line, end="", flush=True)
    raise RuntimeError(f"the {name} worker exited with status {proc.wait()} (its stderr is above)")


def time_in_processes(commands: dict, repeats: int, settle_s: float = 0.1, envs: dict | None = None) -> tuple:
    """time_interleaved with each function in a worker process of its own: commands maps a name to
    the argv of a program that ends in serve(fn, report). The rounds alternate as in
    time_interleaved, but the frameworks share no allocator, heap or thread pool, and each can
    run with the host allocator that suits it (safeclick_jax/host_memory.py). Workers
    start one after the other (each compiles alone) and stay alive through the rounds; envs: a
    worker's environment where it differs from this process's. Returns
    ({name: time_interleaved-style dict}, {name: its report()})."""
    procs, out = {}, {}
    try:
        for name, cmd in commands.items():
            env = dict((envs or {}).get(name) or os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # a GPU is shared
            procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            out[name] = {"first_s": _ask(procs[name], name, None)["first_s"], "round_s": []}
        names = list(commands)
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                time.sleep(settle_s)
                out[name]["round_s"].append(_ask(procs[name], name, "run")["s"])
        reports = {name: _ask(proc, name, "report") for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    for r in out.values():
        r.update(median_s=statistics.median(r["round_s"]), min_s=min(r["round_s"]), repeats=repeats)
    return out, reports


def ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's time / b's time (both from one time_interleaved call)."""
    return statistics.median(x / y for x, y in zip(a["round_s"], b["round_s"]))


VECTOR_FLAGS = ("avx2", "fma", "avx512", "amx", "avx_vnni", "f16c")  # prefixes of the flags the md line names


def cpu_info() -> dict:
    """lscpu's model name and flags (the speed of XLA:CPU and oneDNN depends on the vector
    extensions: AVX2, AVX-512, AVX512_BF16, AMX); {} where lscpu is missing."""
    import subprocess

    try:
        env = dict(os.environ, LC_ALL="C")
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env=env).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("Flags", "").split()
    return {
        "model_name": fields.get("Model name", ""),
        "family_model": f"{fields.get('CPU family', '?')}/{fields.get('Model', '?')}",
        "cpus": fields.get("CPU(s)", ""),
        "vector_flags": [f for f in flags if f.startswith(VECTOR_FLAGS)],
        "flags": flags,
    }


def cpu_line() -> str:
    """'AMD EPYC (family/model 25/17; avx2 avx512f ...)': the CPU as the result files name it."""
    c = cpu_info()
    if not c:
        return platform.processor() or platform.machine()
    return f"{c['model_name']} (family/model {c['family_model']}; {' '.join(c['vector_flags']) or 'no AVX2'})"


def machine() -> dict:
    import jax
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "lscpu": cpu_info(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [getattr(d, "device_kind", str(d)) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def results_dir() -> str:
    """benchmarks/results, or $BENCH_RESULTS (runs on a lent GPU write elsewhere)."""
    return os.environ.get("BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")


def write(name: str, rows: list[dict], columns: list[str], meta: dict) -> str:
    out = results_dir()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"machine": machine(), **meta, "rows": rows}, f, indent=2)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    m = machine()
    where = f"{m['jax_devices'][0]}" if m["jax_backend"] != "cpu" else f"{cpu_line()}, {m['cores']} cores"
    md = (
        "\n".join(lines) + f"\n\nMachine: {where}, jax {m['jax']} ({m['jax_backend']}), "
        f"torch {m['torch']} ({m['torch_cuda'] or str(m['torch_threads']) + ' threads'}).\n"
    )
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return md


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def torch_device() -> str:
    """Where the torch side runs: the GPU when torch sees one (benchmarks/gpu_run.sh), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_video_predictor(model: str, image_size: int, seed: int = 0):
    """The torch SAM2VideoPredictor the JAX engine is compared with: torch's default random init
    (seeded, so every process builds the same weights), eval mode, CPU.

    The object score bias makes the object present on every slice, so every step does the full
    work and the masks are not empty (a comparison of masks then means something). Hole filling
    off (SAM 2 runs it only with its CUDA extension; the JAX engine is built with fill_hole_area=0
    to match), and a corrected slice becomes a conditioning slice, the JAX engine's semantics."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    version = model.split("_hiera_")[0]
    torch.manual_seed(seed)
    tm = build_sam2_video_predictor(
        f"configs/{version}/{model}.yaml",
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={image_size}"],
    ).eval()
    with torch.no_grad():
        tm.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(20.0)
    tm.fill_hole_area = 0
    tm.add_all_frames_to_correct_as_cond = True
    return tm


def torch_frames(slices_uint8, image_size: int):
    """What SAM2VideoPredictor's load_video_frames makes of an image folder, from a uint8 slice
    stack [N, H, W]: grey to RGB, resized to the model input, ImageNet-normalised [N, 3, S, S]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(slices_uint8).float()[:, None].expand(-1, 3, -1, -1) / 255.0
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std
