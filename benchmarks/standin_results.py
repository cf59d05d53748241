"""What the stand-in SAM 2 gives the project, measured in one command (`make standin-results`):
the demo, Table 2 in miniature on its frozen encoder, and the CVPR 2025 interactive protocol.

  python benchmarks/standin_results.py                       # after `make pretrain`
  python benchmarks/standin_results.py --all                 # every run (longer; see below)
  python benchmarks/standin_results.py --parts protocol      # one part (its section is updated)
  python benchmarks/standin_results.py --standin DIR --quick # a smoke stand-in, tiny schedules (tests)

From a stand-in model directory (--standin, default workdir/standin/export, `make pretrain`):

demo      `make train`'s model on the stand-in (workdir/sam2_t, what `make app` serves; trained
          unless its export was trained from this stand-in), then the app's demo on the example
          volume (demo.py): one click at the deepest point of the liver on its largest slice
          (zero_shot.deepest_click), propagation with the app's engine (app.server.engine_factory),
          3D Dice of the liver and 2D Dice on the clicked slice.
table2    benchmarks/table2_mini.py on the stand-in's frozen encoder: seed 0 on the synthetic
          abdomen (--ablations: also no_e1 / no_e2 / no_crl); --all: the ablations, seed 1 and the
          held-out abdomen (data seed 1, training seed 0). Per run: the IP averages of every
          model, SAM 2's drop from PP to its worst IP condition per prompt type, SafeClick - SAM 2
          on both IP averages, F_conv and alpha of the SafeClick model (table2_mini.consensus_path).
protocol  evaluate.py --protocol interactive on the abdomen's test volumes (--max-cases, 1 unless
          --all: a volume costs about 5 minutes on 2 CPU cores) with the zero-shot
          stand-in, the fine-tuned SAM 2 and SafeClick of table2's seed 0, and a SAM 2 fine-tuned
          with the `full` task from the stand-in (its memory path too; --full-steps): DSC_AUC,
          NSD_AUC, final DSC / NSD, NoC@85/90, and a check that NSD is gated per case on its
          multi-class mean Dice > 0.2 (CVPR25_iter_eval.py).

Writes --out/summary.md and summary.json (the parts run so far for this stand-in; a rerun of one
part updates its section) beside each run's own files; models and logs go to --workdir. Every
trained model is kept and reused while the stand-in is unchanged (a model older than the
stand-in's model.json is trained again). Prints the expected time of the chosen parts first:
about 25 minutes on a 2-core CPU by default, 69 with --all (EXPECTED_MIN).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("demo", "table2", "protocol")
# The table2 runs: name -> table2_mini.py flags; seed1 and heldout with --all only
TABLE2_RUNS = {
    "seed0": ["--seed=0"],
    "seed1": ["--seed=1"],
    "heldout": ["--seed=0", "--root=data/abdomen_seed1", "--cache-dir=data/cache/abdomen_seed1", "--data-seed=1"],
}
# Minutes of each step on the 2-core CPU at the default settings with a stand-in of the real size
# (sam2.1 tiny, 128 px), printed before a run as its expected time; measured (benchmarks/RESULTS.md).
EXPECTED_MIN = {
    "demo": 5.0,
    "table2 seed0": 8.1,
    "table2 ablations": 14.8,
    "table2 seed1": 8.0,
    "table2 heldout": 10.0,
    "protocol fixed": 7.1,  # the `full` fine-tune; compiling and NoC are in the per-volume time
    "protocol per volume": 5.2,
}
TEST_VOLUMES = 3  # the synthetic abdomen's test split (15 volumes split 10 / 2 / 3)
QUICK_TRAIN = ["--config.train.epochs=1", "--config.train.steps_per_epoch=2", "--config.eval.max_rois=2"]
# make train's data (configs/common.py), given again where a variant (smoke) changes it
ABDOMEN = [
    '--config.data.roots=("data/abdomen",)',
    "--config.data.cache_dir=data/cache/abdomen",
    "--config.data.synthetic_root=data/abdomen",
    "--config.data.synthetic_kind=abdomen",
    "--config.data.synthetic_volumes=15",
]
LIVER = 1  # synthetic_abdomen.LABELS
TARGETS = {"demo_dice_3d": 0.7, "sam2_drop": 10.0, "safeclick_gain": 3.0}
NAMES = {
    "zero_shot": "Zero-shot stand-in",
    "sam2": "SAM 2 (fine-tuned decoder)",
    "safeclick": "SafeClick (SAM 2)",
    "full": "SAM 2 (full fine-tune)",
}


def log(msg: str) -> None:
    print(f"[standin-results {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], logfile: Path) -> float:
    """cmd in the repository with its output in logfile; the wall time; exits with the log's tail."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        rc = subprocess.call([sys.executable, *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "\n".join(logfile.read_text().splitlines()[-30:])
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... failed (exit {rc}); {logfile}:\n{tail}")
    return time.perf_counter() - t0


