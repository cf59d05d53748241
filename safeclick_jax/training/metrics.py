"""What a run reports: progress lines, WORKDIR/metrics.jsonl, TensorBoard events, curves PNG.

metrics.jsonl has one JSON object per line: per logged train step {"step", "epoch", "loss",
"focal", "dice", "iou", "class", "grad_norm", "lr", "steps_per_s", "images_per_s"}; per
evaluation {"step", "epoch", "val_dice", "val_dice_point", "val_dice_box"}. On a restart the
lines after the restored step are dropped first, so the file of a resumed run equals that of an
uninterrupted one (up to the timing fields).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TIMING_KEYS = ("steps_per_s", "images_per_s", "time")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    def __init__(self, workdir, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:  # TensorBoard files are optional
            self.tb = None

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}" if not k.startswith("val") else f"val/{k}", v, record["step"])

    def close(self):
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Progress lines: step, epoch, loss, steps/s and images/s since the last line, ETA."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, log=print):
        self.total, self.images, self.log = total_steps, images_per_step, log
        self.t_last, self.s_last = time.perf_counter(), start_step
        self.t0, self.s0 = self.t_last, start_step

    def rates(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        sps = (step - self.s_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.s_last = now, step
        return sps, sps * self.images

    def line(self, step: int, epoch: int, m: dict, sps: float) -> str:
        done = max(step - self.s0, 1)
        avg = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(avg, 1e-9)
        return (
            f"step {step}/{self.total} epoch {epoch} loss {m['loss']:.4f} (focal {m['focal']:.4f} "
            f"dice {m['dice']:.4f} iou {m['iou']:.4f}) lr {m['lr']:.2e} {sps:.2f} steps/s "
            f"{sps * self.images:.1f} img/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )


def plot_curves(metrics_path, out_png) -> Path | None:
    """Loss (left) and validation Dice (right) against the step."""
    rows = read_jsonl(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_dice" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="training")
    val_loss = [(r["step"], r["val_loss"]) for r in val if "val_loss" in r]  # the clip task's
    if val_loss:
        a.plot(*zip(*val_loss), marker="o", label="validation")
        a.legend()
    a.set(xlabel="step", ylabel="loss", title="loss")
    a.set_yscale("log")
    for key, label in (("val_dice", "all"), ("val_dice_point", "clicks"), ("val_dice_box", "boxes")):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            b.plot(*zip(*pts), marker="o", label=label)
    b.set(xlabel="step", ylabel="Dice", title="validation Dice")
    if val:  # a run without validation (the clip task) has no curve to name
        b.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
