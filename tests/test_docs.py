"""Every command in README.md and docs/*.md runs, and every link points somewhere, so the docs cannot rot.

What counts as a command: the lines of each fenced ```bash (or sh/shell) block. Each page's blocks run in page
order, one block per test, each block as one `bash -euo pipefail` script, all blocks of a page in that page's own
working directory, so later blocks use what earlier ones wrote (eval.py reads the best.pth that a train.py block
saved).

The working directories (temp dirs) hold a copy of the repository without its local state (no .git, data, weights,
results, logs), `.venv` as a symlink to the test's environment, synthetic Fashion-MNIST IDX files at
data/FashionMNIST/raw/ (tests/conftest.make_fashion_root; 64 train / 32 test images: the blocks need runs, not
learned models) so default paths work offline, and a small image folder at data/my_images/ (train/ and val/,
3 classes) for examples with your own images.
README.md starts from that (it shows the whole tour from training on). Every docs/*.md page starts from what the
tour produces: one run trained once per test session with the README's own train.py command and exported once with
its export.py command (weights/FashionMNIST/custom/ with best.pth, last.pth, converted_models/custom.onnx and the
custom-latest link), so `python eval.py --weights weights/FashionMNIST/custom-latest/best.pth` works on any page.

Rewrite rules, applied to the block's text before it runs (so commands stay short and CPU-friendly here):
  - `python` / `python3` as a command word (line start, after && || ; | or VAR=value) -> this test's interpreter;
    PATH starts with that interpreter's bin/ so `tensorboard`, `torchrun`, ... come from the same environment
  - --max_epoch N, --epochs N                                  -> 1
  - --img_size N                                               -> unchanged if N <= 32, else 32
  - --batch_size N                                             -> min(N, 64)
  - --speed_repeats/--repeats/--runs/--iters/--warmup N        -> min(N, 2)
  - --time_budget M                                            -> 0 (off: --max_epoch decides)
  - eval.py and quantize.py time latency and throughput 20 times by default: without --speed_repeats they get
    `--speed_repeats 2` (continuation lines are joined first)
  - without a GPU: --device cuda -> --device cpu, and --cuda is dropped
  (both `--flag N` and `--flag=N` forms)
  - --config FILE (a YAML recipe or a run's args.json, read when the block runs): for each value of the file that
    the rules above would rewrite, the rewritten flag is appended after `--config FILE` (e.g. `max_epoch: 15` ->
    `--max_epoch 1`); flags given on the command line win over the file

Blocks that cannot run here are marked by an HTML comment on the line directly above the opening fence, with the
reason in parentheses:  <!-- readme-test: skip (needs a Docker engine) -->
Use it for Docker, GPU-only or multi-hour commands, servers that run until Ctrl-C, and the setup scripts that
create .venv. A marker without a reason, or one not directly above a bash block, fails the test.
Commands shown inline in prose are not run: put every command meant to be copied in a bash block.

Besides: every relative link and image of the pages points to an existing file (and a `#anchor` to a heading of
its page), README.md stays at most README_MAX_LINES lines, every docs page is linked from it and starts with a
command, docs/training.md names every train.py flag, and every recipe under recipes/ is shown in docs/recipes.md and
agrees with the evidence of its measured run in docs/recipes/<run>/args.json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import make_fashion_root, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 200
FMNIST_TRAIN, FMNIST_TEST = 64, 32  # synthetic Fashion-MNIST of the working directories: one or two batches an epoch
TIMED_SCRIPTS = ("eval.py", "quantize.py")  # their --speed_repeats defaults to 20
FIRST_SCREEN_LINES = 40
BLOCK_TIMEOUT_S = 900
SHELL_LANGS = {"bash", "sh", "shell"}
MARKER = re.compile(r"^<!--\s*readme-test:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*\S.*)\)\s*$")
CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache"}
LOCAL_STATE = {".git", ".venv", "data", "weights", "results", "logs", "runs", "__pycache__", ".pytest_cache",
               ".ruff_cache"}
# where a recipe's run writes and how it prints: the evidence runs wrote elsewhere, nothing else may differ
WHERE_FLAGS = {"path_to_save", "log_dir", "quiet", "config"}


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@dataclass
class Block:
    page: Path
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
        return f"{page_name(self.page)}:{self.line} {first[:60]}"


def parse_page(text: str, page: Path = README) -> tuple[list[Block], list[tuple[int, str]]]:
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
            blocks.append(Block(page, i + 1, fence[3].lower(), "\n".join(lines[i + 1:j]), above["body"] if above else None))
            i = j
        i += 1
    return blocks, markers


PARSED = {page: parse_page(page.read_text(), page) for page in PAGES}
SHELL_BLOCKS = [b for page in PAGES for b in PARSED[page][0] if b.lang in SHELL_LANGS]
RUNNABLE = [b for b in SHELL_BLOCKS if b.marker is None]
README_SHELL = [b for b in SHELL_BLOCKS if b.page == README]


def _number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


# (flags, rewrite of the value): the one table of rules, for command lines and for --config files alike
RULES = [("max_epoch|epochs", lambda n: 1),
         ("img_size", lambda n: min(n, 32)),
         ("batch_size", lambda n: min(n, 64)),
         ("speed_repeats|repeats|runs|iters|warmup", lambda n: min(n, 2)),
         ("time_budget", lambda n: 0)]


def cap(flags: str, fn):
    names = "|".join(f"--{name}" for name in flags.split("|"))
    pattern = re.compile(rf"(?P<flag>(?<![\w-])(?:{names}))(?P<sep>[ =]+)(?P<value>\d+(?:\.\d+)?)(?![\w.])")
    return lambda text: pattern.sub(lambda m: f"{m['flag']}{m['sep']}{fn(_number(m['value']))}", text)


def config_overrides(path: Path, has_cuda: bool) -> list[str]:
    """The flags that make a --config file's values obey the rules (appended after --config FILE: they win)."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    out = []
    for key, value in (data or {}).items():
        rule = next((fn for flags, fn in RULES if key in flags.split("|")), None)
        if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and rule(value) != value:
            out += [f"--{key}", str(rule(value))]
        if not has_cuda and key == "device" and value == "cuda":
            out += ["--device", "cpu"]
        if not has_cuda and key == "cuda" and value is True:
            raise ValueError(f"{path}: 'cuda: true' cannot be undone on the command line; leave it out of the recipe")
    return out


