"""train.py's flags become one frozen TrainConfig; nothing below the scripts takes or changes argparse's result."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from conftest import ROOT, run_main, train_config

import train
from utils import cli
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


def test_a_recipe_file_sets_the_defaults_and_flags_given_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet9\nimg_size: 32\nbase_lr: 3e-3\nema: true\nrandom_erasing: 0.25\n")
    cfg = TrainConfig(**{**vars(train.get_args_parser().parse_args(["--config", str(recipe), "--img_size", "28"])),
                         **cli.config_values(train.get_args_parser(), str(recipe), {"img_size", "config"})})
    assert (cfg.model, cfg.img_size, cfg.base_lr, cfg.ema, cfg.random_erasing) == ("resnet9", 28, 3e-3, True, 0.25)


@pytest.mark.parametrize(("text", "message"), [
    ("img_sise: 28\n", "r.yaml: unknown key 'img_sise' (did you mean 'img_size'?)"),
    ("img_size: 0\n", "r.yaml: img_size: must be > 0, got 0"),
    ("model: resnet7\n", "r.yaml: model: 'resnet7' is not one of custom, resnet9"),
    ("ema: 1\n", "r.yaml: ema: must be true or false, got 1"),
    ("img_size: null\n", "r.yaml: img_size: has no value"),
    ("- img_size\n", "r.yaml: expected a mapping of flag names to values"),
    ("img_size: [28\n", "r.yaml: not valid YAML"),
])
def test_a_bad_recipe_is_one_line_naming_the_key_and_writes_nothing(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = run_main("train.py", "--config", str(recipe), "--path_to_save", str(tmp_path / "runs"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: --config {recipe}") and message.split("r.yaml")[1] in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_replaying_a_runs_args_json_repeats_the_run(tmp_path, fashion_root):
    """`train.py --config <run>/args.json --path_to_save X` trains the same run again: on a fixed seed and the same
    machine results.csv is equal except the seconds column, and so are the weights."""
    first = run_main("train.py", "--model", "custom", "--img_size", "16", "--max_epoch", "2", "--batch_size", "64",
                     "--num_workers", "0", "--data_root", str(fashion_root), "--path_to_save", str(tmp_path / "a"),
                     "--quiet", "--device", "cpu", "--label_smoothing", "0.1", "--ema", "--ema_decay", "0.9", "--seed", "3")
    assert first.returncode == 0, first.stderr
    run_a = tmp_path / "a" / "FashionMNIST" / "custom"
    again = run_main("train.py", "--config", str(run_a / "args.json"), "--path_to_save", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    run_b = tmp_path / "b" / "FashionMNIST" / "custom"

    def rows(run_dir):
        with open(run_dir / "results.csv", newline="") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert rows(run_a) == rows(run_b) and len(rows(run_a)) == 2
    a, b = (torch.load(d / "last.pth", weights_only=True) for d in (run_a, run_b))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    args_a, args_b = (json.loads((d / "args.json").read_text()) for d in (run_a, run_b))
    assert args_b["config"] == str(run_a / "args.json") and args_b["path_to_save"] == str(tmp_path / "b")
    differ = {k for k in args_a if args_a[k] != args_b.get(k)}
    assert differ == {"config", "path_to_save", "precision_used"}, differ
    # the replay trains with the precision the run chose (its record says how it was chosen this time)
    assert args_b["precision_used"] == {"precision": args_a["precision_used"]["precision"],
                                        "memory_format": args_a["precision_used"]["memory_format"], "chosen_by": "replay"}
