"""Errors raised inside a user's code (reward functions, rollout functions, dataset transforms).

Standard library only: reward worker processes import it. Such an error ends a run with one line that names
the function, where it happened and the exception (`reward function my_mod.fn raised ValueError('boom') at step
3; ...`); the sample it failed on and the full traceback are kept in `detail` and printed only with
`reinforge train --debug` or `REINFORGE_DEBUG=1` (`debug_enabled`).
"""

from __future__ import annotations

import os
import traceback

REPR_CHARS = 200


def debug_enabled() -> bool:
    """True when `REINFORGE_DEBUG` is set to anything but empty, `0`, `false` or `no` (any case)."""
    return os.environ.get("REINFORGE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def describe_exception(exc: BaseException) -> str:
    """`ValueError('boom')`: the exception's repr on one line, cut to REPR_CHARS characters."""
    text = " ".join(repr(exc).split())
    return text if len(text) <= REPR_CHARS else text[:REPR_CHARS] + "...)"


class UserCodeError(RuntimeError):
    """A user's function raised or returned something unusable.

    Attributes:
        role: what the function is, e.g. "reward function", "rollout function", "dataset transform".
        name: its configured name (`module.fn`).
        exception: the exception as `describe_exception` writes it (None when the function did not raise).
        detail: the sample it failed on and the full traceback (shown with --debug), or None.
    `what` is the one-line summary ("reward function m.fn raised ValueError('boom')"); str() is the message
    given (default: `what`).
    """

    def __init__(self, role: str, name: str, exception: BaseException | str | None = None, *,
                 message: str | None = None, detail: str | None = None):
        self.role, self.name = role, name
        self.exception = describe_exception(exception) if isinstance(exception, BaseException) else exception
        if detail is None and isinstance(exception, BaseException) and exception.__traceback__ is not None:
            detail = "".join(traceback.format_exception(exception))
        self.detail = detail
        super().__init__(message if message is not None else self.what)

    @property
    def what(self) -> str:
        """One line: `<role> <name> raised <exception>`, or the first line of the message."""
        if self.exception is not None:
            return f"{self.role} {self.name} raised {self.exception}"
        return str(self).splitlines()[0] if str(self) else f"{self.role} {self.name} failed"
