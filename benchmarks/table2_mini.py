"""The paper's Table 2 in miniature: fine-tuned SAM 2 vs SafeClick under perfect and imperfect prompts.

  python benchmarks/table2_mini.py                       # = make table2 (6 epochs on a CPU, 20 elsewhere)
  python benchmarks/table2_mini.py --ablations --epochs 20 --checkpoint ckpt/sam2.1_t

From one frozen image encoder (--checkpoint, a converted SAM 2; by default the stand-in SAM 2 of
`make pretrain` when workdir/standin/export exists, else a SAM 2.1 tiny with random weights
converted by the project's CLI) it fine-tunes SAM 2's mask decoder (the baseline, the
paper's "SAM 2" rows) and SafeClick with the same data, schedule and seed, then runs evaluate.py on
the test split with zero-shot SAM 2, the fine-tuned SAM 2 and SafeClick (and the no_e1 / no_e2 /
no_crl ablations with --ablations, the paper's Table 3). Writes into --out:
  table.md      the Table 2 layout (Dice per prompt condition, PP / IP, IP averages, Improve row)
  summary.md    Improve on PP and IP per prompt type, the conditions SafeClick wins, whether the
                consensus path opened (F_conv, alpha), run time
  results.json  the Dice rows of every model, the consensus path of each SafeClick model, times
The data defaults to the embedded synthetic abdomen (safeclick_jax.data.synthetic_abdomen);
--root takes any prepared-able dataset folder instead (repeat for several).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE, SAFECLICK, ZERO_SHOT = "SAM 2", "SafeClick (SAM 2)", "Zero-shot SAM 2"
ABLATIONS = {"no_e1": "SafeClick w/o E1", "no_e2": "SafeClick w/o E2", "no_crl": "SafeClick w/o CRL"}


def log(msg: str) -> None:
    print(f"[table2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_encoder(out: Path, seed: int) -> Path:
    """A SAM 2.1 tiny with torch's default random init (seeded), converted by the project's CLI:
    the one frozen encoder every fine-tuned model shares."""
    if (out / "model.json").exists():
        return out
    import torch
    from sam2.build_sam import build_sam2

    from convert.sam2_to_flax import main as convert
    from convert.torch_io import save_torch_state_dict

    torch.manual_seed(seed)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    pt = out.parent / "sam2.1_hiera_t_random.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()}, str(pt))
    if convert(["--checkpoint", str(pt), "--out", str(out)]) != 0:
        raise SystemExit(f"converting {pt} failed")
    pt.unlink()
    return out


def ensure_data(roots: list[str], cache: Path, seed: int, num_volumes: int) -> None:
    from safeclick_jax.data import default_data_config, prepare, synthetic_abdomen

    if (cache / "rois.npy").exists():
        return
    for r in roots:
        if not Path(r).exists():
            log(f"generating the synthetic abdomen ({num_volumes} volumes, seed {seed}) in {r}")
            synthetic_abdomen.write_dataset(r, num_volumes=num_volumes, seed=seed)
    prepare.prepare_dataset(roots, cache, default_data_config(), progress=False)


def consensus_path(model_dir) -> dict:
    """How far a SafeClick model's consensus path (CRL, eqs. 8-9) has opened: F_conv starts at zero,
    so its largest |w| and Frobenius norm say how much x2' adds to E3's x3; alpha (eq. 8, from 1.0)
    weighs E1's cross-affinity. None for what the model lacks (alpha without CRL or E1)."""
    from safeclick_jax import checkpoint

    _, params, _ = checkpoint.load(str(model_dir))
    crl = params["safeclick"]["crl"]
    w = np.asarray(crl["conv"]["kernel"], np.float64)
    alpha = float(np.asarray(crl["alpha"])) if "alpha" in crl else None
    return {"f_conv_max_abs": float(np.abs(w).max()), "f_conv_frobenius": float(np.linalg.norm(w)), "alpha": alpha}


