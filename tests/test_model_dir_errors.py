"""Broken model directories (truncated or missing array files, a model.json that does not match
the arrays, an empty directory) give one line naming the directory, the array and the cause, from
the loaders and (exit status 2) from the CLIs. Uses the converted random sam2.1 tiny fixture."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safeclick_jax.checkpoint import ModelDirError
from safeclick_jax.inference.loader import load_model
from safeclick_jax.predictor import ImagePredictor

ROOT = Path(__file__).resolve().parents[1]


def _data_files(d):
    return sorted((p for p in Path(d, "state").rglob("d/*") if p.is_file()), key=lambda p: -p.stat().st_size)


def _broken(src, dst, damage):
    dst = Path(dst)
    if damage == "empty":
        dst.mkdir()
        return dst
    shutil.copytree(src, dst)
    desc = json.loads((dst / "model.json").read_text())
    if damage == "truncated":
        f = _data_files(dst)[0]
        os.truncate(f, f.stat().st_size // 3)
    elif damage == "missing_file":
        _data_files(dst)[0].unlink()
    elif damage == "other_size":  # model.json of another model size than the arrays
        desc["sam2"]["hiera"]["embed_dim"] = 2 * desc["sam2"]["hiera"]["embed_dim"]
    elif damage == "other_kind":
        desc["kind"] = "safeclick"
        desc["safeclick"] = {}
    elif damage == "no_state":
        shutil.rmtree(dst / "state")
    (dst / "model.json").write_text(json.dumps(desc))
    return dst


CAUSES = {
    "truncated": "a data file is truncated",
    "missing_file": "a data file is missing or truncated",
    "other_size": "the arrays do not match model.json",
    "other_kind": "the arrays do not match model.json",
    "no_state": "the arrays (state/) are missing",
    "empty": "not a safeclick-jax model directory (an empty directory)",
}


@pytest.mark.parametrize("damage", list(CAUSES))
def test_loaders_raise_one_line(sam2_tiny_dir, tmp_path, damage, capfd):
    d = _broken(sam2_tiny_dir, tmp_path / "m", damage)
    for load in (load_model, ImagePredictor.from_checkpoint):
        with pytest.raises(ModelDirError) as e:
            load(str(d))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(d)) and CAUSES[damage] in msg, msg
        if damage == "truncated":
            assert ": array " in msg  # names the damaged array
        assert e.value.__context__ is None or e.value.__suppress_context__  # no chained orbax traceback
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_clis_exit_2_with_the_line(sam2_tiny_dir, tmp_path, capsys):
    d = _broken(sam2_tiny_dir, tmp_path / "m", "truncated")
    p = _cli("-m", "convert.flax_to_torch", "--model-dir", str(d), "--out", str(tmp_path / "x.pt"))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith(f"error: {d}: array "), p.stderr[-3000:]
    e = _broken(sam2_tiny_dir, tmp_path / "e", "empty")
    p = _cli("evaluate.py", "--config=configs/sam2_t.py", f"--checkpoint={e}", f"--workdir={tmp_path / 'ev'}")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(f"error: {e}: not a safeclick-jax")
    assert "Traceback" not in p.stderr

    from safeclick_jax import segment
    from safeclick_jax.data import synthetic

    vol = synthetic.write_dataset(tmp_path / "synth", num_volumes=1, seed=0)
    image = next(Path(tmp_path / "synth").rglob("*.nii.gz"))
    del vol
    rc = segment.main(
        ["--checkpoint", str(d), "--image", str(image), "--point", "1,1,0", "--out", str(tmp_path / "o.nii.gz")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {d}: array " in err and "Traceback" not in err
