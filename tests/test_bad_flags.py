"""Every invalid flag value of every script is one line on stderr, exit 2, no traceback.

The cases are not a hand-kept list: every script's parser is read, every numeric flag must have a validating type
(utils.cli.positive / non_negative / in_range), and each value those types refuse is fed to the script's main()
through utils.cli.run, as `python script.py ...` would run it (conftest.run_main: same exit code and stderr as a real
process, tests/test_cli.py). One test per script checks all its flags and values and names every failing one; two cases
also run as real processes."""

from __future__ import annotations

import argparse

import pytest
from conftest import ROOT, run_main, run_script, script_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("bench_*.py"),
                                                           *(ROOT / "scripts").glob("*.py")])
NOT_NUMERIC = {None, str}


class Parsed(Exception):
    pass


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser main() builds, caught when it starts parsing."""
    def grab(self, args=None, namespace=None):
        raise Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        try:
            script_module(script).main([])
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
def test_every_numeric_flag_is_validated_and_each_bad_value_is_one_line_exit_2(script, monkeypatch):
    """Each numeric flag has a utils.cli range type, and each value it refuses (its invalid_examples) makes the script
    exit 2 with one line on stderr naming the flag, no traceback. All flags and values are tried; the message names
    every one that failed."""
    actions = numeric_actions(parser_of(script, monkeypatch))
    unchecked = [f"{a.option_strings[-1]} (type {getattr(a.type, '__name__', a.type)})"
                 for a in actions if not hasattr(a.type, "invalid_examples")]
    assert not unchecked, f"{script}: give these flags a utils.cli range type: {unchecked}"
    cases = [(flag, values) for s, flag, values in CASES if s == script]
    assert len(cases) >= 2 * len(actions), (script, cases)  # every validated flag refuses at least two values
    failures = []
    for flag, values in cases:
        try:
            proc = run_main(script, flag, *values)
        except Exception as e:  # noqa: BLE001 (a crash is a failure of this case, reported with the others)
            failures.append(f"{flag} {' '.join(values)}: raised {type(e).__name__}: {e}")
            continue
        err = proc.stderr
        if proc.returncode != 2 or err.count("\n") != 1 or "Traceback" in err or not err.startswith(f"error: argument {flag}"):
            failures.append(f"{flag} {' '.join(values)}: exit {proc.returncode}, stderr {err!r}")
    assert not failures, f"{script}: {len(failures)} of {len(cases)} bad values not refused as one line + exit 2:\n" + \
        "\n".join(failures)


def test_the_scripts_with_batch_size_num_workers_all_refuse_bad_values():
    flags = {(script, flag) for script, flag, _ in CASES}
    for script in ("train.py", "eval.py", "quantize.py", "benchmarks/bench_train.py", "benchmarks/bench_infer.py"):
        assert (script, "--batch_size") in flags, script
    for script in ("train.py", "eval.py", "quantize.py", "benchmarks/bench_train.py"):
        assert (script, "--num_workers") in flags, script
    train_flags = {flag for script, flag, _ in CASES if script == "train.py"}
    assert {"--label_smoothing", "--wp_epoch", "--ema_decay", "--mixup_alpha", "--cutmix_alpha", "--img_size",
            "--momentum", "--random_erasing", "--base_lr", "--min_lr", "--clip_grad"} <= train_flags


BAD_FLAG_MESSAGES = [
    (["train.py", "--batch_size", "0"], "error: argument --batch_size: must be > 0, got 0"),
    (["train.py", "--label_smoothing", "1"], "error: argument --label_smoothing: must be in [0, 1), got 1"),
    (["train.py", "--ema_decay", "nan"], "error: argument --ema_decay: must be a finite number, got nan"),
    (["eval.py", "--weights", "x.pth", "--num_workers", "-1"], "error: argument --num_workers: must be >= 0, got -1"),
    (["train.py", "--wp_epoch", "-1"], "error: argument --wp_epoch: must be >= 0, got -1"),
    (["train.py", "--no_such_flag"], "error: unrecognized arguments: --no_such_flag"),
    (["eval.py", "--summary", "results"], "error: unrecognized arguments: --summary results"),  # summarize_results.py does it
]


def test_bad_flags_give_the_exact_one_line_message():
    """The exact line, with the --help hint named after the script; in-process through utils.cli.run."""
    wrong = []
    for argv, message in BAD_FLAG_MESSAGES:
        result = run_main(*argv)
        if result.returncode != 2 or result.stderr.splitlines() != [f"{message} (see: {argv[0]} --help)"]:
            wrong.append(f"{' '.join(argv)}: exit {result.returncode}, stderr {result.stderr!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("argv", "message"), [
    (["predict.py", "--model", "m.onnx", "--image", "x.png", "--batch_size", "0"],
     "error: argument --batch_size: must be > 0, got 0"),
    (["predict.py", "--model", "m.onnx", "--image", "x.png", "--no_such_flag"], "error: unrecognized arguments: --no_such_flag"),
])
def test_bad_flags_in_a_real_process(argv, message):
    """The real boundary, `python script.py ...`: exit 2 with that one line (a range type's error and argparse's own).
    predict.py starts without torch, so these cost well under a second each; tests/test_cli.py runs train.py and eval.py
    with bad input in real processes and compares them with run_main."""
    result = run_script(*argv)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{message} (see: {argv[0]} --help)"], result.stderr


def test_img_size_below_the_models_minimum_is_one_line(tmp_path):
    result = run_main("train.py", "--model", "custom", "--img_size", "7", "--path_to_save", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: argument --img_size: custom needs at least 8 px, got 7 (see: train.py --help)"], result.stderr
    result = run_main("train.py", "--model", "resnet9", "--img_size", "16", "--small_input", "off",
                      "--path_to_save", str(tmp_path))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: argument --img_size: resnet9 needs at least 31 px with --small_input off, got 16 (see: train.py --help)"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("name", "small_input"), [("custom", True), ("resnet9", True), ("resnet9", False), ("speednet", True),
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
