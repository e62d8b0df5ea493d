"""Ctrl-C and SIGTERM during `gpart train`: stop at a step boundary, so that `--resume` continues bit for bit.

A signal in the middle of a step (after dropout drew from the RNG, perhaps after the optimizer stepped) leaves a
state that is no step's: checkpointing it would resume on other numbers. So while steps run (`deferring`), the first
SIGINT or SIGTERM only asks the loop to stop: the step finishes, with its dev evaluation and checkpoint, and the run
stops at that boundary, saved. A second Ctrl-C stops at once; the run then resumes from its last checkpoint. A
repeated SIGTERM does not: schedulers and torchrun send it to every process, and kill those that outlast their grace.
Outside the steps (loading, the evaluation before training, the final save and evaluation) a signal stops at once:
the last checkpoint (or none) is where the run resumes, and nothing half done is saved.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal; `step` is the step of the checkpoint it resumes from (None: none yet)."""

    def __init__(self, signum: int, step: int | None, total: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}/{total}")
        self.signum, self.step, self.total = signum, step, total

    @property
    def exit_code(self) -> int:
        """The shell's code for a death by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class StopSignals:
    """SIGINT and SIGTERM, handled while the context is entered (in the main thread; elsewhere Python's defaults stay).

    Inside `deferring()` the first signal sets `requested` and calls `notice`; outside it, or on a second SIGINT, the
    handler raises KeyboardInterrupt where the program is.
    """

    def __init__(self, notice: Callable[[], None] | None = None) -> None:
        self.notice = notice
        self.signum: int | None = None  # the first signal received
        self.requested = False          # stop at the next step boundary
        self._deferring = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @contextmanager
    def deferring(self):
        """Signals wait for the next step boundary while this block runs."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        if self._deferring and not (self.requested and signum == signal.SIGINT):
            if not self.requested:
                self.requested = True
                if self.notice is not None:
                    self.notice()
            return
        raise KeyboardInterrupt