def rewrite(code: str, python: str = sys.executable, has_cuda: bool = False, cwd: Path | None = None) -> str:
    """Apply the rules in the module docstring to a block's text (--config files are read relative to `cwd`)."""
    code = re.sub(r"[ \t]*\\\n\s*", " ", code)  # one line per command
    timed = re.compile(rf"(?<![\w/-])({'|'.join(map(re.escape, TIMED_SCRIPTS))})(?=\s|$)")
    code = "".join(part if "--speed_repeats" in part else timed.sub(r"\1 --speed_repeats 2", part, count=1)
                   for part in re.split(r"(&&|\|\||;|\||\n)", code))  # command by command
    code = re.sub(r"(?m)(^|&&|\|\||;|\|)(\s*(?:\w+=\S*\s+)*)python3?(?=\s|$)",
                  lambda m: f"{m[1]}{m[2]}{shlex.quote(python)}", code)
    code = re.sub(r"(?<![\w-])--config(?P<sep>[ =]+)(?P<file>[^\s;&|]+)",
                  lambda m: " ".join([m[0], *config_overrides(Path(cwd or ".") / m["file"], has_cuda)]), code)
    for flags, fn in RULES:
        code = cap(flags, fn)(code)
    if not has_cuda:
        code = re.sub(r"--device([ =]+)cuda\b", r"--device\1cpu", code)
        code = re.sub(r"[ \t]+--cuda(?![\w-])", "", code)
    return code


