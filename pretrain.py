"""Pretrain the stand-in SAM 2 (`make pretrain`): a sam2.1 tiny trained from random weights on
procedural data, a decoder phase, an image phase and a clip phase, followed by its zero-shot quality.

  python pretrain.py [--workdir workdir/standin] [--smoke] [--set=--config.train.total_steps=100 ...]

1. data: the procedural volumes of configs/standin.py (data.roots), generated when absent;
2. decoder phase: train.py --config configs/standin.py:decoder --workdir W/decoder (the prompt
   encoder and mask decoder on single slices over the frozen random encoder: learning to follow
   the click, from cached features);
3. image phase: train.py --config configs/standin.py:image --workdir W/image, initialised from the
   decoder phase's export (clips of one slice: SAM 2's image training, every part trained);
4. clip phase: train.py --config configs/standin.py:clip --workdir W/clip, initialised from the
   image phase's export (clips of consecutive slices: the memory path learns to track);
5. W/export: the clip phase's export, a complete model directory (encoder, decoder, memory path)
   that every tool opens, and that `make train`, `make table2`, `make app` and evaluate.py then
   start from (safeclick_jax/standin.py);
6. zero-shot (safeclick_jax/evaluation/zero_shot.py) on the synthetic abdomen's test split and on
   held-out procedural volumes: W/zero_shot_abdomen/, W/zero_shot_procedural/, and W/summary.md
   (time and loss of each phase, the zero-shot tables).

Progress with ETA and exact resume are train.py's: rerunning the command resumes the phase that was
stopped, and a phase whose export exists is done and skipped. On a CPU the phases train at 128 px
and together within 30 minutes; on a GPU/TPU the same command trains at the model's own size
(configs/standin.py). `--smoke`: a miniature model for a few steps, to test the pipeline. Exit
status: 0, or the stopped phase's (2 bad input, 3 diverged, 4 preempted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
PHASES = ("decoder", "image", "clip")
CONFIG = "configs/standin.py"


def log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phase_config(phase: str, smoke: bool) -> str:
    return f"{CONFIG}:{phase}" + (",smoke" if smoke else "")


def ensure_data(smoke: bool) -> None:
    """Generates the procedural volumes the phases train on when their folder is missing (the
    training loop then prepares them)."""
    from configs import standin as standin_config
    from safeclick_jax.data import write_synthetic

    dc = standin_config.get_config(phase_config(PHASES[0], smoke).split(":")[1]).data
    root = Path(dc.synthetic_root)
    if not root.exists():
        log(f"generating {dc.synthetic_volumes} {dc.synthetic_kind} volumes {tuple(dc.synthetic_shape)} in {root}")
        write_synthetic(dc.synthetic_kind, root, dc.synthetic_volumes, dc.synthetic_seed, dc.synthetic_shape)


def run_phase(phase: str, workdir: Path, init: str | None, smoke: bool, extra: list[str]) -> float:
    """train.py for one phase (its output streamed); returns seconds; exits with its status on failure."""
    cmd = [sys.executable, "train.py", f"--config={phase_config(phase, smoke)}", f"--workdir={workdir}"]
    if init is not None:
        cmd.append(f"--config.init.checkpoint={init}")
    cmd += extra
    log(f"{phase} phase: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0:
        log(f"{phase} phase stopped with exit status {rc}; rerun the same command to resume it")
        sys.exit(rc)
    return time.perf_counter() - t0


def copy_export(src: Path, dst: Path) -> None:
    """dst = a copy of the model directory src, replaced in one rename (never half written)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def loss_curve(workdir: Path) -> list[tuple[int, float]]:
    """(step, training loss) from the phase's metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r and "step" in r]


def summary_md(workdir: Path, times: dict, zero_shot: dict) -> str:
    """The phases (command time, else the phase's own wall time from its summary.json; steps; the
    training loss at the first and last logged step) and the zero-shot tables."""
    cmd = " ".join(["pretrain.py", *sys.argv[1:]])
    md = ["# The stand-in SAM 2", "", f"`python {cmd}`, {os.cpu_count()} CPU cores", ""]
    md += ["| phase | time | steps | steps / s | loss first -> last | curves |", "|---|---:|---:|---:|---|---|"]
    for phase in PHASES:
        curve = loss_curve(workdir / phase)
        path = workdir / phase / "summary.json"
        run = json.loads(path.read_text()) if path.exists() else {"wall_seconds": None, "steps": "n/a"}
        seconds = times[phase] if phase in times else run["wall_seconds"]
        minutes = "n/a" if seconds is None else f"{seconds / 60:.1f} min"
        speed = f"{run['steps_per_s']:.2f}" if "steps_per_s" in run else "n/a"
        loss = f"{curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else "n/a"
        md.append(f"| {phase} | {minutes} | {run['steps']} | {speed} | {loss} | {phase}/curves.png |")
    md.append("")
    for name, path in zero_shot.items():
        md += [f"## Zero-shot on {name}", "", *path.read_text().splitlines()[2:], ""]
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="workdir/standin", help="phases, export and reports go here")
    p.add_argument("--smoke", action="store_true", help="a miniature model, a few steps (tests)")
    p.add_argument("--set", action="append", default=[], help="extra train.py flag for both phases")
    p.add_argument("--max-cases", type=int, default=None, help="zero-shot on at most this many volumes")
    args = p.parse_args(argv)
    os.chdir(REPO)  # data and workdir paths are relative to the repository, as train.py's
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ensure_data(args.smoke)
    times, init = {}, None
    for phase in PHASES:
        export = work / phase / "export"
        if (export / "model.json").exists():
            log(f"{phase} phase: done ({export}); delete {work / phase} to train it again")
        else:
            times[phase] = run_phase(phase, work / phase, init, args.smoke, args.set)
        init = str(export)
    copy_export(Path(init), work / "export")
    log(f"the stand-in: {work / 'export'} ({(time.perf_counter() - t0) / 60:.1f} min so far)")

    from safeclick_jax.evaluation import zero_shot

    reports = {}
    for data in ("abdomen", "procedural"):
        out = work / f"zero_shot_{data}"
        zero_shot.evaluate(str(work / "export"), zero_shot.DATASETS[data], out, max_cases=args.max_cases, log=log)
        reports[data] = out / "zero_shot.md"
    times["total"] = time.perf_counter() - t0
    (work / "summary.md").write_text(summary_md(work, times, reports))
    print((work / "summary.md").read_text())
    log(f"done in {times['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # re-executes once with the host allocator (safeclick_jax/host_memory.py)
    sys.exit(main())
