"""The one exception type for bad user input. Torch-free, so every module (predict.py's ONNX path included) can raise it."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: scripts print the message on one line (utils.cli.run) and exit with code 2."""
