"""The one rule by which `make train`, `make table2`, `make app` and evaluate.py start from the
stand-in SAM 2 (safeclick_jax/standin.py): used when its export exists, else random weights with a
line saying how to build it and how long that takes. No JAX."""

from __future__ import annotations

import json

import pytest

from safeclick_jax import standin


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # EXPORT is relative to where the commands run
    return tmp_path


def write_model(path, training=None):
    path.mkdir(parents=True)
    (path / "model.json").write_text(json.dumps({"kind": "sam2", **({"training": training} if training else {})}))


def test_absent_says_how_to_build_it_and_how_long(in_tmp):
    from configs import sam2_t

    assert not standin.available() and standin.default_checkpoint() is None
    line = standin.encoder_line(None)
    assert "RANDOM" in line and "make pretrain" in line and "30 minutes on a 2-core CPU" in line
    assert sam2_t.get_config().init.checkpoint is None
    assert "make pretrain" not in standin.encoder_line(None, pretraining=True)


def test_present_is_every_default_init(in_tmp, capsys):
    from configs import medsam2_t, sam2_t

    write_model(in_tmp / standin.EXPORT)
    assert standin.default_checkpoint() == standin.EXPORT
    assert sam2_t.get_config().init.checkpoint == standin.EXPORT
    assert sam2_t.get_config("baseline").init.checkpoint == standin.EXPORT
    assert medsam2_t.get_config().init.checkpoint == standin.EXPORT
    assert sam2_t.get_config("smoke").init.checkpoint is None  # tests keep their miniature model
    assert "the stand-in SAM 2 pretrained here" in standin.encoder_line(standin.default_checkpoint())
    assert standin.encoder_line("ckpt/sam2.1_t") == "encoder: ckpt/sam2.1_t"
    # what a model directory builds on, from the init its training export records
    write_model(in_tmp / "ft" / "export", {"init": standin.EXPORT, "step": 10})
    write_model(in_tmp / "rand", {"init": None})
    write_model(in_tmp / "conv")
    write_model(in_tmp / "wd" / "export", {"step": 10})  # init only in the workdir's config.json
    (in_tmp / "wd" / "config.json").write_text(json.dumps({"init": {"checkpoint": "ckpt/sam2.1_t"}}))
    assert standin.model_line("ft").endswith(f"fine-tuned from {standin.EXPORT} (the stand-in)")
    assert standin.model_line("rand").endswith("fine-tuned from RANDOM weights")
    assert standin.model_line("conv").endswith("its own weights (not a training export)")
    assert standin.model_line("wd").endswith("fine-tuned from ckpt/sam2.1_t")
    assert standin.model_line("wd/export").endswith("fine-tuned from ckpt/sam2.1_t")
    assert standin.model_line(str(in_tmp / standin.EXPORT)).endswith("the stand-in SAM 2 itself (zero-shot)")
    (in_tmp / "broken").mkdir()
    (in_tmp / "broken" / "model.json").write_text("{")
    assert standin.model_line("broken").endswith("no readable model.json")
    assert standin.model_line("nowhere").endswith("no readable model.json")
    assert standin.main(["ft", "missing"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("ft: fine-tuned from")