def command_lines(code: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def run_block(code: str, cwd: Path, label: str) -> None:
    import torch

    script = rewrite(code, has_cuda=torch.cuda.is_available(), cwd=cwd)
    env = dict(os.environ, MPLBACKEND="Agg", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    output = f"{label}\n--- ran ---\n{script}\n--- output ---\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "Traceback" not in result.stderr, output


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def base_tree(tmp_path_factory) -> Path:
    """The repository without its local state, with synthetic data: README's starting point."""
    work = tmp_path_factory.mktemp("docs_base") / "classification"

    def local_state(folder: str, names: list[str]) -> list[str]:
        """The checkout's own state at the top (data/, weights/, ...; not utils/data/), caches anywhere."""
        top = Path(folder) == ROOT
        return [n for n in names if (top and n in LOCAL_STATE) or n in CACHES or n.endswith(".pyc")]

    shutil.copytree(ROOT, work, ignore=local_state)
    # the one tracked part of weights/: the ready-made models of docs/models.md
    shutil.copytree(ROOT / "weights" / "fashion_mnist", work / "weights" / "fashion_mnist")
    os.symlink(Path(sys.executable).parent.parent, work / ".venv")
    make_fashion_root(work / "data", n_train=FMNIST_TRAIN, n_test=FMNIST_TEST)
    shutil.copy(ROOT / "data" / "FashionMNIST" / "classes.txt", work / "data" / "FashionMNIST" / "classes.txt")
    make_image_folder(work / "data" / "my_images")
    return work


def tour_command(script: str) -> str:
    """The README's own command for `script` (its first runnable one)."""
    commands = [c for b in README_SHELL if b.marker is None for c in command_lines(b.code)
                if c.split()[:2] == ["python", script]]
    assert commands, f"README.md has no runnable `python {script}` command"
    return commands[0]


@pytest.fixture(scope="session")
def seeded_tree(base_tree, tmp_path_factory) -> Path:
    """base_tree plus what the README tour leaves: one run trained by its train.py command, exported by its
    export.py command (once per session; every docs page starts from a copy)."""
    work = copy_tree(base_tree, tmp_path_factory.mktemp("docs_seeded") / "classification")
    for script in ("train.py", "export.py"):
        run_block(tour_command(script), work, f"seed: the README's {script} command")
    assert (work / "weights" / "FashionMNIST" / "custom-latest" / "converted_models" / "custom.onnx").is_file()
    return work


@pytest.fixture(scope="session")
def page_dirs(tmp_path_factory):
    """One working directory per page, made when the page's first block runs."""
    made: dict[Path, Path] = {}
    return made


def test_rewrite_rules(tmp_path):
    py = "/env/bin/python"
    assert rewrite("python train.py --img_size 224 --max_epoch 5 --batch_size 128", py) == \
        f"{py} train.py --img_size 32 --max_epoch 1 --batch_size 64"
    assert rewrite("python3 eval.py --img_size=28 --speed_repeats=50 --device cuda --cuda", py) == \
        f"{py} eval.py --img_size=28 --speed_repeats=2 --device cpu"
    assert rewrite("python train.py --img_size 64 --img_size=56", py) == f"{py} train.py --img_size 32 --img_size=32"
    assert rewrite("cd x && EPOCHS=1 python a.py --epochs 3\n.venv/bin/python b.py --max_epochs 9", py) == \
        f"cd x && EPOCHS=1 {py} a.py --epochs 1\n.venv/bin/python b.py --max_epochs 9"
    assert rewrite("python -m pytest --device cuda", py, has_cuda=True) == f"{py} -m pytest --device cuda"
    assert rewrite("python eval.py --weights a.pth && python quantize.py --weights a.pth \\\n    --mode int8\n"
                   "python eval.py --speed_repeats 0", py) == \
        f"{py} eval.py --speed_repeats 2 --weights a.pth && {py} quantize.py --speed_repeats 2 --weights a.pth --mode int8\n" \
        f"{py} eval.py --speed_repeats 0"
    assert rewrite("python train.py --time_budget 10 --max_epoch 20", py) == f"{py} train.py --time_budget 0 --max_epoch 1"
    assert rewrite("python train.py --time_budget=0.5", py) == f"{py} train.py --time_budget=0"
    (tmp_path / "r.yaml").write_text("model: custom\nimg_size: 56\nmax_epoch: 15\nbatch_size: 128\ntime_budget: 10\n"
                                     "device: cuda\nema: true\nbase_lr: 0.2\n")
    assert rewrite("python train.py --config r.yaml --name x", py, cwd=tmp_path) == \
        f"{py} train.py --config r.yaml --img_size 32 --max_epoch 1 --batch_size 64 --time_budget 0 --device cpu --name x"
    (tmp_path / "args.json").write_text(json.dumps({"img_size": 224, "max_epoch": 1, "fp16": True}))
    assert rewrite("python train.py --config=args.json", py, cwd=tmp_path) == \
        f"{py} train.py --config=args.json --img_size 32"
    (tmp_path / "gpu.yaml").write_text("cuda: true\n")
    with pytest.raises(ValueError, match="cannot be undone"):
        rewrite("python train.py --config gpu.yaml", py, cwd=tmp_path)


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_markers_are_skips_with_reasons_above_bash_blocks(page):
    blocks, markers = PARSED[page]
    attached = {b.line - 1: b for b in blocks if b.lang in SHELL_LANGS and b.marker is not None}
    for line, body in markers:
        assert SKIP.match(body), f"{page_name(page)}:{line}: write <!-- readme-test: skip (the reason) -->, got {body.strip()!r}"
        assert line in attached, f"{page_name(page)}:{line}: the skip marker must sit on the line directly above a ```bash block"
    assert all(b.skip_reason for b in attached.values())


def test_the_readme_is_short_and_tours_the_main_job():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/ (at most {README_MAX_LINES})"
    tour = [c.split()[1] for b in README_SHELL if b.marker is None for c in command_lines(b.code) if c.startswith("python ")]
    steps = ["train.py", "eval.py", "export.py", "predict.py"]
    assert [s for s in tour if s in steps] == steps, tour
    assert tour[-1] not in steps, f"the tour ends with understanding the model, not {tour[-1]}"


def test_first_screen_shows_demo_test_and_docker_commands():
    first_screen = [ln.strip() for ln in README.read_text().splitlines()[:FIRST_SCREEN_LINES]]
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "docker build -t classification .",
                    "docker run --gpus all -p 6006:6006 -it -v $PWD:/app/classification classification"):
        assert command in first_screen, f"{command!r} is not in the README's first {FIRST_SCREEN_LINES} lines"


def test_ci_runs_the_readme_test_command():
    readme_test = [c for b in README_SHELL for c in command_lines(b.code) if "scripts/test.sh" in c]
    assert readme_test == ["bash scripts/test.sh"], readme_test
    assert readme_test[0] in command_lines((ROOT / ".ci" / "run").read_text())


def test_docs_tensorboard_command_is_what_make_tensorboard_runs():
    made = subprocess.run(["make", "--no-print-directory", "-n", "tensorboard", "VENV=venv"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, check=True).stdout.split()
    shown = [c.split() for b in SHELL_BLOCKS for c in command_lines(b.code) if c.split()[0] == "tensorboard"]
    assert shown and all(c == ["tensorboard", *made[1:]] for c in shown), (shown, made)
    assert any(c == "make tensorboard" for b in SHELL_BLOCKS for c in command_lines(b.code))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - and _), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^(`{3,}|~{3,}).*?^\1", "", page.read_text())  # no headings inside code blocks
    return {slug(m[1]) for m in re.finditer(r"(?m)^#{1,6}\s+(.*?)\s*#*\s*$", text)}


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[tuple[int, str]]:
    out, in_code = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if re.match(r"^\s*(`{3,}|~{3,})", line):
            in_code = not in_code
        if not in_code:
            out += [(n, m["target"]) for m in LINK.finditer(re.sub(r"`[^`]*`", "", line))]
    return out


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_relative_links_and_images_point_to_existing_files_and_headings(page):
    broken = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page_name(page)}:{line}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_and_starts_with_a_command():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page_name(page)}"
        if page.name == "ARCHITECTURE.md":
            continue
        before_first_section = page.read_text().split("\n## ")[0]
        assert re.search(r"(?m)^```bash$", before_first_section), \
            f"{page_name(page)}: start with what the user achieves and the shortest command for it (a ```bash block)"


