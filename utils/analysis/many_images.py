"""The per-image loop of the analysis scripts (fcn_resnet18.py, receptive_field_backprop.py) over several images.

One bad image must not stop the others: with several images, an image whose analysis raises InputError is one
`error:` line on stderr and the loop goes on; the exit code is 2 when any failed. A single image keeps its plain
one-line error (the InputError propagates).

Each image's results go to a folder of its own (`output_names`): `<stem>`, or `<stem>-<hash>` when that name belongs to
another image, so `a/x.png` and `b/x.png` never overwrite each other's results."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from utils.errors import InputError
from utils.io import atomic_write_text, display_line, path_tag
from utils.tensorboard import add_markdown, open_writer

OUTPUT_RULE = ("each image's results go to <out_dir>/<image stem>/, or <out_dir>/<image stem>-<8 hex digits of the "
               "sha256 of its resolved path>/ when another input of the run has the same stem or <image stem>/ already "
               "holds the results of another file (its result.json's \"source\")")


def _owner(folder: Path) -> str | None:
    """The resolved input path whose results `folder` holds (its result.json's "source"); "" when it holds results
    that do not say, None when it holds none."""
    try:
        data = json.loads((folder / "result.json").read_text(encoding="utf-8", errors="surrogateescape"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""
    return data.get("source", "") if isinstance(data, dict) else ""


def output_names(images: Sequence[Path], out_dir: Path) -> dict[Path, str]:
    """The results folder name of each image, by OUTPUT_RULE: unique per resolved input path, within one run and
    across runs writing to the same `out_dir` (a rerun on the same file finds its own folder again)."""
    by_stem: dict[str, set[Path]] = defaultdict(set)
    for image in images:
        by_stem[image.stem].add(image.resolve())
    names = {}
    for image in images:
        source = image.resolve()
        owner = _owner(out_dir / image.stem)
        simple = len(by_stem[image.stem]) == 1 and owner in (None, str(source))
        names[image] = image.stem if simple else f"{image.stem}-{path_tag(image)}"
    return names

Result = TypeVar("Result")


def analyse_each(images: Sequence[Path], analyse: Callable[[Path], Result],
                 report: Callable[[Path, Result], None]) -> int:
    """analyse(image) then report(image, result) for each image; returns the exit code (0, or 2 if any failed)."""
    failed = 0
    for image in images:
        try:
            result = analyse(image)
        except InputError as e:  # this image only: report it, go on with the others
            if len(images) == 1:
                raise
            print(f"error: {display_line(str(e))}", file=sys.stderr)
            failed += 1
            continue
        report(image, result)
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be analysed (see the error lines above)", file=sys.stderr)
        return 2
    return 0


def publish_result(res: dict, image: Path, out_dir: Path, board: Path | None, tag: str,
                   save: Callable[[Path, object], dict[str, str]]) -> None:
    """Write one image's files into out_dir: save(out_dir, writer) draws the figures (and mirrors them to TensorBoard
    when `board` is given) and returns their paths; then result.json, also shown in TensorBoard as `<tag>/result`.
    res gets "source" (whose results the folder holds, read back by output_names) and "files"."""
    res["source"] = str(image.resolve())
    writer = open_writer(board, purge_step=0) if board else None  # purge: a rerun replaces the image's earlier run
    try:
        res["files"] = save(out_dir, writer)
        res["files"]["result"] = str(out_dir / "result.json")
        atomic_write_text(out_dir / "result.json", json.dumps(res, indent=2) + "\n")
        if writer is not None:
            add_markdown(writer, f"{tag}/result", f"```json\n{json.dumps(res, indent=2)}\n```")
    finally:
        if writer is not None:
            writer.close()