def stale(workdir: Path, standin: Path) -> bool:
    """A training workdir started from something else than this stand-in, or before it was written
    (train.py writes config.json when it starts)."""
    config = workdir / "config.json"
    if not config.exists():
        return False
    init = json.loads(config.read_text())["init"]["checkpoint"]
    same = init is not None and (REPO / init).resolve() == standin.resolve()
    return not same or config.stat().st_mtime < (standin / "model.json").stat().st_mtime


def trained_from(workdir: Path, standin: Path) -> bool:
    """A training workdir whose export was trained from this stand-in."""
    return (workdir / "export" / "model.json").exists() and not stale(workdir, standin)


def clear_stale(workdir: Path, standin: Path, keep_aside: bool) -> None:
    """A stale workdir goes (a run of this stand-in that stopped stays, train.py resumes it):
    renamed aside (keep_aside: a workdir the user has, such as `make train`'s) or removed (this
    script's own)."""
    if not stale(workdir, standin):
        return
    if keep_aside:
        aside = workdir.with_name(f"{workdir.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
        log(f"{workdir} was not trained from {standin}: moved to {aside}")
        workdir.rename(aside)
    else:
        log(f"{workdir} was not trained from {standin}: removed, trained again")
        shutil.rmtree(workdir)


class Runner:
    def __init__(self, args):
        self.a = args
        self.standin = Path(args.standin)
        self.work, self.out = Path(args.workdir), Path(args.out)
        self.smoke = ["--smoke"] if args.quick else []

    def rel(self, path: Path) -> str:
        """A path as train.py records it (relative to the repository when inside it)."""
        path = Path(path).resolve()
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    def config(self, variants: str) -> str:
        """configs/sam2_t.py with `variants`, and `smoke` on a smoke stand-in (--quick)."""
        v = ",".join(x for x in (variants, "smoke" if self.a.quick else "") if x)
        return "configs/sam2_t.py" + (f":{v}" if v else "")

    # --- demo ---------------------------------------------------------------------------------

    def demo_workdir(self) -> Path:
        """`make train`'s workdir (what `make app` serves) for the default stand-in, else our own."""
        import demo
        from safeclick_jax import standin

        mine = self.a.quick or not standin.is_standin(str(self.standin))
        return self.work / "demo" if mine else demo.DEMO_WORKDIR

    def demo(self) -> dict:
        import demo

        wd = self.demo_workdir()
        clear_stale(wd, self.standin, keep_aside=wd == demo.DEMO_WORKDIR)
        t0 = time.perf_counter()
        if trained_from(wd, self.standin):
            log(f"demo model: {wd}/export, trained from the stand-in (reused)")
        else:
            # `make train` = train.py --config configs/sam2_t.py --workdir workdir/sam2_t; its
            # init.checkpoint defaults to the stand-in at workdir/standin/export, given here for any
            cmd = ["train.py", f"--config={self.config('')}", f"--workdir={wd}"]
            cmd += [f"--config.init.checkpoint={self.rel(self.standin)}"]
            cmd += (QUICK_TRAIN + ABDOMEN + ["--config.plot=False"]) if self.a.quick else []
            log(f"demo model: training `make train`'s model -> {wd} (log {self.work / 'demo.log'})")
            run(cmd, self.work / "demo.log")
        train_s = time.perf_counter() - t0
        return {"model": str(wd / "export"), "train_s": train_s, **self.demo_click(wd / "export")}

    def demo_click(self, export: Path) -> dict:
        """The issue's demo with the app's engine: one click at the liver's deepest point, P."""
        import numpy as np

        import demo
        from safeclick_jax.app.server import engine_factory
        from safeclick_jax.data.volume_file import read_volume
        from safeclick_jax.evaluation.zero_shot import deepest_click, dice

        path = demo.example_volume(self.work / "example")
        _, labels, _ = demo.example_case()
        liver = labels == LIVER
        t0 = time.perf_counter()
        engines = engine_factory(str(export), untrained_memory=True)  # as demo.py starts the app
        engine = engines()
        engine.set_volume(read_volume(str(path)), axis=2, normalization="auto")  # the app's defaults
        z, row, col = deepest_click(np.moveaxis(liver, 2, 0))  # slices along the file's third axis
        t, x, y = engine.voxel_to_slice((row, col, z))
        t1 = time.perf_counter()
        engine.add_prompt(t, points=[[x, y]], labels=[1], obj_id=1)
        t2 = time.perf_counter()
        pred = np.asarray(engine.propagate()) == 1
        t3 = time.perf_counter()
        per_slice = [dice(pred[:, :, k], liver[:, :, k]) for k in range(liver.shape[2]) if liver[:, :, k].any()]
        out = {
            "volume": str(path),
            "shape": [int(n) for n in liver.shape],
            "memory": engines.memory_note or "the model directory's own",
            "click_voxel": [int(row), int(col), int(z)],
            "dice_2d": dice(pred[:, :, z], liver[:, :, z]),
            "dice_3d": dice(pred, liver),
            "liver_slices": len(per_slice),
            "slice_dice_min": float(min(per_slice)),
            "slice_dice_median": float(np.median(per_slice)),
            "load_s": t1 - t0,
            "click_s": t2 - t1,
            "propagate_s": t3 - t2,
        }
        log(
            f"demo: liver 2D Dice {out['dice_2d']:.3f} (slice {z}), 3D Dice {out['dice_3d']:.3f} "
            f"over {liver.shape[2]} slices (target >= {TARGETS['demo_dice_3d']})"
        )
        return out

    # --- table2 -------------------------------------------------------------------------------

    def table2_run(self, name: str) -> dict:
        flags = TABLE2_RUNS[name] + (["--ablations"] if name == "seed0" and self.a.ablations else [])
        wd, out = self.work / "table2" / name, self.out / "table2" / name
        for sub in ("baseline", "safeclick", "no_e1", "no_e2", "no_crl"):
            clear_stale(wd / sub, self.standin, keep_aside=False)
        cmd = ["benchmarks/table2_mini.py", f"--checkpoint={self.rel(self.standin)}", f"--workdir={wd}"]
        cmd += [f"--out={out}", "--reuse", *flags, *self.smoke]
        if self.a.quick:
            cmd += ["--epochs=1", "--steps-per-epoch=2", "--eval-max-rois=2", "--max-slices=2"]
        log(f"table2 {name}: {' '.join(cmd[1:])} (log {self.work / 'table2' / (name + '.log')})")
        seconds = run(cmd, self.work / "table2" / f"{name}.log")
        res = json.loads((out / "results.json").read_text())
        # the run's cost: reused models at the time they took to train
        seconds = res["times_s"].get("total with the reused training", seconds)
        return {"seconds": seconds, **table2_numbers(res)}

    # --- protocol -----------------------------------------------------------------------------

    def full_model(self) -> tuple[Path, float]:
        """SAM 2 fine-tuned from the stand-in with the `full` task: encoder, memory path and decoder
        on clips of the abdomen, at the decoder fine-tunes' lr (1e-4) for --full-steps steps."""
        wd = self.work / "full"
        clear_stale(wd, self.standin, keep_aside=False)
        if trained_from(wd, self.standin):
            log(f"full fine-tune: {wd}/export (reused)")
            return wd, 0.0
        cmd = ["train.py", f"--config={self.config('full,baseline')}", f"--workdir={wd}"]
        cmd += [f"--config.init.checkpoint={self.rel(self.standin)}", "--config.plot=False", *ABDOMEN]
        cmd += [f"--config.optim.lr={self.a.full_lr}", f"--config.train.total_steps={self.a.full_steps}"]
        log(f"full fine-tune: {' '.join(cmd[1:])} (log {self.work / 'full.log'})")
        return wd, run(cmd, self.work / "full.log")

    def protocol(self) -> dict:
        t0 = time.perf_counter()
        seed0 = self.work / "table2" / "seed0"
        if not all(trained_from(seed0 / m, self.standin) for m in ("baseline", "safeclick")):
            log("protocol: the fine-tuned SAM 2 and SafeClick come from table2's seed-0 run; running it")
            self.table2_run("seed0")
        full, _ = self.full_model()
        models = {
            "zero_shot": self.standin,
            "sam2": seed0 / "baseline",
            "safeclick": seed0 / "safeclick",
            "full": full,
        }
        out = self.out / "protocol"
        cmd = ["evaluate.py", "--protocol=interactive", f"--config={self.config('')}"]
        cmd += ["--cache_dir=data/cache/abdomen", f"--workdir={out}", "--progress=False"]
        for key, d in models.items():
            cmd += [f"--checkpoint={d}", f"--name={NAMES[key]}"]
        cmd += [f"--noc_max_rois={self.a.noc_rois}"] + ([f"--max_cases={self.a.max_cases}"] if self.a.max_cases else [])
        log(f"protocol: {' '.join(cmd[1:])} (log {self.work / 'protocol.log'})")
        eval_s = run(cmd, self.work / "protocol.log")
        res = protocol_numbers(out)
        return {"seconds": time.perf_counter() - t0, "evaluate_s": eval_s, **res}


# --- numbers from the runs' files ---------------------------------------------------------------


def table2_numbers(res: dict) -> dict:
    """From table2_mini's results.json: per model PP and IP average per prompt type; SAM 2's drop
    from PP to its worst IP condition; SafeClick - SAM 2 on the IP averages; the consensus path."""
    from benchmarks.table2_mini import BASELINE, SAFECLICK

    dice = res["dice"]  # model -> the 12 columns of report.COLUMNS
    base, cand = dice[BASELINE], dice[SAFECLICK]
    models = {
        m: {"point_pp": row[0], "point_ip": row[5], "box_pp": row[6], "box_ip": row[11]} for m, row in dice.items()
    }
    return {
        "models": models,
        "sam2_drop": {"point": base[0] - min(base[1:5]), "box": base[6] - min(base[7:11])},
        "gain_ip": {"point": cand[5] - base[5], "box": cand[11] - base[11]},
        "consensus_path": res["consensus_path"],
        "reused_untimed": res.get("reused_untimed", []),
        "steps": res["steps"],
        "rois": res["rois"],
        "image_size": res["image_size"],
    }


def _value(v: str):
    """A CSV cell as written by csv.DictWriter: True / False, a number, else text (names)."""
    if v in ("True", "False"):
        return v == "True"
    try:
        return float(v)
    except ValueError:
        return v


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def protocol_numbers(out: Path) -> dict:
    """The challenge's scores per model (interactive.summarize), NoC (noc.summarize), and the check
    of the per-case NSD gate on interactive_cases.csv: every case step whose mean Dice over its
    labels is <= 0.2 scores NSD 0."""
    from safeclick_jax.evaluation import interactive, noc

    scores = {s["model"]: s for s in interactive.summarize(_rows(out / "interactive.csv"))}
    nocs = {s["model"]: s for s in noc.summarize(_rows(out / "noc.csv"))}
    cases = _rows(out / "interactive_cases.csv")
    gated = [r for r in cases if r["dsc"] <= interactive.NSD_MIN_DICE]
    models = {}
    for m, s in scores.items():
        models[m] = {k: s[k] for k in ("cases", "labels", "dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "seconds")}
        models[m].update({k: nocs[m][k] for k in ("rois", "noc_85", "fail_85", "noc_90", "fail_90")})
    return {
        "models": models,
        "nsd_gate": {
            "case_steps": len(cases),
            "at_or_below_0.2": len(gated),
            "their_nsd_all_zero": all(r["nsd"] == 0.0 for r in gated),
        },
    }


# --- the summary --------------------------------------------------------------------------------


def _ok(value: float, target: float) -> str:
    return "yes" if value >= target else "**no**"


def _untimed(s: dict, part: str) -> str:
    """' + models reused' where a table2 run reused models whose training time is not on record."""
    run = s.get("table2", {}).get(part.removeprefix("table2 "), {}) if part.startswith("table2 ") else {}
    return " + models reused" if run.get("reused_untimed") else ""


def summary_md(s: dict) -> str:
    md = [
        "# The stand-in SAM 2: demo, Table 2 in miniature, interactive protocol",
        "",
        f"Stand-in: `{s['standin']}`; `python benchmarks/standin_results.py {' '.join(s['argv'])}`, "
        f"{s['cpus']} CPU cores. A stand-in trained on procedural data is not SA-1B's SAM 2; these numbers "
        "measure this project's pipeline on it, not the paper's models.",
        "",
        "| part | time |",
        "|---|---:|",
        *[f"| {k} | {v / 60:.1f} min{_untimed(s, k)} |" for k, v in s["times_s"].items()],
        "",
    ]
    if "demo" in s:
        d = s["demo"]
        md += [
            "## The demo (`make train` on the stand-in, `make app`'s model)",
            "",
            f"Example volume {d['shape'][0]} x {d['shape'][1]} x {d['shape'][2]} (`{d['volume']}`), one click in the "
            f"liver at voxel {tuple(d['click_voxel'])} (the deepest point of its largest slice), then propagation "
            f"with the app's engine; memory path: {d['memory']}. Model `{d['model']}`.",
            "",
            "| liver | value | target |",
            "|---|---:|---|",
            f"| 2D Dice, clicked slice | {d['dice_2d']:.3f} | |",
            f"| 3D Dice | {d['dice_3d']:.3f} | >= {TARGETS['demo_dice_3d']}: "
            f"{_ok(d['dice_3d'], TARGETS['demo_dice_3d'])} |",
            f"| slices with liver; their Dice min / median | {d['liver_slices']}; {d['slice_dice_min']:.3f} / "
            f"{d['slice_dice_median']:.3f} | |",
            "",
            f"Times: training {d['train_s'] / 60:.1f} min (0: reused), model load and volume {d['load_s']:.1f} s, "
            f"click {d['click_s']:.1f} s, propagation {d['propagate_s']:.1f} s (compilation included).",
            "",
        ]
    if "table2" in s:
        md += [
            "## Table 2 in miniature on the stand-in's frozen encoder",
            "",
            "Dice (%), test split. Drop: fine-tuned SAM 2 from PP to its worst IP condition (target >= "
            f"{TARGETS['sam2_drop']:g}); gain: SafeClick - SAM 2 on the IP average (target >= "
            f"+{TARGETS['safeclick_gain']:g}). Full tables: table2/<run>/table.md.",
            "",
            "| run | model | point PP | point IP avg | box PP | box IP avg |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for run_name, r in s["table2"].items():
            for m, v in r["models"].items():
                md.append(
                    f"| {run_name} | {m} | {v['point_pp']:.2f} | {v['point_ip']:.2f} | {v['box_pp']:.2f} | "
                    f"{v['box_ip']:.2f} |"
                )
        md += [
            "",
            "| run | SAM 2 drop point / box | gain point / box | targets met | F_conv max abs w | alpha | time |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for run_name, r in s["table2"].items():
            drop, gain = r["sam2_drop"], r["gain_ip"]
            met = [drop["point"] >= TARGETS["sam2_drop"], drop["box"] >= TARGETS["sam2_drop"]]
            met += [gain["point"] >= TARGETS["safeclick_gain"], gain["box"] >= TARGETS["safeclick_gain"]]
            cp = r["consensus_path"]["SafeClick (SAM 2)"]
            alpha = "n/a" if cp["alpha"] is None else f"{cp['alpha']:.4f}"
            md.append(
                f"| {run_name} | {drop['point']:.1f} / {drop['box']:.1f} | {gain['point']:+.2f} / {gain['box']:+.2f} | "
                f"{sum(met)} of 4 | {cp['f_conv_max_abs']:.4f} | {alpha} | {r['seconds'] / 60:.1f} min"
                f"{_untimed(s, 'table2 ' + run_name)} |"
            )
        md.append("")
    if "protocol" in s:
        p = s["protocol"]
        g = p["nsd_gate"]
        md += [
            "## CVPR 2025 interactive protocol, the abdomen's test volumes",
            "",
            "3D box, then five corrective clicks per label; scored per case as CVPR25_iter_eval.py (NSD counted only "
            "where the case's mean Dice over its labels > 0.2), means over cases. NoC on 2D test ROIs. Files: "
            "protocol/interactive.md.",
            "",
            "| model | cases | DSC_AUC | NSD_AUC | final DSC | final NSD | NoC@85 | NoC@90 | s / label |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m, v in p["models"].items():
            md.append(
                f"| {m} | {v['cases']:.0f} | {v['dsc_auc']:.3f} | {v['nsd_auc']:.3f} | {v['final_dsc']:.3f} | "
                f"{v['final_nsd']:.3f} | {v['noc_85']:.2f} ({v['fail_85']} fail) | {v['noc_90']:.2f} "
                f"({v['fail_90']} fail) | {v['seconds']:.1f} |"
            )
        md += [
            "",
            f"NSD gate checked on interactive_cases.csv: {g['at_or_below_0.2']} of {g['case_steps']} case steps have "
            f"mean Dice <= 0.2; their NSD is {'0 in every one' if g['their_nsd_all_zero'] else 'NOT 0 in all'}.",
            "",
        ]
    return "\n".join(md)


def check_finite(tree, where="summary") -> None:
    """Every number of the summary is finite (a NaN would hide in a table)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise SystemExit(f"error: {where} = {tree}")


def expected_minutes(parts: list[str], runs: list[str], a) -> dict:
    """What each step of the chosen parts is expected to take on the 2-core CPU (EXPECTED_MIN)."""
    plan = {"demo": EXPECTED_MIN["demo"]} if "demo" in parts else {}
    if "table2" in parts:
        plan.update({f"table2 {r}": EXPECTED_MIN[f"table2 {r}"] for r in runs})
        if a.ablations:
            plan["table2 ablations"] = EXPECTED_MIN["table2 ablations"]
    if "protocol" in parts:
        cases = min(a.max_cases or TEST_VOLUMES, TEST_VOLUMES)
        plan["protocol"] = EXPECTED_MIN["protocol fixed"] + cases * EXPECTED_MIN["protocol per volume"]
    return plan


def standin_id(standin: Path) -> str:
    return f"{standin.resolve()} {(standin / 'model.json').stat().st_mtime_ns}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--standin", default="workdir/standin/export", help="the stand-in's model directory")
    p.add_argument("--out", default="benchmarks/results/standin", help="summary.md, summary.json, each run's files")
    p.add_argument("--workdir", default="workdir/standin_results", help="trained models and logs")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--ablations", action="store_true", help="table2 seed 0 also trains no_e1, no_e2, no_crl")
    p.add_argument(
        "--all",
        action="store_true",
        help="--ablations, table2 on seed 1 and the held-out abdomen, the protocol on every test volume",
    )
    p.add_argument("--quick", action="store_true", help="tiny schedules on a smoke stand-in (tests)")
    p.add_argument("--full-steps", type=int, default=150, help="steps of the `full` fine-tune (protocol)")
    p.add_argument("--full-lr", type=float, default=1e-4, help="its lr: the decoder fine-tunes' (paper) lr")
    p.add_argument("--max-cases", type=int, default=1, help="protocol on this many test volumes (0: all; --all: all)")
    p.add_argument("--noc-rois", type=int, default=40, help="NoC on this many evenly spaced test ROIs")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        p.error(f"--parts {a.parts!r}: choose among {', '.join(PARTS)}")
    os.chdir(REPO)  # data, configs and the demo's workdir are relative to the repository
    standin = Path(a.standin)
    if not (standin / "model.json").exists():
        from safeclick_jax import standin as standin_lib

        hint = f"; {standin_lib.absent_line()}" if standin_lib.is_standin(a.standin) else ""
        print(f"error: --standin {a.standin}: no model.json (not a model directory){hint}", file=sys.stderr)
        return 2
    if a.quick:
        a.full_steps, a.max_cases, a.noc_rois = 2, 1, 2
    if a.all:
        a.ablations, a.max_cases = True, 0
    runs = list(TABLE2_RUNS) if a.all else ["seed0"]
    plan = expected_minutes(parts, runs, a)
    log(f"stand-in {standin}; parts: {', '.join(plan)}")
    if not a.quick:
        minutes = ", ".join(f"{k} {v:.0f} min" for k, v in plan.items())
        log(f"expected on a 2-core CPU: {minutes}; {sum(plan.values()):.0f} min in all")

    r = Runner(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    r.work.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    if summary.get("standin_id") != standin_id(standin):  # another stand-in's numbers: start afresh
        summary = {}
    summary.update(standin=str(standin), standin_id=standin_id(standin), argv=sys.argv[1:] if argv is None else argv)
    summary["cpus"] = os.cpu_count()
    summary.setdefault("times_s", {})
    t_all = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        if part == "table2":
            summary["table2"] = {name: r.table2_run(name) for name in runs}
            for name in runs:
                summary["times_s"][f"table2 {name}"] = summary["table2"][name]["seconds"]
        else:
            summary[part] = getattr(r, part)()
            summary["times_s"][part] = time.perf_counter() - t0
        log(f"{part}: done in {(time.perf_counter() - t0) / 60:.1f} min")
        check_finite(summary)
        path.write_text(json.dumps(summary, indent=1))
        (out / "summary.md").write_text(summary_md(summary))
    print((out / "summary.md").read_text())
    log(f"wrote {out}/summary.md, summary.json ({(time.perf_counter() - t_all) / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
