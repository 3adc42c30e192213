"""train.py's flags become one frozen TrainConfig; nothing below the scripts takes or changes argparse's result."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT, train_config

import train
from utils.training.config import RUN_FIELDS, TrainConfig


def test_train_config_fields_are_train_flags_in_help_order():
    dests = [a.dest for a in train.get_args_parser()._actions if a.dest != "help"]
    assert list(TrainConfig.flag_names()) == dests
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(dests) | set(RUN_FIELDS)


def test_train_config_is_frozen_and_args_json_holds_what_the_run_decided_only_once_set():
    cfg = train_config("--max_epoch", "3", "--model", "resnet9")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_epoch = 4
    saved = cfg.to_dict()
    assert saved["max_epoch"] == 3 and saved["model"] == "resnet9"
    assert list(saved) == list(TrainConfig.flag_names())  # no data_used / tensorboard_dir before the run sets them
    later = dataclasses.replace(cfg, tensorboard_dir="logs/x", data_used={"pipeline": "tensor"})
    assert list(later.to_dict())[-2:] == ["data_used", "tensorboard_dir"] and cfg.tensorboard_dir is None


def test_no_module_below_the_scripts_takes_an_argparse_namespace():
    offenders = [str(path.relative_to(ROOT)) for path in [*(ROOT / "utils").rglob("*.py"), *(ROOT / "models").rglob("*.py")]
                 if "Namespace" in path.read_text()]
    assert not offenders, f"modules that take or build an argparse Namespace: {offenders}"
