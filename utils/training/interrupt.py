"""Ctrl-C and SIGTERM (docker stop, kill, job schedulers) during training: stop at the next optimizer step, so the
saved state is one an uninterrupted run passed through, and --resume continues from that very step.

While training steps run, the first signal only asks for a stop (`requested`); the training loop checks it after each
optimizer step and ends the epoch there, leaving weights, optimizer and EMA whole (a signal in the middle of
optimizer.step() would leave them half-updated). Anywhere else (start-up, validation, saving) nothing is half-updated
and the signal raises KeyboardInterrupt at once; so does a second signal (a stuck step still stops).
SIGTERM gets its own handler, not a copy of SIGINT's: a shell starts background jobs with SIGINT ignored, and copying
that would ignore SIGTERM too.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager


class GracefulStop:
    """The signal handlers of one training run; `stepping()` marks where a stop must wait for the step to end."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._stepping = False
        self._previous: dict[int, object] = {}

    def install(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN or sig == signal.SIGTERM:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._stepping and not self.requested:
            self.requested = True
            if self.announce:
                name = signal.Signals(signum).name
                print(f"\n{name}: stopping after this optimizer step to save the run (send it again to stop at once)",
                      file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    @contextmanager
    def stepping(self):
        """Inside: a first signal waits for the current optimizer step (see the module docstring)."""
        self._stepping = True
        try:
            yield self
        finally:
            self._stepping = False
