"""Evaluation without a model: Dice (2D, 3D, resizing), table layout, prompts, ROI handling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safeclick_jax.data import default_data_config, pipeline, prepare, preprocess, synthetic
from safeclick_jax.evaluation import metrics, protocol, report

# ---------------------------------------------------------------------------------------------
# Dice


def _set_dice(pred, gt):
    """Independent Dice: masks as sets of pixel coordinates."""
    p = {tuple(i) for i in np.argwhere(pred)}
    g = {tuple(i) for i in np.argwhere(gt)}
    if not p and not g:
        return math.nan
    return 2 * len(p & g) / (len(p) + len(g))


def test_dice_matches_set_computation_on_known_masks():
    rng = np.random.default_rng(0)
    gt = np.zeros((20, 30), bool)
    gt[5:15, 4:20] = True  # 160 px
    pred = np.zeros_like(gt)
    pred[10:18, 10:25] = True  # 120 px, overlap rows 10-14 x cols 10-19 = 50 px
    assert metrics.dice(pred, gt) == pytest.approx(2 * 50 / (160 + 120))
    for _ in range(20):
        a, b = rng.random((17, 23)) < 0.3, rng.random((17, 23)) < rng.uniform(0, 0.6)
        assert metrics.dice(a, b) == pytest.approx(_set_dice(a, b))
    assert metrics.dice(gt, gt) == 1.0
    # 3D masks are handled the same way
    a, b = rng.random((4, 5, 6)) < 0.4, rng.random((4, 5, 6)) < 0.4
    assert metrics.dice(a, b) == pytest.approx(_set_dice(a, b))


def test_dice_empty_masks_are_never_one():
    empty = np.zeros((8, 8), bool)
    some = empty.copy()
    some[2:4, 2:4] = True
    assert math.isnan(metrics.dice(empty, empty))  # undefined, not 1.0
    assert metrics.dice(some, empty) == 0.0  # false positives on an empty GT
    assert metrics.dice(empty, some) == 0.0  # nothing predicted
    s = metrics.summarize([1.0, 0.5, math.nan])
    assert s == {"mean": 0.75, "std": 0.25, "n": 2, "n_nan": 1}
    s = metrics.summarize([math.nan])
    assert math.isnan(s["mean"]) and s["n"] == 0 and s["n_nan"] == 1
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_resize_matches_torch_postprocess_and_padding():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(32, 32)).astype(np.float32)
    for hw in [(101, 122), (20, 17), (32, 32), (7, 64)]:
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(logits)[None, None], hw, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        ours = metrics.bilinear_matrix(32, hw[0]) @ logits @ metrics.bilinear_matrix(32, hw[1]).T
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    # jnp version with zero padding to a common size: padded area is background.
    gt = rng.random((20, 17)) < 0.5
    ry, rx = metrics.bilinear_matrix(32, 20, 40), metrics.bilinear_matrix(32, 17, 30)
    gt_pad = np.zeros((40, 30), bool)
    gt_pad[:20, :17] = gt
    inter, psum = metrics.mask_counts(logits, ry, rx, gt_pad)
    pred = metrics.predict_mask(logits, (20, 17))
    assert int(inter) == np.count_nonzero(pred & gt)
    assert int(psum) == np.count_nonzero(pred)


def test_dice_3d_equals_dice_of_the_rebuilt_volume():
    """Hand-made volume with two labels; per-slice predictions; summed counts == direct 3D Dice of
    the volume rebuilt with preprocess.from_slices (slices without an ROI predict nothing)."""
    rng = np.random.default_rng(2)
    axis = 2
    vol = np.zeros((12, 10, 6), np.uint8)
    vol[2:9, 3:8, 1:5] = 1
    vol[6:11, 1:4, 2:6] = 2
    vol[0, 0, 0] = 2  # a sliver on a slice with no ROI
    slices = preprocess.to_slices(vol, axis)  # [6, rows, cols]
    pred_slices = {lab: np.zeros(slices.shape, bool) for lab in (1, 2)}
    inter, psum, keys = [], [], []
    for k in range(slices.shape[0]):
        for lab in (1, 2):
            gt = slices[k] == lab
            if gt.sum() < 2:  # not an ROI: nothing predicted
                continue
            noise = rng.random(gt.shape) < 0.15
            pred = gt ^ noise  # imperfect prediction
            pred_slices[lab][k] = pred
            inter.append([np.count_nonzero(pred & gt)] * 3)
            psum.append([np.count_nonzero(pred)] * 3)
            keys.append((7, lab))
    gt_voxels = {(7, lab): int((vol == lab).sum()) for lab in (1, 2)}
    out = metrics.dice_3d(np.array(inter), np.array(psum), keys, gt_voxels)
    for lab in (1, 2):
        pred_vol = preprocess.from_slices(pred_slices[lab].astype(np.uint8), axis).astype(bool)
        assert pred_vol.shape == vol.shape
        direct = _set_dice(pred_vol, vol == lab)
        np.testing.assert_allclose(out[(7, lab)], [direct] * 3)
    assert out[(7, 2)][0] < 1.0


# ---------------------------------------------------------------------------------------------
# Table 2 layout


def _table_values():
    # 12 columns: 5 point conditions, point IP avg, 5 box conditions, box IP avg
    return {
        "Zero-shot": [40, 39, 38, 37, 36, 37.5, 80, 30, 70, 72, 60, 58],
        "Fine-tuned": [56, 55, 54, 51, 42, 50.5, 81.5, 40, 72, 76, 65, 63.25],
        "SafeClick": [75, 74, 71, 67, 62, 68.5, 81.5, 66, 79, 81, 78, 76],
    }


def _cells(md: str, row_name: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| {row_name} |"):
            return [c.strip() for c in line.strip("|").split("|")][2:]
    raise AssertionError(f"no row {row_name!r} in\n{md}")


def test_table_layout_bold_underline_and_improve():
    values = _table_values()
    md = report.markdown_table(values, {m: "ViT-T" for m in values}, baseline="Fine-tuned", candidates=["SafeClick"])
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["Method", "Model type"]
    assert header[2:] == [
        "Point PP 0%",
        "Point IP 25%",
        "Point IP 50%",
        "Point IP 75%",
        "Point IP 100%",
        "Point IP Avg.",
        "Bbox PP 100%",
        "Bbox IP 50%",
        "Bbox IP 75%",
        "Bbox IP 125%",
        "Bbox IP 150%",
        "Bbox IP Avg.",
    ]
    assert lines[1].count("---") == 14
    sc, ft, zs = _cells(md, "SafeClick"), _cells(md, "Fine-tuned"), _cells(md, "Zero-shot")
    assert sc[0] == "**75.00**" and ft[0] == "<u>56.00</u>" and zs[0] == "40.00"
    # a tie for best (81.5) is bold twice; the next value is second
    assert sc[6] == "**81.50**" and ft[6] == "**81.50**" and zs[6] == "<u>80.00</u>"
    imp = _cells(md, "Improve (SafeClick vs Fine-tuned)")
    assert imp[0] == "19.00" and imp[1] == "19.00" and imp[7] == "26.00" and imp[6] == "0.00"
    assert "**" not in "".join(imp) and "<u>" not in "".join(imp)
    # the Improve row is the last line; rows keep the models' order
    assert lines[-1].startswith("| Improve")
    assert [l.split("|")[1].strip() for l in lines[2:5]] == list(values)
    # without candidates, every other model is compared (averaged)
    md = report.markdown_table(values, baseline="Fine-tuned")
    assert _cells(md, "Improve (Zero-shot, SafeClick vs Fine-tuned)")[0] == "1.50"
    models = [
        {"name": "Zero-shot", "kind": "sam2"},
        {"name": "Fine-tuned", "kind": "sam2"},
        {"name": "SafeClick", "kind": "safeclick"},
    ]
    assert report.default_candidates(models, "Fine-tuned") == ["SafeClick"]


def test_table_improve_averages_candidates_and_handles_nan():
    values = _table_values()
    values["SafeClick-S"] = [v + 2 for v in values["SafeClick"]]
    imp = report.improve_row(values, "Fine-tuned", ["SafeClick", "SafeClick-S"])
    assert imp[0] == pytest.approx(20.0)
    values["Zero-shot"] = [math.nan] * 12
    md = report.markdown_table(values)
    assert _cells(md, "Zero-shot")[0] == "n/a"
    assert "Improve" not in md


def test_table_values_ip_averages_and_dataset_average():
    rows = []
    for ds, offset in (("a", 0.0), ("b", 0.1)):
        for c, name in enumerate(protocol.CONDITION_NAMES):
            rows.append({"model": "m", "dataset": ds, "condition": name, "dice_mean": 0.05 * c + offset})
    t = report.table_values(rows)
    a = t["a"]["m"]
    assert a[0] == pytest.approx(0.0) and a[5] == pytest.approx(100 * np.mean([0.05, 0.1, 0.15, 0.2]))
    assert a[6] == pytest.approx(25.0) and a[11] == pytest.approx(100 * np.mean([0.3, 0.35, 0.4, 0.45]))
    np.testing.assert_allclose(t[report.AVERAGE]["m"], np.add(t["a"]["m"], 5.0))


# ---------------------------------------------------------------------------------------------
# ROIs, prompts and batches (a synthetic cache, no model)


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic.write_dataset(root / "data", num_volumes=5, seed=0, shape=(32, 32, 6))
    cfg = default_data_config()
    cfg.min_roi_area = 1  # keep slivers: some ROIs have tiny areas
    cache = root / "cache"
    prepare.prepare_dataset([root / "data"], cache, cfg, progress=False)
    return cache


def test_prompts_are_deterministic_and_shared(synthetic_cache):
    a = protocol.RoiSet(synthetic_cache, "test", seed=3)
    b = protocol.RoiSet(synthetic_cache, "test", seed=3)
    assert len(a) > 0
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert a.prompt_table() == b.prompt_table()
    # a subset of slices (another batching of the work) gets the same prompt for the same ROI
    c = protocol.RoiSet(synthetic_cache, "test", seed=3, max_slices=3)
    pos = {int(r): i for i, r in enumerate(a.rows["roi_id"])}
    for j, r in enumerate(c.rows["roi_id"]):
        np.testing.assert_array_equal(c.points[j], a.points[pos[int(r)]])
        np.testing.assert_array_equal(c.boxes[j], a.boxes[pos[int(r)]])
    # the prompts are the data pipeline's seeded conditions (independent recomputation)
    cache = pipeline.Cache(synthetic_cache)
    for i in (0, len(a) - 1):
        mask = cache.roi(a.rows[i])["mask"]
        ref = pipeline.condition_prompts(mask, int(a.rows["roi_id"][i]), seed=3)
        np.testing.assert_array_equal(a.points[i], [p["point"] for p in ref[:5]])
        np.testing.assert_array_equal(a.boxes[i], [p["box"] for p in ref[5:]])
    # a different seed moves the displaced clicks, not the perfect ones
    d = protocol.RoiSet(synthetic_cache, "test", seed=4)
    np.testing.assert_array_equal(d.points[:, 0], a.points[:, 0])
    assert not np.array_equal(d.points[:, 1:], a.points[:, 1:])


def test_empty_and_small_rois_are_counted_not_evaluated(synthetic_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(synthetic_cache, cache)
    rois = np.load(cache / "rois.npy")
    test = rois[rois["split"] == 2]
    # an ROI whose label is not on its slice: an empty mask (a stale or hand-edited index)
    bad = test[:1].copy()
    bad["roi_id"] = rois["roi_id"].max() + 1
    bad["label"] = 99
    np.save(cache / "rois.npy", np.concatenate([rois, bad]))
    min_area = int(np.median(test["area"]))
    s = protocol.RoiSet(cache, "test", min_area=min_area)
    ds = s.datasets[0]
    assert s.skipped[ds]["empty"] == 1
    assert s.skipped[ds]["small"] == int((test["area"] < min_area).sum()) > 0
    assert len(s) == int((test["area"] >= min_area).sum())
    assert (s.rows["area"] >= min_area).all() and 99 not in s.rows["label"]


def test_batch_layout_groups_rois_by_slice(synthetic_cache):
    s = protocol.RoiSet(synthetic_cache, "test")
    b = s.batch([0, 1], image_size=64, batch_size=4, rois_per_call=2)
    assert b["image"].shape == (4, 64, 64, 3)
    assert b["valid_slice"].tolist() == [True, True, False, False]
    n0 = len(s.slices[0][1])
    assert b["roi_label"].shape[1] % 2 == 0 and b["roi_label"].shape[1] >= n0
    assert (b["roi_index"][0, :n0] == s.slices[0][1]).all() and (b["roi_index"][2:] == -1).all()
    (v, k), idx = s.slices[0]
    h, w = s.cache.volume_arrays(v)[0].shape[1:]
    np.testing.assert_allclose(b["points"][0, 0], s.points[idx[0]] * [64 / w, 64 / h], rtol=1e-6)
    np.testing.assert_allclose(
        b["boxes"][0, 0].reshape(-1, 2, 2), s.boxes[idx[0]].reshape(-1, 2, 2) * [64 / w, 64 / h], rtol=1e-6
    )
    # the label map carries the ROI's mask: labelmap == label on the slice is the ground truth
    gt = b["labelmap"][0, :h, :w] == b["roi_label"][0, 0]
    np.testing.assert_array_equal(gt, s.cache.roi(s.rows[idx[0]])["mask"].astype(bool))
    assert not b["labelmap"][0, h:].any()


# ---------------------------------------------------------------------------------------------
# Model-side helpers (abstract models: nothing is initialised or compiled)


def test_prompt_tokens_layout():
    pts = np.array([[[3.0, 4.0]]], np.float32)  # [1, 1, 2]
    box = np.array([[[1.0, 2.0, 5.0, 6.0]]], np.float32)  # [1, 1, 4]
    pc, pl, bc, bl = protocol.prompt_tokens(pts, box)
    np.testing.assert_array_equal(pl[0, 0], [1, -1, -2])
    np.testing.assert_array_equal(pc[0, 0], [[3, 4], [0, 0], [0, 0]])
    np.testing.assert_array_equal(bl[0, 0], [2, 3, -1])
    np.testing.assert_array_equal(bc[0, 0], [[1, 2], [5, 6], [0, 0]])


def test_base_architecture_is_safeclick_without_its_head():
    from flax import nnx

    from safeclick_jax.models import registry
    from safeclick_jax.models.config import HieraConfig, get_config
    from safeclick_jax.models.safeclick import SafeClickConfig

    cfg = get_config("sam2.1_hiera_t").replace(
        image_size=64,
        hiera=HieraConfig(embed_dim=8, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,)),
    )
    desc = {"kind": "safeclick", "sam2": cfg.to_dict(), "safeclick": SafeClickConfig().to_dict()}
    model = registry.build(desc, abstract=True)
    base = registry.base_model(model)
    assert type(base).__name__ == "SAM2Image" and not hasattr(base, "safeclick")
    sc_paths = {p for p, _ in nnx.state(model).flat_state() if p[0] != "safeclick"}
    assert {p for p, _ in nnx.state(base).flat_state()} == sc_paths
    assert registry.base_model(registry.build({"kind": "sam2", "sam2": cfg.to_dict()}, abstract=True)) is None


# ---------------------------------------------------------------------------------------------
# Report files from a protocol result (counts made up, no model): two datasets in one cache


@pytest.fixture(scope="module")
def two_dataset_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    for name, seed in (("liverA", 0), ("liverB", 1)):
        synthetic.write_dataset(root / name, num_volumes=5, seed=seed, shape=(32, 32, 6))
    cfg = default_data_config()
    cfg.min_roi_area = 1  # every labelled pixel belongs to some ROI
    prepare.prepare_dataset([root / "liverA", root / "liverB"], root / "cache", cfg, progress=False)
    return root / "cache"


def _fake_result(rois, models):
    rng = np.random.default_rng(0)
    n = len(rois)
    inter, psum, iou = {}, {}, {}
    for k, m in enumerate(models):
        if k == 0:  # a perfect model: P == G on every ROI
            psum[m["name"]] = np.repeat(rois.area[:, None], 10, 1)
            inter[m["name"]] = psum[m["name"]].copy()
        else:
            psum[m["name"]] = rng.integers(0, 50, (n, 10))
            inter[m["name"]] = np.minimum(psum[m["name"]], rois.area[:, None]) // 2
        iou[m["name"]] = np.full((n, 10), 0.5, np.float32)
    return protocol.Result(models, rois, inter, psum, iou, {}, 64, 1.0)


def test_report_files_for_two_datasets(two_dataset_cache, tmp_path):
    import csv
    import json

    from safeclick_jax.evaluation import figures

    rois = protocol.RoiSet(two_dataset_cache, "test")
    assert rois.datasets == ["liverA", "liverB"]
    timing = lambda ms: {
        "encode_s_per_slice": ms / 1e3,
        "decode_s_per_prompt": 1e-3,
        "inference_s_per_roi": ms / 1e3 + 1e-3,
        "rois_per_s": 1.0,
        "compile_s": 0.0,
    }
    models = [
        {"name": "oracle", "kind": "sam2", "base": "sam2.1_hiera_t", "timing": timing(10)},
        {"name": "sc", "kind": "safeclick", "base": "sam2.1_hiera_t", "timing": timing(11.8)},
    ]
    result = _fake_result(rois, models)
    summary = report.write(result, tmp_path, baseline="oracle")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 * 2 * 10
    for r in rows:
        if r["model"] == "oracle":  # perfect on every ROI slice, and every labelled
            assert float(r["dice_mean"]) == 1.0  # voxel is on an ROI slice: 3D Dice 1 as well
            assert float(r["dice3d_mean"]) == pytest.approx(1.0)
        assert int(r["n_rois"]) == int((rois.dataset == r["dataset"]).sum())
    md = (tmp_path / "table.md").read_text()
    assert "## All datasets (2D Dice per ROI" in md and "## liverB: 3D Dice" in md
    assert md.count("| Improve (sc vs oracle) |") == 6  # (average + 2 datasets) x (2D + 3D)
    t = {x["model"]: x for x in summary["timing"]}
    assert t["sc"]["overhead_ratio"] == pytest.approx((11.8 + 1) / (10 + 1))
    avg = summary["table"]["dice"][report.AVERAGE]["sc"]
    per = [summary["table"]["dice"][ds]["sc"] for ds in rois.datasets]
    np.testing.assert_allclose(avg, np.mean(per, axis=0))
    assert json.loads((tmp_path / "results.json").read_text())["improve"]["liverA"]
    for ds in rois.datasets:
        assert figures.robustness_figure(summary["results"], ds, tmp_path / f"{ds}.png").exists()