def test_the_training_manual_names_every_train_flag():
    import train

    manual = (DOCS / "training.md").read_text()
    missing = [s for a in train.get_args_parser()._actions for s in a.option_strings
               if s.startswith("--") and s != "--help" and not re.search(rf"{re.escape(s)}(?![\w-])", manual)]
    assert not missing, f"docs/training.md does not explain {missing}"


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_every_recipe_is_a_checked_file_shown_in_the_recipes_page():
    import train
    from utils import cli

    parser = train.get_args_parser()
    shown = {c for b in SHELL_BLOCKS if b.page == DOCS / "recipes.md" for c in command_lines(b.code)}
    assert len(RECIPES) >= 5
    for recipe in RECIPES:
        name = f"recipes/{recipe.name}"
        text = recipe.read_text()
        header = [ln for ln in text.splitlines() if ln.strip()][:3]
        assert all(ln.startswith("#") for ln in header), f"{name}: start with a comment header (what it is, its result, date/CPU)"
        assert f"python train.py --config {name}" in text, f"{name}: its header shows the command"
        assert f"python train.py --config {name}" in shown, f"docs/recipes.md does not show `python train.py --config {name}`"
        assert cli.config_values(parser, str(recipe), set()), name  # every key a flag, every value passes its checks
    for command in (c for b in SHELL_BLOCKS for c in command_lines(b.code)):
        for used in re.findall(r"--config[ =]+(recipes/\S+)", command):
            assert (ROOT / used).is_file(), f"{command!r}: no {used}"


