"""Public exceptions and warnings. Each subclasses a stdlib type so existing ``except``
clauses and warning filters work.

The bottom of the import graph: every layer (front ends, planner, engines) may
import this module, and it imports nothing of coremap.
"""
from __future__ import annotations


class CoremapWarning(UserWarning):
    """A call ran, but not the way you probably wanted (the message says how to fix it)."""


class WorkerCrashedError(RuntimeError):
    """A worker process died while computing a chunk (SIGKILL, segfault, OOM, exit).

    Attributes
    ----------
    pid : int
        The dead worker's process id.
    exitcode : int or None
        Its exit code; negative for a signal (``-9`` is SIGKILL).
    chunk : tuple of int or None
        The flat ``[lo, hi)`` range it was computing, if any.
    """

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None,
                 chunk: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.chunk = chunk

    def __reduce__(self):
        return type(self), (self.args[0], self.pid, self.exitcode, self.chunk)


class RemoteError(RuntimeError):
    """An exception raised in a worker that could not be sent back as itself.

    Raised for exceptions that cannot be pickled or unpickled, and for
    ``SystemExit`` / ``KeyboardInterrupt`` raised inside the function (which must
    not stop the calling process).

    Attributes
    ----------
    type_name : str
        The original exception's qualified type name.
    message : str
        Its ``str()``.
    traceback : str
        The worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return type(self), (self.type_name, self.message, self.traceback)
