"""Training with XLA:CPU's dots in oneDNN at bf16 fpmath (the path to AMX) against fp32: the loss
curve of the stand-in's image phase (configs/standin.py:image: the whole sam2.1 tiny from random
weights, 128 px on a CPU), three runs of `train.py` from the same init and the same data:

- fp32: XLA's default dots (YNNPACK);
- noise: the same with another train.seed (other dropout and drop-path draws): the run-to-run
  noise that a change of numerics has to stay within;
- onednn: XLA_FLAGS `--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot` and
  ONEDNN_DEFAULT_FPMATH_MODE (default BF16), which lets oneDNN compute fp32 dots in bf16 (on AMX
  where the CPU has it; a CPU without AMX keeps fp32 kernels).

    python benchmarks/bf16_training.py [--steps 100] [--fpmath BF16] [--name bf16_training]

Reports per run how it ended, the mean loss over windows of steps, the mean |loss - fp32's| over
the windows and the steps per second; `within noise` says whether onednn's distance from fp32 is at
most noise's. jaxlib 0.10.2's oneDNN path aborts this step (benchmarks/onednn_check.py): the
onednn run then ends "killed by SIGILL", as recorded.
Writes benchmarks/results/NAME.{json,md} ($BENCH_RESULTS overrides the folder); the runs' work
folders are temporary.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import ONEDNN_DOTS_FLAGS, write  # noqa: E402
from safeclick_jax.training.metrics import read_jsonl  # noqa: E402


def train(workdir: Path, steps: int, seed: int, env: dict) -> tuple[list[dict], str]:
    """One run of train.py: its per-step metrics rows, and how it ended."""
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--config=configs/standin.py:image",
        f"--workdir={workdir}",
        f"--config.train.total_steps={steps}",
        "--config.train.log_every=1",
        f"--config.train.seed={seed}",
        "--config.eval.every_epochs=100000",
    ]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    if code < 0:  # XLA's oneDNN path aborts on partitions oneDNN cannot compile (onednn_check.py)
        return rows, f"killed by {signal.Signals(-code).name} after {len(rows)} steps"
    if code or len(rows) != steps:
        return rows, f"exit {code} after {len(rows)} of {steps} steps"
    return rows, "done"


def windows(losses: list[float], n: int) -> list[float]:
    size = max(len(losses) // n, 1)
    return [statistics.fmean(losses[i : i + size]) for i in range(0, len(losses) - size + 1, size)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=10, help="loss windows compared")
    p.add_argument("--fpmath", default="BF16", help="ONEDNN_DEFAULT_FPMATH_MODE of the onednn run (STRICT: fp32)")
    p.add_argument("--name", default="bf16_training")
    a = p.parse_args()
    base = dict(os.environ)
    flags = f"{base.get('XLA_FLAGS', '')} {ONEDNN_DOTS_FLAGS}".strip()
    onednn = dict(base, XLA_FLAGS=flags, ONEDNN_DEFAULT_FPMATH_MODE=a.fpmath)
    runs = {"fp32": (0, base), "noise": (1, base), "onednn": (0, onednn)}
    curves, rates, ends = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bf16_training_") as tmp:
        for name, (seed, env) in runs.items():
            rows, ends[name] = train(Path(tmp) / name, a.steps, seed, env)
            if ends[name] == "done":
                curves[name] = windows([r["loss"] for r in rows], a.windows)
                rates[name] = statistics.median(r["steps_per_s"] for r in rows[len(rows) // 2 :])
    if "fp32" not in curves:
        raise SystemExit(f"the fp32 run did not finish: {ends['fp32']}")
    ref = curves["fp32"]
    dist = {k: statistics.fmean(abs(x - y) for x, y in zip(c, ref)) for k, c in curves.items()}
    rows = []
    for name in runs:
        row = {
            "run": name,
            "env": f"XLA_FLAGS={ONEDNN_DOTS_FLAGS} ONEDNN_DEFAULT_FPMATH_MODE={a.fpmath}" if name == "onednn" else "",
            "train.seed": runs[name][0],
            "ended": ends[name],
        }
        if name in curves:
            row.update(
                {
                    "first window loss": curves[name][0],
                    "last window loss": curves[name][-1],
                    "mean abs(loss - fp32)": dist[name],
                    "steps/s": rates[name],
                }
            )
        rows.append(row)
    verdict = "onednn" in dist and "noise" in dist and dist["onednn"] <= dist["noise"]
    print(f"onednn within noise: {verdict} ({', '.join(f'{k} {v:.4g}' for k, v in dist.items())}; {ends})", flush=True)
    meta = {"steps": a.steps, "windows": curves, "within_noise": verdict, "fpmath": a.fpmath}
    cols = ["run", "env", "train.seed", "ended", "first window loss", "last window loss", "mean abs(loss - fp32)"]
    cols.append("steps/s")
    write(a.name, rows, cols, meta)


if __name__ == "__main__":
    main()
