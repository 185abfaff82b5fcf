"""Every error a user can cause, as one family: the CLI catches ``MRPOError`` and prints its message in one line.

Each class says what went wrong, not which handler catches it; where a built-in base fits the nature of the
error (a bad value: ``ValueError``; a run that cannot go on: ``RuntimeError``), it is kept for callers that catch
those.

    MRPOError
    ├── ConfigError           a configuration key has a bad value (names the dotted key)
    ├── DataError             preference data that cannot be used (names the source, row and field)
    ├── CacheError            the reference cache cannot serve what was asked
    ├── ModelSourceError      a model or tokenizer that does not load from where the config points
    ├── CollatorError         a batch lacks what the trainer needs
    ├── TrainingError         training cannot go on (names the step and the pair); exit code 1
    │   └── TrainingInterrupted   Ctrl-C during training (says how to resume); exit code 130
    │       └── TrainingTerminated    SIGTERM during training (a scheduler, `docker stop`); exit code 143
    ├── LMEvalError           an lm-eval request that cannot run as asked
    │   └── LMEvalNotInstalledError
    ├── ReportError           a run directory that cannot be reported on
    └── DemoModelError        a demo model that cannot be fetched or converted
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterator


class MRPOError(Exception):
    """An error a user can cause and fix; its message says what was wrong, where, and what to do."""

    exit_code = 2
    """The CLI's exit status for it."""


class ConfigError(MRPOError, ValueError):
    """A configuration mistake; the message names the dotted key, the bad value and what is allowed."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key
        """The dotted key the mistake is about (``loss.beta``), when there is one."""


class DataError(MRPOError, ValueError):
    """Preference data that cannot be used, with where it is (source, row, field) and what to do about it."""

    def __init__(
        self,
        message: str,
        *,
        source: str = "",
        row: str | None = None,
        field: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.source = source
        self.row = row
        """Human-readable row position, e.g. "line 7" (JSONL) or "row index 3 (0-based)"; None if whole-file."""
        self.field = field
        self.reason = reason
        """The short reason this row would be counted under with on_error="drop"."""


class CacheError(MRPOError, ValueError):
    """A reference cache cannot serve what was asked (missing pairs, another data set, a broken store)."""


class ModelSourceError(MRPOError, ValueError):
    """A model or tokenizer that cannot be loaded from where the config points."""


class CollatorError(MRPOError, ValueError):
    """A batch lacks what the trainer needs (most often: the cached reference columns), or is empty."""


class TrainingError(MRPOError, RuntimeError):
    """Training (or evaluation inside the Trainer) cannot go on; the message names the step, the pair and a remedy."""

    exit_code = 1


class TrainingInterrupted(TrainingError):
    """Training was interrupted (Ctrl-C); the message says at which step and how to resume."""

    exit_code = 130

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


class TrainingTerminated(TrainingInterrupted):
    """Training was stopped by SIGTERM (what schedulers and ``docker stop`` send), handled as Ctrl-C is; the exit
    code is the shell's for a process ended by that signal (128 + 15)."""

    exit_code = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where the program is, as Ctrl-C raises KeyboardInterrupt, so the same clean-up and
    message follow (see ``sigterm_raises_terminated``, which the CLI runs every command in)."""

    exit_code = 143


@contextlib.contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """While inside, SIGTERM (schedulers, ``docker stop``) raises ``Terminated`` instead of ending the process
    silently with -15. Only the main thread may set a handler: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LMEvalError(MRPOError):
    """An lm-eval request mrpo cannot run as asked (unknown task, missing package); the message says what to do."""


class LMEvalNotInstalledError(LMEvalError, ImportError):
    """lm-evaluation-harness is not installed."""


class ReportError(MRPOError, ValueError):
    """A run directory cannot be reported on; the message names the directory and what is missing or wrong."""


class DemoModelError(MRPOError, RuntimeError):
    """A demo model could not be fetched or converted; the message says what failed and what to use instead."""


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def write_failure(error: BaseException, what: str, *, no_space: str, not_writable: str) -> str | None:
    """One line for a write that failed for want of space or of permission: "cannot write WHAT: no space left on
    the device (FILE); NO_SPACE" (or "read-only or not writable ...; NOT_WRITABLE"); None for any other failure,
    which the caller lets through."""
    number = getattr(error, "errno", None)
    if number in _NO_SPACE or "No space left on device" in str(error):
        why, remedy = "no space left on the device", no_space
    elif number in _NOT_WRITABLE:
        why, remedy = "the file system is read-only or the directory is not writable", not_writable
    else:
        return None
    filename = getattr(error, "filename", None)
    return f"cannot write {what}: {why}{f' ({filename})' if filename else ''}; {remedy}"
