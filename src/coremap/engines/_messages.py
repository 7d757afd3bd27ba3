"""The messages between the parent and its worker processes, by name.

    parent ──Setup──────────────> worker   once, when it starts
    parent ──CallSpec / ProbeSpec──> worker   the process engine: one call, the dtype probe
    parent ──TaskSpec / InitSpec──> worker   ``coremap.Pool``: one batch, the initializer
    parent ──STOP───────────────> worker   exit
    parent <──Reply(kind, task_id, value, error)── worker, one per request

Every request carries a ``task_id`` and the worker answers it with a ``Reply``
carrying the same id and its kind (``DONE``, ``PROBED``, ``RESULT`` or
``ERROR``; an ``InitSpec`` is answered only when it fails). The parent checks
both: a reply for another task is a protocol error (:func:`check_reply`),
never taken for a result. Messages are NamedTuples, pickled by reference:
parent and worker run the same coremap.
"""
from __future__ import annotations

from typing import Any, NamedTuple

# Reply kinds.
DONE = "done"  # a CallSpec's share of the call is computed
PROBED = "probed"  # a ProbeSpec's result dtype is the value
RESULT = "result"  # a TaskSpec's results are the value (see coremap.pool)
ERROR = "error"  # the request raised: see ``Reply.error``

STOP = None  # asks a worker to exit

# Exceptions after which a worker stops (the parent replaces it).
EXITS = ("builtins.SystemExit", "builtins.KeyboardInterrupt")


class Setup(NamedTuple):
    """Sent once to a new worker: the parent's ``sys.path``."""

    sys_path: list


class JobParams(NamedTuple):
    """The settings of a call's ``_runner.Job`` (shared by parent and workers)."""

    size: int
    workers: int
    schedule: str
    chunk: int
    max_chunk: int
    target_ns: int
    first_chunk: int
    floor_ns: int

    def job(self, **kwargs):
        """The runner's ``Job`` for these settings (``kwargs``: state, init, owner)."""
        from coremap._kernels import _runner

        return _runner.Job(self.size, self.workers, self.schedule, self.chunk,
                           self.max_chunk, target_ns=self.target_ns,
                           first_chunk=self.first_chunk, floor_ns=self.floor_ns, **kwargs)


class ViewDesc(NamedTuple):
    """Where an operand lives: a segment name and the array's place in it."""

    name: str
    offset: int
    shape: tuple
    strides: tuple
    dtype: Any


class CtrlDesc(NamedTuple):
    """The call's control block: its segment, the job state and this worker's slot."""

    name: str
    state_offset: int
    slot_offset: int


class CallSpec(NamedTuple):
    """One process-engine call, as one worker sees it."""

    task_id: int
    kind: str  # "numba", "ufunc", "vectorized" or "python"
    func: bytes  # cloudpickle of the function
    func_key: str  # a digest of ``func``: workers cache the unpickled function by it
    func_name: str
    shape: tuple
    order: str
    inputs: list  # _layout.Input, arrays replaced by 0-d placeholders
    in_dtypes: tuple
    out_dtype: Any
    views: list  # ViewDesc per operand (None for a scalar input), the output last
    job: JobParams
    ctrl: CtrlDesc
    keep: frozenset  # pooled segment names the worker keeps mapped
    skip: int = 0  # elements [0, skip) were computed by the probe: the parent wrote them


class ProbeSpec(NamedTuple):
    """Run the function on the first elements: their results, which the parent keeps
    (so those elements run once, ``CallSpec.skip``), tell the result dtype."""

    task_id: int
    func: bytes
    kind: str
    func_name: str
    scalars: list
    args: list


class TaskSpec(NamedTuple):
    """One ``Pool`` batch (see ``coremap.pool``)."""

    task_id: Any
    func: bytes
    func_key: str
    args: bytes
    shared: Any
    mode: str  # "map", "star" or "apply"
    share_bytes: int
    buffers: Any = None  # the large buffers, when shared memory is short (pipe fallback)


class InitSpec(NamedTuple):
    """A ``Pool`` initializer: the pickled ``(initializer, initargs)``; answered only
    when it raises (an ERROR reply with this ``task_id``), and the worker then exits."""

    task_id: Any
    func: bytes


class ErrorInfo(NamedTuple):
    """An exception raised in a worker, as it travels back."""

    lo: int  # the flat element range it was raised on; -1 when none
    hi: int
    payload: bytes | None  # the pickled exception, None if it cannot be rebuilt
    type_name: str  # module.qualname
    message: str
    traceback: str
    raised_by_noted: bool  # the worker noted where it was raised (``_errors.note_raised_by``)

    @property
    def exits(self) -> bool:
        """True if the worker stops after this error (SystemExit, KeyboardInterrupt)."""
        return self.type_name in EXITS


class Reply(NamedTuple):
    """A worker's answer to one request."""

    kind: str
    task_id: Any
    value: Any = None
    error: ErrorInfo | None = None


class ProtocolError(RuntimeError):
    """A worker sent a reply the parent did not ask for (internal error)."""


def check_reply(reply, task_id, kinds) -> Reply:
    """``reply`` if it answers ``task_id`` with one of ``kinds`` (or ERROR); else raise."""
    if not isinstance(reply, Reply):
        raise ProtocolError(f"a worker sent {type(reply).__name__} where a reply was expected")
    if reply.task_id != task_id:
        raise ProtocolError(
            f"a worker answered task {reply.task_id!r} while task {task_id!r} was running "
            "(internal error: replies out of step)")
    if reply.kind != ERROR and reply.kind not in kinds:
        raise ProtocolError(
            f"a worker answered task {task_id!r} with a {reply.kind!r} reply, "
            f"expected {' or '.join(kinds)}")
    return reply
