"""File output shared by every script: the one atomic-write helper, JSON, markdown tables and file hashes.

Every file the toolkit writes goes through `atomic_path`: the content is written under a hidden temporary
name in the destination folder and renamed into place only when complete, so a crash, a full disk or a
Ctrl-C never leaves half a file under the real name (and an earlier file stays intact). The temporary file
is removed when writing fails. Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

TEMP_MARKER = ".tmp"


def temp_sibling(path: str | Path) -> Path:
    """A hidden sibling `.<stem>.tmp<pid><suffix>`: same folder (so the rename is atomic) and same suffix
    (ONNX Runtime, torch.jit and Pillow choose formats by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TEMP_MARKER}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it is renamed to `path`, on any
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, payload, **dumps_kwargs) -> Path:
    """JSON with 2-space indent and a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, **dumps_kwargs) + "\n")


def json_default(value):
    """json.dumps(default=...) for what reports hold besides JSON types: tuples, sets, torch.Size, numpy/torch scalars."""
    if isinstance(value, (tuple, set, list)) or type(value).__name__ == "Size":
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def publish_report(out_dir: str | Path, stem: str, text: str, payload: dict, *, as_json: bool,
                   text_suffix: str = ".txt") -> tuple[Path, Path]:
    """Write <stem><text_suffix> and <stem>.json, then print the JSON (as_json) or the text and where both went."""
    out_dir = Path(out_dir)
    text_path, json_path = out_dir / f"{stem}{text_suffix}", out_dir / f"{stem}.json"
    atomic_write_text(text_path, text.rstrip("\n") + "\n")
    write_json(json_path, payload, default=json_default)
    if as_json:
        print(json.dumps(payload, default=json_default))
    else:
        print(text)
        print(f"\nwritten: {text_path} and {json_path}")
    return text_path, json_path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], fmt: Callable[[object], str] = str) -> str:
    """A GitHub markdown table; each cell is rendered with `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
