"""Public exceptions and warnings. Each subclasses a stdlib type so existing ``except``
clauses and warning filters work.

The bottom of the import graph: every layer (front ends, planner, engines) may
import this module, and it imports nothing of coremap. It also writes the two texts
several layers add to errors: where the function raised (:func:`note_raised_by`)
and how a worker process ended (:func:`exit_text`).
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


# The mark that ``note_raised_by`` leaves on an exception: an attribute, so it travels
# with the exception's ``__dict__`` when a worker pickles it back.
_RAISED_BY = "_coremap_raised_by"


def note_raised_by(exc: BaseException, func_name: str, where: str) -> None:
    """Note on ``exc`` that ``func_name`` raised it, and ``where`` ("at element index
    (3,)"), and mark ``exc`` so: a layer it passes through next (the parent of the
    worker it came from) reads :func:`raised_by_noted` instead of the notes' text."""
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(f"raised by {func_name} {where}")
    try:
        setattr(exc, _RAISED_BY, func_name)
    except Exception:  # noqa: S110 - a type that refuses attributes: noted, not marked
        pass


def raised_by_noted(exc: BaseException) -> bool:
    """True if :func:`note_raised_by` located ``exc`` already (in any layer)."""
    return getattr(exc, _RAISED_BY, None) is not None


def exit_text(exitcode: int | None, stopped_for: float | None = None) -> str:
    """How a worker process ended, as :class:`WorkerCrashedError` messages say it:
    ``died (signal SIGKILL)``, ``died (exit code 3)``, or, after ``stopped_for``
    seconds stopped (SIGSTOP), that it was killed."""
    if stopped_for is not None:
        return (f"was stopped (SIGSTOP or similar) for {stopped_for} s without progress "
                "and was killed")
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            return f"died (signal {signal.Signals(-exitcode).name})"
        except ValueError:
            return f"died (signal {-exitcode})"
    return f"died (exit code {exitcode})"
