"""Damaged training checkpoints fall back to the newest one that restores; failing saves stop
with SaveError and leave the earlier checkpoints intact (in-process, tiny states)."""

import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from safeclick_jax.training.checkpointing import Checkpointer, NoCheckpointError, SaveError


def _state(v: float, n: int = 3000, dtype=jnp.float32):
    return {"params": {"w": jnp.arange(n, dtype=dtype) + v}, "step": jnp.asarray(int(v), jnp.int32)}


def _saved(tmp_path, steps=(4, 8)) -> Path:
    d = tmp_path / "checkpoints"
    ck = Checkpointer(d, keep=5, keep_best=False)
    for s in steps:
        ck.save(s, _state(s), {"step": s, "data_iter": {"next_index": s}})
    ck.close()
    return d


def _data_files(step_dir: Path):
    return sorted((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: -p.stat().st_size)


def _restore(d, like=None):
    lines = []
    ck = Checkpointer(d, keep=5, keep_best=False)
    try:
        return ck.restore_newest(like or _state(0), log=lines.append), lines
    finally:
        ck.close()


def test_intact_checkpoints_restore_the_newest(tmp_path):
    d = _saved(tmp_path)
    (step, state, meta), lines = _restore(d)
    assert step == 8 and lines == [] and meta["data_iter"] == {"next_index": 8}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"])[:3], [8, 9, 10])


@pytest.mark.parametrize("damage", ["truncated", "missing_file", "missing_meta", "shape", "dtype"])
def test_damaged_newest_is_moved_aside_and_the_previous_restores(tmp_path, damage):
    d = _saved(tmp_path)
    like = _state(0)
    if damage == "truncated":
        f = _data_files(d / "8")[0]
        os.truncate(f, f.stat().st_size // 3)
    elif damage == "missing_file":
        _data_files(d / "8")[0].unlink()
    elif damage == "missing_meta":
        for f in (d / "8" / "meta").iterdir():
            f.unlink()
    elif damage in ("shape", "dtype"):  # the config changed: step 4 saved with the new one, 8 with the old
        like = _state(0, n=3001) if damage == "shape" else _state(0, dtype=jnp.bfloat16)
        shutil.rmtree(d / "4")
        ck = Checkpointer(d, keep=5, keep_best=False)
        ck.save(4, like, {"step": 4, "data_iter": {"next_index": 4}})
        ck.close()
    (step, state, meta), lines = _restore(d, like)
    assert step == 4 and meta["data_iter"] == {"next_index": 4}
    assert len(lines) == 1 and lines[0].startswith("checkpoint step 8 does not restore (") and "8.damaged" in lines[0]
    assert "\n" not in lines[0]
    if damage == "truncated":
        assert "truncated" in lines[0] and "array " in lines[0]
    if damage in ("shape", "dtype"):
        assert "array params/w is float32[3000], the config needs" in lines[0]
    assert (d / "8.damaged").is_dir() and not (d / "8").exists()  # moved, not deleted
    ck = Checkpointer(d, keep=5, keep_best=False)
    assert ck.all_steps() == [4]
    ck.close()


def test_none_restores_raises_with_how_to_start_afresh(tmp_path):
    d = _saved(tmp_path)
    for s in (4, 8):
        os.truncate(_data_files(d / str(s))[0], 10)
    with pytest.raises(NoCheckpointError, match=r"no checkpoint in .* restores \(steps \[8, 4\].*To start afresh"):
        _restore(d)
    assert sorted(p.name for p in d.iterdir()) == ["4.damaged", "8.damaged"]
    (d / "8").mkdir()  # a later damage of the same step does not overwrite the first one
    Checkpointer(d, keep=5, keep_best=False).move_aside(8)
    assert (d / "8.damaged.1").is_dir()
    assert _restore(tmp_path / "empty") == (None, [])


def test_save_into_a_file_in_the_way_raises_save_error(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(SaveError, match="is a file, not a folder"):
        Checkpointer(tmp_path / "checkpoints")


def test_failing_save_raises_save_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    d = _saved(tmp_path, steps=(4,))
    ck = Checkpointer(d, keep=5, keep_best=False)
    if os.geteuid() != 0:  # a read-only folder (root writes regardless: simulate the OS error)
        os.chmod(d, 0o555)
    else:

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ck.manager, "save", full)
    try:
        with pytest.raises(
            SaveError, match=r"saving checkpoint step 8 to .* failed .*earlier checkpoints \[4\] are intact"
        ):
            ck.save(8, _state(8), {"step": 8, "data_iter": {}})
            ck.wait(8)
    finally:
        os.chmod(d, 0o755)
    monkeypatch.undo()
    (step, _, _), lines = _restore(d)
    assert step == 4 and lines == []
