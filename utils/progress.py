"""Progress bars: one policy for every bar of the toolkit (tqdm). A bar is drawn on stderr only when stderr is a
terminal, so logs, pipes and CI output keep their one-line errors, and never after `set_quiet(True)`: the scripts'
--quiet sets that process-wide switch, so the bars deep inside the data code (folder checks, cache builds, image
loading) obey it as well as the training and evaluation loops. Torch-free."""

from __future__ import annotations

import sys

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """tqdm on stderr with the policy above; `enabled` is the caller's own condition (rank 0, enough items, ...)."""
    return tqdm(iterable, disable=_quiet or not enabled or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True,
                **kwargs)
