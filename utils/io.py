"""File output shared by every script: the one atomic-write helper, JSON, markdown tables and file hashes.

Every file the toolkit writes goes through `atomic_path`: the content is written under a hidden temporary
name in the destination folder and renamed into place only when complete, so a crash, a full disk or a
Ctrl-C never leaves half a file under the real name (and an earlier file stays intact). The temporary file
is removed when writing fails; one left by a killed process (SIGKILL, power loss) carries that process's id in its
name, so the next run writing in that folder removes it (`remove_stale_temps`). A write the system refuses (disk
full, read-only, no permission, missing folder) is an InputError naming the path and the cause. Torch-free.

Terminal text shows file names through `display_path` (and whole lines through `display_line`): a name may hold
newlines, carriage returns or ANSI escape sequences (which could forge result lines) or bytes that are not UTF-8
(which crash a strict UTF-8 stdout); files (CSV, JSON Lines) keep the exact names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from utils.errors import InputError

TEMP_MARKER = ".tmp-"
# `.<stem>.tmp-<pid><suffix>`: what temp_sibling names; the pid tells whether its writer is still alive
TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[^.]*)?$")
# what the system says when a write cannot happen: the user's environment, not a bug (-> one line, exit 2)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                errno.EEXIST, errno.EISDIR, errno.EFBIG}


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# bidirectional overrides and isolates reorder what a terminal shows; line/paragraph separators break lines
_INVISIBLE = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(text: str, backslash: bool) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by os.fsdecode's surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == "\\" and backslash:
            out.append("\\\\")
        elif ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def display_path(path: str | os.PathLike) -> str:
    """A file name as terminal text: control characters (newline, carriage return, ESC of ANSI sequences), bidi
    overrides and bytes that are not UTF-8 written as Python-style escapes (a backslash too, so the text is
    unambiguous), so a hostile name can neither forge output lines nor crash a strict UTF-8 stdout."""
    text = os.fspath(path)
    return _escape(os.fsdecode(text) if isinstance(text, bytes) else text, backslash=True)


def display_line(text: str) -> str:
    """A message as one terminal line: the escapes of display_path (backslashes kept as they are: prose), so a file
    name quoted inside an error message cannot break the line or the output encoding."""
    return _escape(text, backslash=False)


def temp_sibling(path: str | Path) -> Path:
    """A hidden sibling `.<stem>.tmp-<pid><suffix>`: same folder (so the rename is atomic), same suffix (ONNX
    Runtime, torch.jit and Pillow choose formats by it) and the writer's pid (so a leftover can be told stale)."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TEMP_MARKER}{os.getpid()}{path.suffix}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in `folder` (their pid no longer runs; this process's own
    and live processes' are kept). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = TEMP_NAME.match(entry.name)
        if m and entry.is_file() and not entry.is_symlink() and not process_alive(int(m["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_error(e: OSError, path: Path) -> InputError:
    """An OSError of writing `path` as one line: the cause (the system's words) and the path, then a fix."""
    cause = os.strerror(e.errno).lower() if e.errno else str(e)
    where = e.filename if e.filename and Path(e.filename) not in (path, temp_sibling(path)) else path
    fix = {errno.ENOSPC: "free space on that device or write somewhere else",
           errno.EDQUOT: "free space within your quota or write somewhere else",
           errno.EROFS: "write to a writable folder instead",
           errno.EACCES: "write to a folder you may write to (or fix its permissions)",
           errno.EPERM: "write to a folder you may write to (or fix its permissions)",
           errno.ENOENT: "the output folder vanished while writing; create it or write somewhere else",
           errno.ENOTDIR: "a part of the output path is a file, not a folder; choose another output path",
           errno.EEXIST: "a part of the output path is a file, not a folder; choose another output path",
           errno.EISDIR: "the output path is a folder; choose a file name"}.get(e.errno, "write somewhere else")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # name the file that stands where a folder should be
        where = next((p for p in (Path(where), *Path(where).parents) if p.exists() and not p.is_dir()), where)
    writing = f" (writing {path})" if Path(where) != path else ""
    return InputError(f"{cause}: {where}{writing}; fix: {fix}")


def is_write_error(e: OSError, path: Path, tmp: Path) -> bool:
    """Whether `e` is the system refusing this write (and not, say, a missing input file read while writing)."""
    if e.errno not in WRITE_ERRNOS:
        return False
    if not e.filename:
        return True  # write()/flush() on the open temp file: ENOSPC, EFBIG, EDQUOT
    target = Path(e.filename)
    return target in (path, tmp) or target in path.parents


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it is renamed to `path`, on any
    exception it is removed and `path` is left as it was. A write the system refuses is an InputError."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if is_write_error(e, path, tmp):
            raise write_error(e, path) from None
        raise
    finally:
        with contextlib.suppress(OSError):  # nothing to remove, or a folder we cannot touch (already reported)
            tmp.unlink(missing_ok=True)


def make_dirs(path: str | Path, *, exist_ok: bool = True) -> Path:
    """mkdir -p; a folder the system will not create is an InputError (FileExistsError stays one when not exist_ok:
    the caller is looking for a free name)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok and path.parent.is_dir():
            raise  # `path` itself exists
        raise write_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)), path) from None
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(e, path) from None
        raise
    return path


def atomic_symlink(link: str | Path, target: str) -> bool:
    """Point the symbolic link `link` at `target` (replacing the link atomically). A convenience: where links cannot
    be made (some filesystems) or `link` is a real folder, nothing happens and False is returned."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        return False
    tmp = temp_sibling(link)
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    return True


class _WriteRecorder:
    """A binary file whose write()/flush() remember the OSError they raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


@contextlib.contextmanager
def open_for_writing(path: Path) -> Iterator[_WriteRecorder]:
    """open(path, "wb") for writers that turn a failed write into an error of their own (torch.save's zip writer
    raises "enforce fail ... unexpected pos" for a full disk): the system's OSError is raised instead, so
    atomic_path can name the cause."""
    with open(path, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            yield recorder
        except Exception:
            if recorder.error is not None:
                raise recorder.error from None
            raise


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


def path_tag(path: str | Path) -> str:
    """8 hex digits naming one resolved file path: what tells apart outputs of inputs that share a stem."""
    return hashlib.sha256(str(Path(path).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def merge_rows(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """Rows of several runs in one report, keyed by the exact file each measured: its "real_path" (or "path") and
    "sha256". A new row
    replaces the old row of the same file and any old row of the same path (that path now holds the new bytes); rows
    of other files (another checkpoint of the same model, its artifacts) stay. Never keyed by model name or format."""
    def where(row: dict):  # the file itself, not a link to it (<model>-latest/ points at another run later)
        return row.get("real_path") or row.get("path")

    keys = {(where(r), r.get("sha256")) for r in new}
    paths = {where(r) for r in new}
    return [r for r in old if (where(r), r.get("sha256")) not in keys and where(r) not in paths] + list(new)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], fmt: Callable[[object], str] = str) -> str:
    """A GitHub markdown table; each cell is rendered with `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
