"""Ctrl-C / SIGTERM during training: finish the step, write a checkpoint, say how to resume, exit non-zero.

`StopSignal` is a context manager that replaces the SIGINT and SIGTERM handlers while the training loop
runs. The first signal only records the request (the loop checks it after every optimiser step, agreed
across processes, then checkpoints and raises `TrainingInterrupted`); a second signal raises
`StopNow` (a `KeyboardInterrupt`) at once, wherever the program is — including in the middle of writing that checkpoint,
which is safe because checkpoints are written atomically.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from reinforge.training.setup import RunError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell convention


class TrainingInterrupted(RunError):
    """The run stopped on a signal after writing a checkpoint. `exit_code`: 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), 128 + signum)


class StopNow(KeyboardInterrupt):
    """Raised by the second signal: stop at once, without a checkpoint. `exit_code`: 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignal:
    """Records the first SIGINT/SIGTERM; the second one raises `StopNow` (a KeyboardInterrupt).

    Attributes:
        signum: the first signal received, or None.
    Only the main thread can install handlers; elsewhere the context manager does nothing.
    """

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum
        if self.announce:
            print(f"\nreinforge: {signal.Signals(signum).name} received — finishing the current step, then writing "
                  f"a checkpoint (send it again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