def test_each_measured_recipe_is_the_run_of_its_evidence():
    """docs/recipes/<run>/args.json is what train.py recorded for the measured run; the recipe with that run name
    (`name`, else `model`) must give the same flags, apart from where the run wrote."""
    import train

    defaults = {a.dest: a.default for a in train.get_args_parser()._actions if a.dest != "help"}
    recipes = {recipe.name: yaml.safe_load(recipe.read_text()) for recipe in RECIPES}
    for evidence in sorted((DOCS / "recipes").iterdir()):
        recorded = json.loads((evidence / "args.json").read_text())
        matching = [n for n, r in recipes.items() if r.get("name", r.get("model")) == evidence.name]
        assert len(matching) == 1, f"docs/recipes/{evidence.name}: no (or several) recipe file named for it: {matching}"
        recipe = recipes[matching[0]]
        differ = {k: (recorded.get(k, v), recipe.get(k, v)) for k, v in defaults.items()
                  if k not in WHERE_FLAGS and recorded.get(k, v) != recipe.get(k, v)}
        # what the run resolved itself: an automatic --crop_pct (recorded as the value used), and the epochs a
        # --time_budget planned (recorded since the budget re-plans; never more than the recipe's --max_epoch)
        if "crop_pct" in differ and recipe.get("crop_pct", defaults["crop_pct"]) is None:
            del differ["crop_pct"]
        if "max_epoch" in differ and recipe.get("time_budget") and differ["max_epoch"][0] <= differ["max_epoch"][1]:
            del differ["max_epoch"]
        assert not differ, f"recipes/{matching[0]} differs from docs/recipes/{evidence.name}/args.json (recorded, recipe): {differ}"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{page_name(b.page)}:{b.line}" for b in RUNNABLE])
def test_docs_block_runs(block: Block, page_dirs, request, tmp_path_factory):
    if block.page not in page_dirs:
        start = request.getfixturevalue("base_tree" if block.page == README else "seeded_tree")
        page_dirs[block.page] = copy_tree(start, tmp_path_factory.mktemp(block.page.stem) / "classification")
    run_block(block.code, page_dirs[block.page], block.label)
