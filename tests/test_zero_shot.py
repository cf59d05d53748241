"""The zero-shot protocol (one click at the deepest point of each object's largest slice, then
propagation): the click rule exactly, and the command end to end on a random 128 px model."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from safeclick_jax.data import procedural
from safeclick_jax.evaluation import zero_shot


def brute_force_depth(mask2d: np.ndarray) -> np.ndarray:
    """Distance from each object pixel to the nearest pixel outside it (the border counts as outside)."""
    padded = np.pad(mask2d, 1)
    outside = np.argwhere(~padded)
    depth = np.zeros(mask2d.shape)
    for r, c in np.argwhere(mask2d):
        depth[r, c] = np.sqrt(((outside - (r + 1, c + 1)) ** 2).sum(1)).min()
    return depth


def test_click_is_the_deepest_point_of_the_largest_slice():
    m = np.zeros((4, 20, 20), bool)
    m[1, 2:7, 2:18] = True  # 80 voxels, deepest row 4
    m[2, 3:16, 3:10] = True  # 91 voxels: the largest slice; a 13 x 7 block, deepest column 6
    m[2, 0:3, 15:20] = True  # a thin sliver on the border adds voxels, never depth
    z, row, col = zero_shot.deepest_click(m)
    assert (z, col) == (2, 6) and 3 + 3 <= row <= 15 - 3
    depth = brute_force_depth(m[2])
    assert depth[row, col] == depth.max() == 4.0
    # the first maximum in row-major order: the top of the block's middle column
    assert (row, col) == tuple(np.argwhere(depth == depth.max())[0])


def test_kinds_and_dice():
    assert procedural.kind_of("prism_3") == "prism" and procedural.kind_of("liver_lesion") == "liver_lesion"
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :1] = True, True
    assert zero_shot.dice(a, b) == pytest.approx(2 * 4 / 12) and zero_shot.dice(a & False, b & False) == 1.0


def test_command_end_to_end_on_a_random_model(tmp_path, app_model_dir):
    root = procedural.write_dataset(tmp_path / "proc", num_volumes=2, seed=5, shape=(48, 48, 10))
    out = tmp_path / "zs"
    argv = ["--checkpoint", app_model_dir, "--root", str(root), "--cache-dir", str(tmp_path / "cache")]
    assert zero_shot.main(argv + ["--split", "all", "--out", str(out)]) == 0
    with open(out / "zero_shot.csv") as f:
        rows = list(csv.DictReader(f))
    names = zero_shot.label_names(root)
    expected = 0
    for i in range(2):
        _, labels, _ = procedural.make_volume(5 * 100003 + i, (48, 48, 10))
        expected += len(np.unique(labels)) - 1
    assert len(rows) == expected and list(rows[0]) == zero_shot.FIELDS
    for r in rows:
        assert r["name"] == names[int(r["label"])] and r["kind"] == procedural.kind_of(r["name"])
        assert 0.0 <= float(r["dice_2d"]) <= 1.0 and 0.0 <= float(r["dice_3d"]) <= 1.0
        assert 0 < int(r["slices"]) <= 10 and 0 <= int(r["pred_slices"]) <= 10 and int(r["voxels"]) > 0
        assert (float(r["dice_3d"]) > 0) <= (int(r["pred_voxels"]) > 0)
    md = (out / "zero_shot.md").read_text()
    kinds = {r["kind"] for r in rows}
    assert all(f"| {k} | {sum(r['kind'] == k for r in rows)} |" in md for k in kinds)
    assert f"| all | {len(rows)} |" in md


def test_bad_arguments_exit_2_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        zero_shot.main(["--checkpoint", str(tmp_path), "--root", str(tmp_path)])
    assert e.value.code == 2 and "--root and --cache-dir go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        zero_shot.main(["--checkpoint", str(tmp_path / "none")])
    assert e.value.code == 2 and "no model.json" in capsys.readouterr().err
    assert not (tmp_path / "zero_shot_abdomen").exists()
