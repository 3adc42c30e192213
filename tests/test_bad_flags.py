"""Every invalid flag value of every script is one line on stderr, exit 2, no traceback.

The cases are not a hand-kept list: every script's parser is read, every numeric flag must have a validating type
(utils.cli.positive / non_negative / in_range), and each value those types refuse is fed to the script's main()
through utils.cli.run, as `python script.py ...` would run it. A few cases also run as real processes."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
from conftest import ROOT, run_script

from utils import cli

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("bench_*.py"),
                                                           *(ROOT / "scripts").glob("*.py")])
NOT_NUMERIC = {None, str}


class Parsed(Exception):
    pass


def load(script: str):
    name = "flagcheck_" + script.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser main() builds, caught when it starts parsing."""
    def grab(self, args=None, namespace=None):
        raise Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        try:
            load(script).main([])
        except Parsed as e:
            return e.args[0]
    raise AssertionError(f"{script}: main() did not parse its flags")


def numeric_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.type not in NOT_NUMERIC and a.nargs != 0]


def bad_cases() -> list[tuple[str, str, list[str]]]:
    cases = []
    mp = pytest.MonkeyPatch()
    try:
        for script in SCRIPTS:
            for action in numeric_actions(parser_of(script, mp)):
                for value in getattr(action.type, "invalid_examples", []):
                    count = action.nargs if isinstance(action.nargs, int) else 1
                    cases.append((script, action.option_strings[-1], [value] * count))
    finally:
        mp.undo()
    return cases


CASES = bad_cases()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_is_validated(script, monkeypatch):
    unchecked = [f"{a.option_strings[-1]} (type {getattr(a.type, '__name__', a.type)})"
                 for a in numeric_actions(parser_of(script, monkeypatch)) if not hasattr(a.type, "invalid_examples")]
    assert not unchecked, f"{script}: give these flags a utils.cli range type: {unchecked}"


def test_the_scripts_with_batch_size_num_workers_all_refuse_bad_values():
    flags = {(script, flag) for script, flag, _ in CASES}
    for script in ("train.py", "eval.py", "quantize.py", "benchmarks/bench_train.py", "benchmarks/bench_infer.py"):
        assert (script, "--batch_size") in flags, script
    for script in ("train.py", "eval.py", "quantize.py", "benchmarks/bench_train.py"):
        assert (script, "--num_workers") in flags, script
    train_flags = {flag for script, flag, _ in CASES if script == "train.py"}
    assert {"--label_smoothing", "--wp_epoch", "--ema_decay", "--mixup_alpha", "--cutmix_alpha", "--img_size",
            "--momentum", "--random_erasing", "--base_lr", "--min_lr", "--clip_grad"} <= train_flags


@pytest.mark.parametrize(("script", "flag", "values"), CASES, ids=[f"{s}:{f}={v[0]}" for s, f, v in CASES])
def test_bad_flag_value_is_one_line_exit_2(script, flag, values, capsys):
    module = load(script)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: module.main([flag, *values]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: argument {flag}"), err


@pytest.mark.parametrize(("argv", "message"), [
    (["train.py", "--batch_size", "0"], "error: argument --batch_size: must be > 0, got 0"),
    (["train.py", "--label_smoothing", "1"], "error: argument --label_smoothing: must be in [0, 1), got 1"),
    (["train.py", "--ema_decay", "nan"], "error: argument --ema_decay: must be a finite number, got nan"),
    (["eval.py", "--weights", "x.pth", "--num_workers", "-1"], "error: argument --num_workers: must be >= 0, got -1"),
    (["train.py", "--wp_epoch", "-1"], "error: argument --wp_epoch: must be >= 0, got -1"),
    (["train.py", "--no_such_flag"], "error: unrecognized arguments: --no_such_flag"),
    (["eval.py", "--summary", "results"], "error: unrecognized arguments: --summary results"),  # summarize_results.py does it
])
def test_bad_flags_in_a_real_process(argv, message):
    result = run_script(*argv)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{message} (see: {argv[0]} --help)"], result.stderr


def test_img_size_below_the_models_minimum_is_one_line(tmp_path):
    result = run_script("train.py", "--model", "custom", "--img_size", "7", "--path_to_save", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: argument --img_size: custom needs at least 8 px, got 7 (see: train.py --help)"], result.stderr
    result = run_script("train.py", "--model", "resnet9", "--img_size", "16", "--small_input", "off",
                        "--path_to_save", str(tmp_path))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: argument --img_size: resnet9 needs at least 31 px with --small_input off, got 16 (see: train.py --help)"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("name", "small_input"), [("custom", True), ("resnet9", True), ("resnet9", False),
                                                   ("resnet18", False), ("mobilenet_v3_small", True)])
def test_min_img_size_is_the_smallest_size_the_network_runs_at(name, small_input):
    import torch

    from models import build_model, min_img_size, model_kwargs

    def runs(size: int) -> bool:
        try:
            model = build_model(name, 3, **model_kwargs(size, "BN", 1, "on" if small_input else "off"))
            model.train()(torch.zeros(2, 1, size, size)).sum().backward()
            model.eval()(torch.zeros(1, 1, size, size))
        except (ValueError, RuntimeError):
            return False
        return True

    size = min_img_size(name, small_input)
    assert runs(size), (name, size)
    assert size == 1 or not runs(size - 1), (name, size)
