"""Every command in README.md runs, so the README cannot rot.

What counts as a command: the lines of each fenced ```bash (or sh/shell) block. They run in README order, one block
per test, each block as one `bash -euo pipefail` script, all in the same working directory, so later blocks use
what earlier ones wrote (eval.py reads the best.pth that the train.py block saved).

The working directory (a temp dir) holds a copy of the repository without its local state (no .git, data, weights,
results, logs), `.venv` as a symlink to the test's environment, synthetic Fashion-MNIST IDX files at
data/FashionMNIST/raw/ (tests/conftest.make_fashion_root: 320 train / 160 test images) so default paths work
offline, and a small image folder at data/my_images/ (train/ and val/, 3 classes) for examples with your own images.

Rewrite rules, applied to the block's text before it runs (so commands stay short and CPU-friendly here):
  - `python` / `python3` as a command word (line start, after && || ; | or VAR=value) -> this test's interpreter;
    PATH starts with that interpreter's bin/ so `tensorboard`, `torchrun`, ... come from the same environment
  - --max_epoch N, --epochs N                                  -> 1
  - --img_size N                                               -> unchanged if N <= 64, else 32
  - --batch_size N                                             -> min(N, 64)
  - --speed_repeats/--repeats/--runs/--iters/--warmup N        -> min(N, 2)
  - without a GPU: --device cuda -> --device cpu, and --cuda is dropped
  (both `--flag N` and `--flag=N` forms)

Blocks that cannot run here are marked by an HTML comment on the line directly above the opening fence, with the
reason in parentheses:  <!-- readme-test: skip (needs a Docker engine) -->
Use it for Docker, GPU-only or multi-hour commands, servers that run until Ctrl-C, and the setup scripts that
create .venv. A marker without a reason, or one not directly above a bash block, fails the test.
Commands shown inline in prose are not run: put every command meant to be copied in a bash block.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_fashion_root, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIRST_SCREEN_LINES = 40
BLOCK_TIMEOUT_S = 900
SHELL_LANGS = {"bash", "sh", "shell"}
MARKER = re.compile(r"^<!--\s*readme-test:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*\S.*)\)\s*$")
CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache"}
LOCAL_STATE = {".git", ".venv", "data", "weights", "results", "logs", "runs", "__pycache__", ".pytest_cache",
               ".ruff_cache"}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the readme-test comment directly above, if any

    @property
    def skip_reason(self) -> str | None:
        m = SKIP.match(self.marker or "")
        return m["reason"].strip() if m else None

    @property
    def label(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
        return f"README.md:{self.line} {first[:60]}"


def parse_readme(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """Fenced blocks with the marker above each, and every readme-test marker found (line, body)."""
    lines = text.splitlines()
    blocks, markers, i = [], [], 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            markers.append((i + 1, m["body"]))
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if fence:
            close = fence[2]
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(close):
                j += 1
            above = MARKER.match(lines[i - 1].strip()) if i > 0 else None
            blocks.append(Block(i + 1, fence[3].lower(), "\n".join(lines[i + 1:j]), above["body"] if above else None))
            i = j
        i += 1
    return blocks, markers


BLOCKS, MARKERS = parse_readme(README.read_text())
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL_LANGS]
RUNNABLE = [b for b in SHELL_BLOCKS if b.marker is None]


def cap(flags: str, fn):
    pattern = re.compile(rf"(?P<flag>(?<![\w-])(?:{flags}))(?P<sep>[ =]+)(?P<value>\d+)\b")
    return lambda text: pattern.sub(lambda m: f"{m['flag']}{m['sep']}{fn(int(m['value']))}", text)


def rewrite(code: str, python: str = sys.executable, has_cuda: bool = False) -> str:
    """Apply the rules in the module docstring to a block's text."""
    code = re.sub(r"(?m)(^|&&|\|\||;|\|)(\s*(?:\w+=\S*\s+)*)python3?(?=\s|$)",
                  lambda m: f"{m[1]}{m[2]}{shlex.quote(python)}", code)
    for rule in (cap("--max_epoch|--epochs", lambda n: 1),
                 cap("--img_size", lambda n: n if n <= 64 else 32),
                 cap("--batch_size", lambda n: min(n, 64)),
                 cap("--speed_repeats|--repeats|--runs|--iters|--warmup", lambda n: min(n, 2))):
        code = rule(code)
    if not has_cuda:
        code = re.sub(r"--device([ =]+)cuda\b", r"--device\1cpu", code)
        code = re.sub(r"[ \t]+--cuda(?![\w-])", "", code)
    return code