def run(cmd: list[str], logfile: Path) -> float:
    """Runs cmd with its output in logfile; returns the wall time; exits with its log's tail on failure."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(logfile, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = logfile.read_text().splitlines()[-30:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); {logfile}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def summary_md(res: dict, candidate: str, times: dict, args) -> str:
    # "point IP 25%", "box IP 50%": the column names with their prompt type
    cols = [("point " if j < 6 else "box ") + h for j, h in enumerate(res["improve_columns"])]
    dice = res["dice"]
    base, cand = dice[BASELINE], dice[candidate]
    # Column layout of report.COLUMNS: point PP, 4 point IP, point IP avg, box PP, 4 box IP, box IP avg.
    pt_ip, bx_ip = range(1, 5), range(7, 11)
    imp = [c - b for c, b in zip(cand, base)]
    wins = [cols[j] for j in list(pt_ip) + list(bx_ip) if imp[j] > 0]
    losses = [cols[j] for j in list(pt_ip) + list(bx_ip) if imp[j] <= 0]
    drop_pt = base[0] - min(base[j] for j in pt_ip)
    drop_bx = base[6] - min(base[j] for j in bx_ip)
    lines = [
        f"# Table 2 in miniature: {candidate} vs fine-tuned {BASELINE}",
        "",
        f"Data: {', '.join(args.root)} (test split, {res['rois']} ROIs); encoder: {res['encoder']}; "
        f"{args.epochs} epochs ({res['steps']} steps, batch 8) at {res['image_size']} px, seed {args.seed}.",
        "",
        "| Improve (SafeClick - SAM 2), Dice points | Point | Bbox |",
        "|---|---:|---:|",
        f"| PP (point at the centre / tight box) | {imp[0]:+.2f} | {imp[6]:+.2f} |",
        f"| IP average (4 imperfect conditions each) | {imp[5]:+.2f} | {imp[11]:+.2f} |",
        "",
        f"Fine-tuned {BASELINE}: point PP {base[0]:.2f} -> worst IP {base[0] - drop_pt:.2f} "
        f"({drop_pt:.1f} points lost); box PP {base[6]:.2f} -> worst IP {base[6] - drop_bx:.2f} "
        f"({drop_bx:.1f} points lost).",
        "",
        f"SafeClick wins {len(wins)} of 8 imperfect conditions: {', '.join(wins) or 'none'}"
        + (f"; loses {', '.join(losses)}." if losses else "."),
        "",
        "Consensus path (F_conv zero-initialised, alpha from 1.0): "
        + "; ".join(
            f"{name} F_conv max |w| {c['f_conv_max_abs']:.4f} (Frobenius {c['f_conv_frobenius']:.3f})"
            + ("" if c["alpha"] is None else f", alpha {c['alpha']:.4f}")
            for name, c in res["consensus_path"].items()
        )
        + ".",
        "",
        "Run time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/table2", help="table.md and summary.md go here")
    p.add_argument("--workdir", default="workdir/table2", help="models, logs, evaluation outputs")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="converted SAM 2 model directory (default: the stand-in of `make pretrain` if present, else random)",
    )
    p.add_argument("--root", action="append", default=None, help="dataset folder (default: data/abdomen)")
    p.add_argument("--cache-dir", default=None, help="slice cache (default: data/cache/<first root's name>)")
    p.add_argument("--num-volumes", type=int, default=15, help="synthetic volumes when the root is generated")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated synthetic dataset")
    p.add_argument(
        "--epochs", type=int, default=-1, help="training epochs of every model; -1: 20 (paper) on a GPU/TPU, 6 on a CPU"
    )
    p.add_argument("--steps-per-epoch", type=int, default=-1, help="-1: train ROIs // batch")
    p.add_argument("--seed", type=int, default=0, help="init / shuffle / prompt seed of every model")
    p.add_argument("--ablations", action="store_true", help="also train no_e1, no_e2, no_crl (Table 3)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the configs' smoke variant (miniature head, 64 px) on top of each model's: for a --checkpoint "
        "of the smoke size (tests)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep a model whose workdir already has an export instead of training it again (same flags)",
    )
    p.add_argument("--eval-max-rois", type=int, default=32, help="val ROIs of the per-epoch validation")
    p.add_argument("--max-slices", type=int, default=None, help="evaluate only this many test slices")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra train.py flag for every model, e.g. --set=--config.optim.lr=3e-4",
    )
    args = p.parse_args(argv)
    args.root = args.root or ["data/abdomen"]
    if args.epochs < 0:  # 6 CPU epochs: about 30 min on 2 busy cores (benchmarks/RESULTS.md)
        import jax

        args.epochs = 6 if jax.default_backend() == "cpu" else 20
    cache = Path(args.cache_dir or f"data/cache/{Path(args.root[0]).name}")
    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    times = {}
    # a reused model keeps the training time of the run that trained it (that run's results.json)
    previous = out / "results.json"
    trained_before = json.loads(previous.read_text()).get("times_s", {}) if previous.exists() else {}

    ensure_data(args.root, cache, args.data_seed, args.num_volumes)
    from safeclick_jax import standin

    chosen = args.checkpoint or standin.default_checkpoint()
    log(standin.encoder_line(chosen).replace("RANDOM weights", "a RANDOM SAM 2.1 tiny (torch init)"))
    encoder = Path(chosen) if chosen else random_encoder(work / "encoder", args.seed)
    log(f"encoder {encoder}, data {args.root} -> {cache}")

    roots = "(" + ",".join(f'"{r}"' for r in args.root) + ",)"
    common = [
        f"--config.init.checkpoint={encoder}",
        f"--config.data.roots={roots}",
        f"--config.data.cache_dir={cache}",
        f"--config.train.epochs={args.epochs}",
        f"--config.train.steps_per_epoch={args.steps_per_epoch}",
        f"--config.train.seed={args.seed}",
        f"--config.init.seed={args.seed}",
        f"--config.data.shuffle_seed={args.seed}",  # the order and the prompts of the training slices
        f"--config.eval.max_rois={args.eval_max_rois}",
        "--config.train.progress=False",
        "--config.plot=False",
        *args.set,
    ]
    runs = {BASELINE: "baseline", SAFECLICK: ""}
    if args.ablations:
        runs.update({name: v for v, name in ABLATIONS.items()})
    trained, untimed = {}, []  # untimed: reused models whose training time is not on record
    for name, variant in runs.items():
        wd = work / (variant or "safeclick")
        variants = ",".join(v for v in (variant, "smoke" if args.smoke else "") if v)
        config = "configs/sam2_t.py" + (f":{variants}" if variants else "")
        if args.reuse and (wd / "export" / "model.json").exists():
            log(f"reusing {name}: {wd}/export")
            known = [trained_before[k] for k in (f"train {name}", f"train {name} (reused)") if k in trained_before]
            if known:
                times[f"train {name} (reused)"] = known[0]
            else:
                untimed.append(name)
            trained[name] = wd
            continue
        log(f"training {name} ({config}) -> {wd}")
        times[f"train {name}"] = run(
            [sys.executable, "train.py", f"--config={config}", f"--workdir={wd}", *common], work / f"{wd.name}.log"
        )
        trained[name] = wd
        log(f"  done in {times[f'train {name}'] / 60:.1f} min")

    eval_dir = work / "eval"
    config = "configs/sam2_t.py" + (":smoke" if args.smoke else "")  # the models' image size
    cmd = [sys.executable, "evaluate.py", f"--config={config}", f"--cache_dir={cache}"]
    cmd += [f"--checkpoint={encoder}", f"--name={ZERO_SHOT}"]
    for name, wd in trained.items():
        cmd += [f"--checkpoint={wd}", f"--name={name}"]
    cmd += [f"--baseline={BASELINE}", f"--candidate={SAFECLICK}", f"--workdir={eval_dir}", "--progress=False"]
    if args.max_slices:
        cmd.append(f"--max_slices={args.max_slices}")
    log("evaluating on the test split")
    times["evaluate"] = run(cmd, work / "evaluate.log")
    times["total"] = time.perf_counter() - t_all
    reused = sum(v for k, v in times.items() if k.endswith("(reused)"))
    if reused:
        times["total with the reused training"] = times["total"] + reused

    from safeclick_jax.evaluation.report import COLUMNS

    summary = json.loads((eval_dir / "results.json").read_text())
    table = summary["table"]["dice"]
    ds = "All datasets" if "All datasets" in table else next(iter(table))
    steps = _steps(work / "safeclick.log")
    res = {
        "dice": table[ds],
        "improve_columns": [h for h, _ in COLUMNS],
        "rois": sum(d["rois"] for d in summary["datasets"].values()),
        "encoder": str(chosen or "SAM 2.1 tiny, random weights (torch init, seed %d)" % args.seed),
        "steps": steps,
        "image_size": summary["image_size"],
        "consensus_path": {name: consensus_path(wd / "export") for name, wd in trained.items() if name != BASELINE},
        "reused_untimed": untimed,
    }
    eval_table = (eval_dir / "table.md").read_text()
    head = (
        f"# Table 2 in miniature ({ds})\n\nWritten by `python {' '.join(['benchmarks/table2_mini.py', *sys.argv[1:]])}`"
        f" on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPU cores); Dice (%) on the test split; "
        "the evaluation's own table follows.\n\n"
    )
    (out / "table.md").write_text(head + eval_table)
    (out / "summary.md").write_text(summary_md(res, SAFECLICK, times, args))
    (out / "results.json").write_text(json.dumps({"times_s": times, **res}, indent=1))
    print((out / "summary.md").read_text())
    log(f"wrote {out}/table.md, summary.md ({times['total'] / 60:.1f} min in all)")
    return 0


def _steps(logfile: Path) -> int:
    for line in logfile.read_text().splitlines():
        if line.startswith("schedule:"):
            return int(line.split()[1])
    return -1


if __name__ == "__main__":
    sys.exit(main())
