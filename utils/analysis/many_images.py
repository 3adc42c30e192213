"""The per-image loop of the analysis scripts (fcn_resnet18.py, receptive_field_backprop.py) over several images.

One bad image must not stop the others: with several images, an image whose analysis raises InputError is one
`error:` line on stderr and the loop goes on; the exit code is 2 when any failed. A single image keeps its plain
one-line error (the InputError propagates)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from utils.errors import InputError

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
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        report(image, result)
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be analysed (see the error lines above)", file=sys.stderr)
        return 2
    return 0
