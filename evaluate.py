"""Evaluate models under the paper's robustness protocol (Table 2, Fig. 3, Fig. 4).

  python evaluate.py --config configs/sam2_t.py \
      --checkpoint ckpt/sam2.1_t --name "Zero-shot SAM 2" \
      --checkpoint workdir/sam2_t_ft --name "SAM 2" \
      --checkpoint workdir/safeclick_t --name "SafeClick (SAM 2)" \
      --baseline "SAM 2" --workdir eval/sam2_t

Writes results.csv, results.json, table.md, per_roi.csv, volumes_3d.csv, prompts.json,
fig3_<dataset>.png and overlays_<condition>.png into --workdir. With --protocol interactive: the
CVPR 2025 interactive 3D protocol (3D box, then five corrective clicks) and NoC@85/90, written to
interactive.csv, noc.csv, interactive.md and interactive_curve.png (docs/evaluation.md). The logic lives in
safeclick_jax.evaluation (protocol, metrics, report, figures).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "ml_collections config file; its `data` section (cache_dir, roots, "
    "image_size, eval_seed) is used. Without it, safeclick_jax.data.default_data_config().",
)
_CHECKPOINT = flags.DEFINE_multi_string(
    "checkpoint",
    None,
    "model directory (model.json + state/) or training workdir (its export/); repeat for several models",
    required=True,
)
_NAME = flags.DEFINE_multi_string(
    "name", None, "display name of each --checkpoint, in order (default: the directory's name)"
)
_BASELINE = flags.DEFINE_string("baseline", None, "model name the Improve row compares against")
_CANDIDATE = flags.DEFINE_multi_string(
    "candidate",
    None,
    "models compared with --baseline in the Improve row (default: the "
    "SafeClick models, else all others); several are averaged, as the paper's model sizes",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "split to evaluate")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "slice cache (default: config.data.cache_dir)")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "model input size (0: config.data.image_size)")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    0,
    "slices per step, a multiple of the device count (0: config.data.batch_size rounded up to one)",
)
_ROIS_PER_CALL = flags.DEFINE_integer(
    "rois_per_call", 1, "ROI slots per decoder call (each = 10 prompts per slice of the batch)"
)
_SEED = flags.DEFINE_integer("seed", None, "prompt seed (default: config.data.eval_seed)")
_MIN_AREA = flags.DEFINE_integer("min_area", 0, "ROIs with fewer pixels are skipped and counted")
_MAX_SLICES = flags.DEFINE_integer("max_slices", None, "evaluate only this many evenly spaced slices (smoke runs)")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "devices of the data mesh (0: all)")
_NUM_OVERLAYS = flags.DEFINE_integer("num_overlays", 4, "ROIs in the overlay figures")
_OVERLAY_CONDITIONS = flags.DEFINE_list(
    "overlay_conditions", ["box_50", "point_50"], "conditions drawn in overlay figures"
)
_TIME_BASE = flags.DEFINE_bool(
    "time_base",
    True,
    "time a SafeClick model's base network when the run has no plain SAM 2 "
    "model of the same configuration (for the overhead ratio)",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "progress lines on stderr")


_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    "conditions",
    ["conditions", "interactive"],
    "conditions: the paper's ten prompt conditions (Table 2); interactive: the CVPR 2025 3D box + "
    "five corrective clicks protocol on the split's volumes, and NoC@85/90 on its 2D ROIs",
)
_BOX = flags.DEFINE_bool("box", True, "interactive: start each label from its 3D box (--no-box: from a click)")
_MEMORY_CHECKPOINT = flags.DEFINE_string(
    "memory_checkpoint",
    None,
    "interactive: model directory whose memory (video) weights the volume engine uses for models saved "
    "without them (e.g. a SafeClick export's SAM 2 base)",
)
_MAX_CASES = flags.DEFINE_integer("max_cases", None, "interactive: at most this many volumes (smoke runs)")
_NOC = flags.DEFINE_bool("noc", True, "interactive: also NoC@85/90 on the split's 2D ROIs")
_NOC_MAX_ROIS = flags.DEFINE_integer("noc_max_rois", None, "interactive: NoC on this many evenly spaced ROIs")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def resolve_settings():
    """(data config, cache dir, image size, prompt seed) from the flags and the config."""
    from safeclick_jax.data import default_data_config

    cfg = _CONFIG.value
    data_cfg = cfg.data if cfg is not None and "data" in cfg else default_data_config()
    cache_dir = _CACHE_DIR.value or data_cfg.cache_dir
    image_size = _IMAGE_SIZE.value or int(data_cfg.image_size)
    if image_size <= 0:  # the configs' "auto": the model's own size, a small one on a CPU
        import ml_collections

        from safeclick_jax import checkpoint
        from safeclick_jax.models.config import SAM2Config
        from safeclick_jax.training import model_init

        first = checkpoint.read_description(_CHECKPOINT.value[0])
        image_size, why = model_init.resolve_image_size(
            ml_collections.ConfigDict({"data": data_cfg}), SAM2Config.from_dict(first["sam2"])
        )
        log(f"[evaluate] image size {image_size} px ({why})")
    seed = _SEED.value if _SEED.value is not None else int(data_cfg.get("eval_seed", 0))
    return data_cfg, cache_dir, image_size, seed


def check_names() -> list[str]:
    names = _NAME.value or []
    if len(names) > len(_CHECKPOINT.value):
        raise app.UsageError("more --name than --checkpoint flags")
    if len(set(names)) != len(names):
        raise app.UsageError(f"--name values must differ: {names}")
    return names


def model_names(names: list[str]) -> list[str]:
    out = [names[i] if i < len(names) else Path(d.rstrip("/")).name for i, d in enumerate(_CHECKPOINT.value)]
    if len(set(out)) != len(out):
        raise app.UsageError(f"two models share a name ({out}): give --name")
    return out


def ensure_cache(cache_dir, data_cfg):
    if not (Path(cache_dir) / "rois.npy").exists():
        from safeclick_jax.data import prepare

        log(f"[evaluate] no cache in {cache_dir}: preparing it from {list(data_cfg.roots)}")
        prepare.prepare_dataset(list(data_cfg.roots), cache_dir, data_cfg, progress=_PROGRESS.value)


def check_split(cache_dir):
    """Exit 2 with the ROI count per split when the chosen split has none."""
    from safeclick_jax.data import pipeline

    counts = pipeline.Cache(cache_dir).split_counts()
    if counts[_SPLIT.value] == 0:
        print(
            f"error: {cache_dir}: the {_SPLIT.value} split has no ROI to evaluate (ROIs per split: {counts}); "
            "choose another with --split",
            file=sys.stderr,
        )
        sys.exit(2)


def load_models(image_size: int, names: list[str]):
    from safeclick_jax.evaluation import protocol

    models = []
    for i, d in enumerate(_CHECKPOINT.value):
        models.append(protocol.EvalModel.load(d, image_size, names[i] if i < len(names) else None))
    if len({m.name for m in models}) != len(models):
        raise app.UsageError(f"two models share a name ({[m.name for m in models]}): give --name")
    if _BASELINE.value is not None and _BASELINE.value not in {m.name for m in models}:
        raise app.UsageError(f"--baseline {_BASELINE.value!r} is none of {[m.name for m in models]}")
    return models


def write_condition_outputs(result, rois, base_timing, run_info, overlay_rois, out: Path, t0: float):
    from safeclick_jax.evaluation import figures, protocol, report

    summary = report.write(result, out, _BASELINE.value, _CANDIDATE.value, base_timing, run_info)
    for ds in rois.datasets:
        figures.robustness_figure(summary["results"], ds, out / f"fig3_{_safe(ds)}.png")
    for cname in _OVERLAY_CONDITIONS.value:
        if cname not in protocol.CONDITION_NAMES:
            raise app.UsageError(f"--overlay_conditions: {cname!r} is none of {protocol.CONDITION_NAMES}")
        figures.overlay_figure(
            result, protocol.CONDITION_NAMES.index(cname), out / f"overlays_{cname}.png", overlay_rois
        )
    summary["run"]["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=1))


def run_conditions(data_cfg, cache_dir, image_size: int, seed: int, names: list[str]):
    """The paper's ten-condition protocol (results.csv, table.md, figures)."""
    import jax

    from safeclick_jax.evaluation import protocol

    mesh = protocol.make_mesh(_NUM_DEVICES.value or None)
    ndev = mesh.devices.size
    batch_size = _BATCH_SIZE.value or -(-int(data_cfg.batch_size) // ndev) * ndev
    if batch_size % ndev:
        raise app.UsageError(f"--batch_size {batch_size} is not a multiple of {ndev} devices")
    models = load_models(image_size, names)
    t0 = time.perf_counter()
    rois = protocol.RoiSet(cache_dir, _SPLIT.value, seed=seed, min_area=_MIN_AREA.value, max_slices=_MAX_SLICES.value)
    log(
        f"[evaluate] {len(rois)} ROIs on {len(rois.slices)} slices of {rois.datasets} "
        f"({_SPLIT.value} split), {len(models)} models, image size {image_size}, "
        f"batch {batch_size} slices on {ndev} device(s)"
    )
    overlay_rois = protocol.pick_overlay_rois(rois, _NUM_OVERLAYS.value)
    result = protocol.evaluate(
        models, rois, image_size, batch_size, _ROIS_PER_CALL.value, mesh, overlay_rois, progress=_PROGRESS.value
    )
    base_timing = {}
    if _TIME_BASE.value:
        plain = {m.base for m in models if m.kind == "sam2"}
        for m in models:
            if m.kind == "safeclick" and m.base not in plain:
                base_timing[m.name] = protocol.time_base_overhead(m, image_size, mesh, batch_size)
    out = Path(_WORKDIR.value)
    run_info = {
        "argv": sys.argv,
        "cache_dir": str(cache_dir),
        "image_size": image_size,
        "batch_size": batch_size,
        "devices": ndev,
        "platform": jax.devices()[0].platform,
        "total_s": None,
    }
    write_condition_outputs(result, rois, base_timing, run_info, overlay_rois, out, t0)
    print((out / "table.md").read_text())
    log(f"[evaluate] wrote {out}")


def run_interactive(cache_dir, image_size: int, seed: int, names: list[str]):
    """The CVPR 2025 interactive 3D protocol and NoC (interactive.csv, noc.csv, interactive.md)."""
    import jax

    from safeclick_jax.evaluation import interactive, interactive_report, noc, volume_session

    names = model_names(names)
    cases, notes = interactive.load_cases(cache_dir, _SPLIT.value, _MAX_CASES.value)
    if not cases:
        raise app.UsageError(f"{cache_dir}: split {_SPLIT.value!r} has no volume")
    log(f"[evaluate] interactive: {len(cases)} volumes ({_SPLIT.value} split), {len(names)} models, {image_size} px")
    t0 = time.perf_counter()
    rows, noc_rows = [], [] if _NOC.value else None
    rois = noc.load_rois(cache_dir, _SPLIT.value, _NOC_MAX_ROIS.value) if _NOC.value else []
    for name, d in zip(names, _CHECKPOINT.value):
        m = volume_session.volume_model(
            name, d, image_size, _MEMORY_CHECKPOINT.value, memory_option="--memory_checkpoint=DIR"
        )
        new, _ = interactive.run(
            [m], cases, seed, _BOX.value, notes if not rows else {}, log if _PROGRESS.value else None
        )
        rows += new
        if _NOC.value:
            noc_rows += noc.run([volume_session.click_model(name, d, image_size)], rois, seed)
    run_line = (
        f"Split `{_SPLIT.value}` of `{cache_dir}`, image size {image_size} px, {jax.devices()[0].platform}, "
        f"{time.perf_counter() - t0:.0f} s in all."
    )
    path = interactive_report.write(_WORKDIR.value, rows, notes, noc_rows, _BOX.value, seed, noc.MAX_CLICKS, run_line)
    print(path.read_text())
    log(f"[evaluate] wrote {_WORKDIR.value}")


def main(argv):
    from safeclick_jax import checkpoint

    try:
        _main(argv)
    except checkpoint.ModelDirError as e:
        checkpoint.exit_on_model_error(e)


def _main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from safeclick_jax import standin

    for d in _CHECKPOINT.value:
        log(f"[evaluate] {standin.model_line(d)}")
    if not standin.available():
        log(f"[evaluate] {standin.absent_line()}")
    data_cfg, cache_dir, image_size, seed = resolve_settings()
    names = check_names()
    ensure_cache(cache_dir, data_cfg)
    check_split(cache_dir)
    if _PROTOCOL.value == "interactive":
        run_interactive(cache_dir, image_size, seed, names)
    else:
        run_conditions(data_cfg, cache_dir, image_size, seed, names)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


if __name__ == "__main__":
    from safeclick_jax.host_memory import configure_allocator

    configure_allocator()  # re-executes once with the host allocator (safeclick_jax/host_memory.py)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.argv = ["--nobox" if a == "--no-box" else a for a in sys.argv]  # the challenge's spelling
    app.run(main)
