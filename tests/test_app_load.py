"""The load test of benchmarks/load_app.py, short: 3 sessions for 10 s, then 24 bad requests, a
kill -9 and a restart; no 5xx, no state lost, every bad request 4xx (slow: ~1 min)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_app.py"


@pytest.mark.slow
def test_load_short(app_model_dir, tmp_path):
    pytest.importorskip("httpx")
    spec = importlib.util.spec_from_file_location("load_app", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    main = mod.main

    out = tmp_path / "load"
    rc = main(["--checkpoint", app_model_dir, "--sessions", "3", "--seconds", "10", "--bad", "24", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0, res
    assert res["errors_5xx"] == 0 and res["sessions_lost"] == 0 and res["clicks"] > 3
    assert set(res["bad_statuses"]) <= {"400", "401", "404"}
    assert res["label_maps_nonempty"] == 3
