"""utils.cli.run: how every script ends (exit codes, one-line errors, a closed pipe)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from utils import cli
from utils.errors import InputError

def main():
    if sys.argv[1] == "flood":
        for i in range(200000):
            print(f"line {i} " + "x" * 60)
    raise InputError("bad --thing: use --thing 3")

cli.run(main)
"""


def run(mode: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_input_error_is_one_line_and_exit_2():
    proc = run("error")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.decode().splitlines() == ["error: bad --thing: use --thing 3"]


def test_reader_closing_the_pipe_is_not_a_traceback():
    """`python script.py | head -1`: the reader leaves early; the script stops quietly with exit code 0."""
    proc = run("flood")
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert first.startswith(b"line 0 ")
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_run_main_in_process_gives_what_a_real_process_gives(tmp_path):
    """The in-process runner the tests use where the process boundary is not what is tested: same exit code, same one
    error line, same stdout as `python script ...`."""
    from conftest import run_main, run_script

    for args in (["eval.py", "--weights", str(tmp_path / "missing.pth")], ["train.py", "--batch_size", "0"],
                 ["summarize_results.py", "--results_dir", str(tmp_path)]):
        real, here = run_script(*args), run_main(*args)
        assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr), args
        assert real.returncode == 2 and len(real.stderr.splitlines()) == 1


def test_train_help_is_grouped_short_and_names_the_manual():
    import train

    p = train.get_args_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups if g._group_actions}
    assert {"model", "augmentation and regularisation", "data", "optimisation and schedule", "length and evaluation",
            "precision and speed", "run directory and outputs"} <= set(groups)
    assert len(groups["options"]) <= 2, groups["options"]  # --help and --config; every other flag sits in a group
    long = [(a.dest, len(a.help)) for a in p._actions if len(a.help) > 120]
    assert not long, f"help texts over 120 characters: {long}"
    assert "docs/training.md" in p.format_help()
    assert (ROOT / "docs" / "training.md").is_file()


def test_every_script_has_get_args_parser_and_main_argv():
    """One shape for every script at the root (torchvision's references): get_args_parser() builds the parser without
    parsing, main(argv=None) runs it; so a test, a notebook or another tool can call any script in-process."""
    import argparse
    import importlib
    import inspect

    names = sorted(p.stem for p in ROOT.glob("*.py"))
    assert len(names) >= 15, names
    for name in names:
        module = importlib.import_module(name)
        parser = module.get_args_parser()
        assert isinstance(parser, argparse.ArgumentParser), name
        assert parser.format_help().startswith("usage:"), name
        assert list(inspect.signature(module.main).parameters) == ["argv"], name
        assert inspect.signature(module.main).parameters["argv"].default is None, name