def command_lines(code: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme") / "classification"
    def local_state(folder: str, names: list[str]) -> list[str]:
        """The checkout's own state at the top (data/, weights/, ...; not utils/data/), caches anywhere."""
        top = Path(folder) == ROOT
        return [n for n in names if (top and n in LOCAL_STATE) or n in CACHES or n.endswith(".pyc")]

    shutil.copytree(ROOT, work, ignore=local_state)
    os.symlink(Path(sys.executable).parent.parent, work / ".venv")
    make_fashion_root(work / "data")
    shutil.copy(ROOT / "data" / "FashionMNIST" / "classes.txt", work / "data" / "FashionMNIST" / "classes.txt")
    make_image_folder(work / "data" / "my_images")
    return work


def test_rewrite_rules():
    py = "/env/bin/python"
    assert rewrite("python train.py --img_size 224 --max_epoch 5 --batch_size 128", py) == \
        f"{py} train.py --img_size 32 --max_epoch 1 --batch_size 64"
    assert rewrite("python3 eval.py --img_size=28 --speed_repeats=50 --device cuda --cuda", py) == \
        f"{py} eval.py --img_size=28 --speed_repeats=2 --device cpu"
    assert rewrite("cd x && EPOCHS=1 python a.py --epochs 3\n.venv/bin/python b.py --max_epochs 9", py) == \
        f"cd x && EPOCHS=1 {py} a.py --epochs 1\n.venv/bin/python b.py --max_epochs 9"
    assert rewrite("python -m pytest --device cuda", py, has_cuda=True) == f"{py} -m pytest --device cuda"


def test_readme_markers_are_skips_with_reasons_above_bash_blocks():
    attached = {b.line - 1: b for b in SHELL_BLOCKS if b.marker is not None}
    for line, body in MARKERS:
        assert SKIP.match(body), f"README.md:{line}: write <!-- readme-test: skip (the reason) -->, got {body.strip()!r}"
        assert line in attached, f"README.md:{line}: the skip marker must sit on the line directly above a ```bash block"
    assert all(b.skip_reason for b in attached.values())
    labels = [b.label for b in RUNNABLE]
    assert any("train.py" in label for label in labels) and any("eval.py" in label for label in labels), labels


def test_first_screen_shows_demo_test_and_docker_commands():
    first_screen = [ln.strip() for ln in README.read_text().splitlines()[:FIRST_SCREEN_LINES]]
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "docker build -t classification .",
                    "docker run --gpus all -p 6006:6006 -it -v $PWD:/app/classification classification"):
        assert command in first_screen, f"{command!r} is not in the README's first {FIRST_SCREEN_LINES} lines"


def test_ci_runs_the_readme_test_command():
    readme_test = [c for b in SHELL_BLOCKS for c in command_lines(b.code) if "scripts/test.sh" in c]
    assert readme_test == ["bash scripts/test.sh"], readme_test
    assert readme_test[0] in command_lines((ROOT / ".ci" / "run").read_text())


def test_readme_tensorboard_command_is_what_make_tensorboard_runs():
    made = subprocess.run(["make", "--no-print-directory", "-n", "tensorboard", "VENV=venv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True).stdout.split()
    readme = [c.split() for b in SHELL_BLOCKS for c in command_lines(b.code) if c.split()[0] == "tensorboard"]
    assert readme and all(c == ["tensorboard", *made[1:]] for c in readme), (readme, made)
    assert any(c == "make tensorboard" for b in SHELL_BLOCKS for c in command_lines(b.code))


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b.line}" for b in RUNNABLE])
def test_readme_block_runs(block: Block, workdir: Path):
    import torch

    script = rewrite(block.code, has_cuda=torch.cuda.is_available())
    env = dict(os.environ, MPLBACKEND="Agg", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    output = f"{block.label}\n--- ran ---\n{script}\n--- output ---\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "Traceback" not in result.stderr, output
