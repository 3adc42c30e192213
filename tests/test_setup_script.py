"""scripts/setup.sh, the first step of both README commands: idempotent, and a no-op once everything is installed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The setup script and requirement files in a project layout, with a 'venv' whose python is this interpreter."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("requirements.txt", "requirements-test.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "venv" / "bin" / "python")
    return tmp_path


def requirements_hash(project: Path) -> str:
    data = (project / "requirements.txt").read_bytes() + (project / "requirements-test.txt").read_bytes()
    return hashlib.sha256(data).hexdigest()


def setup(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VENV=str(project / "venv"))
    return subprocess.run(["bash", str(project / "scripts" / "setup.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("installed, args", [("-test", ()), ("-test", ("--test",)), ("", ())])
def test_setup_is_a_no_op_when_the_stamp_matches(project, installed, args):
    """After `setup.sh --test` (the test command), `setup.sh` (the demo) must succeed at once, and vice versa."""
    stamp = project / "venv" / ".requirements.sha"
    stamp.write_text(requirements_hash(project) + installed + "\n")
    result = setup(project, *args)
    assert result.returncode == 0, result.stderr
    assert "pip" not in result.stdout + result.stderr
    assert stamp.read_text() == requirements_hash(project) + installed + "\n"
