"""The process engine's worker: the loop that runs in each child process.

    parent ──CallSpec──> worker: attach segments (cached), rebuild the views,
                         claim chunks from the shared job state, compute in place
    parent <──Reply(DONE, id) or Reply(ERROR, id, error=ErrorInfo(lo, hi, ...))── worker

(The messages are in ``_messages.py``; ``ProbeSpec``, and ``TaskSpec``/``InitSpec``
for ``coremap.Pool``, go through the same loop.)

A worker ignores SIGINT (the parent owns Ctrl-C and cancels through the shared
job state), limits BLAS/OpenMP pools to one thread, and exits when its parent
goes away (a watchdog thread), so killing the parent leaves no worker behind.
Nested ``parallel_map`` calls inside a worker run serially (``COREMAP_WORKERS=1``): no fork bomb.
"""
from __future__ import annotations

import itertools
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from coremap._errors import raised_by_noted
from coremap._functions import FunctionCache
from coremap.engines._messages import (
    DONE,
    ERROR,
    EXITS,
    PROBED,
    RESULT,
    STOP,
    CallSpec,
    ErrorInfo,
    InitSpec,
    ProbeSpec,
    Reply,
    TaskSpec,
)

if TYPE_CHECKING:
    import numpy as np

    from coremap import _shm

IN_WORKER_ENV = "COREMAP_IN_WORKER"
__all__ = ["EXITS", "IN_WORKER_ENV", "bootstrap", "main"]


def _die_with_parent(parent_pid: int) -> None:
    # Not PR_SET_PDEATHSIG: it fires when the parent *thread* that started the
    # worker exits, and any thread may call parallel_map. A dead parent
    # re-parents the worker, which the watchdog sees within 0.25 s; an idle
    # worker also sees its socket close.
    def watchdog() -> None:
        while True:
            time.sleep(0.25)
            if os.getppid() != parent_pid:
                _orphaned(parent_pid)

    threading.Thread(target=watchdog, name="coremap-watchdog", daemon=True).start()


def _orphaned(parent_pid: int) -> None:
    """The parent died (SIGKILL, mid-call perhaps): remove the segment names it left,
    and this worker's own, then exit.

    Its segments are unlocked now (the kernel closed its descriptors); one that a
    forked child of the parent still holds is left alone (``_shm.clean``).
    """
    try:
        from coremap import _shm

        # re-parented: the parent has exited, even while it is an unreaped zombie
        _shm.clean(creators={parent_pid, os.getpid()}, exiting=True, dead={parent_pid})
    finally:
        os._exit(1)


def _after_eof(parent_pid: int) -> None:
    """The socket closed without a STOP: if the parent is dying, clean up after it.

    A dying process closes its descriptors before its children are re-parented,
    so wait a moment for the re-parenting (cf. the watchdog).
    """
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        if os.getppid() != parent_pid:
            _orphaned(parent_pid)
        time.sleep(0.02)


class _Call:
    """What ``_tasks.chunk_function`` needs to know about a call (a plan's subset)."""

    def __init__(self, spec: CallSpec, func: Callable[..., Any]) -> None:
        self.kind = spec.kind
        self.func = func
        self.func_name = spec.func_name
        self.shape = spec.shape
        self.order = spec.order
        self.inputs = spec.inputs  # list of _layout.Input
        self.in_dtypes = spec.in_dtypes


def _views(spec: CallSpec, segments: dict[str, _shm.Segment]) -> list[np.ndarray]:
    import numpy as np

    from coremap import _layout, _shm

    views = []
    for desc, inp in zip(spec.views, [*spec.inputs, None]):
        if desc is None:  # a scalar input
            views.append(_layout.iteration_view(inp.array, spec.shape, spec.order))
            continue
        seg = segments.get(desc.name)
        if seg is None:
            seg = segments[desc.name] = _shm.Segment.attach(desc.name)
        views.append(np.ndarray(desc.shape, desc.dtype, buffer=seg.mmap, offset=desc.offset,
                                strides=desc.strides))
    return views


def _report(exc: BaseException, task_id: Any, lo: int, hi: int) -> Reply:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)  # an exception that cannot be rebuilt is sent as text
    except Exception:
        payload = None
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return Reply(ERROR, task_id, error=ErrorInfo(lo, hi, payload, name, str(exc), tb,
                                                 raised_by_noted(exc)))


def run_task(spec: TaskSpec, funcs: FunctionCache) -> Reply:
    """A Pool task: call the function on a batch of (args, kwds); results go back by
    pickle, with large arrays moved to shared memory (``_transport.py``)."""
    from coremap.engines._transport import encoding_error, export_results, loads_shared

    func = funcs.load(spec.func, spec.func_key)
    items = loads_shared(spec.args, spec.shared, buffers=spec.buffers)
    mode = spec.mode
    calls: Iterator[Any]
    if mode == "map":
        calls = map(func, items)
    elif mode == "star":
        calls = itertools.starmap(func, items)
    else:
        calls = (func(*args, **kwds) for args, kwds in items)
    results: list[Any] = []
    append = results.append
    try:
        for value in calls:
            append(value)
    except BaseException as exc:  # the item that failed is the next one
        k = len(results)
        return _report(exc, spec.task_id, k, k + 1)
    try:
        payload = export_results(results, spec.share_bytes)
    except BaseException as exc:  # a result that cannot be pickled
        return _report(encoding_error(exc, results), spec.task_id, -1, -1)
    return Reply(RESULT, spec.task_id, payload)


def _initialize(conn: Connection, spec: InitSpec) -> bool:
    """Run a Pool's initializer; if it raises, report it (answering the InitSpec's id)."""
    try:
        initializer, initargs = pickle.loads(spec.func)
        initializer(*initargs)
    except BaseException as exc:  # noqa: BLE001 - the parent fails every task with it
        conn.send_bytes(pickle.dumps(_report(exc, spec.task_id, -1, -1)))
        return False
    return True


def probe(spec: ProbeSpec, funcs: FunctionCache) -> Reply:
    """Run the function on the first elements, here rather than in the parent; the reply
    carries the results (a few hundred at most), which the parent keeps, so these
    elements are not computed again. The function comes from ``funcs``, so the call's
    chunks later run on the same object."""
    from coremap import _tasks

    func = funcs.load(spec.func)
    try:
        values = _tasks.probe(func, spec.kind, spec.func_name, spec.scalars, spec.args)
    except BaseException as exc:
        return _report(exc, spec.task_id, 0, len(spec.args[0]) if spec.args else 1)
    return Reply(PROBED, spec.task_id, values)


def run_call(spec: CallSpec, funcs: FunctionCache, segments: dict) -> Reply:
    """Compute this worker's share of one call; return the reply message."""
    from coremap import _layout, _shm, _tasks

    call_id = spec.task_id
    call = _Call(spec, funcs.load(spec.func, spec.func_key))
    ctrl_name = spec.ctrl.name
    ctrl = segments.get(ctrl_name) or segments.setdefault(ctrl_name, _shm.Segment.attach(ctrl_name))
    views = _views(spec, segments)
    used = {ctrl_name, *(d.name for d in spec.views if d is not None)}
    for name in list(segments):
        if name not in spec.keep and name not in used:
            segments.pop(name).close()  # unmapped once no array of ours uses it
    space = _layout.build_space(views)
    if space is None:  # the parent staged views that form one (copied if needed)
        raise RuntimeError("the call's operands form no iteration space (internal error)")
    job = spec.job.job(state=ctrl.address + spec.ctrl.state_offset, init=False,
                       state_owner=ctrl)
    job.set_slot(ctrl.address + spec.ctrl.slot_offset)
    errors = _tasks.Errors()
    if call.kind in ("numba", "builtin"):
        address = _tasks.native_kernel(call, space)
        job.set_kernel(address, space.base_ptrs, space.meta(), views)
        _tasks.native_task()(job, False)
        failed = job.failed_chunk
        if failed is not None:
            try:
                _tasks.raise_native_failure(call, space, *failed)
            except BaseException as exc:
                return _report(exc, call_id, *failed)
        return Reply(DONE, call_id)
    chunk = _tasks.chunk_function(call, space, errors)
    if spec.skip:  # the parent already holds the probe's results for [0, skip)
        chunk = _skipping(chunk, spec.skip)
    _tasks.python_task(chunk, errors)(job, False)
    if errors.first is not None:
        first, lo, hi = errors.first
        return _report(first, call_id, lo, hi)
    return Reply(DONE, call_id)


def _skipping(chunk: Callable[[int, int], None], skip: int) -> Callable[[int, int], None]:
    """``chunk`` over ``[lo, hi)`` minus the first ``skip`` elements of the call."""
    def run(lo: int, hi: int) -> None:
        lo = max(lo, skip)
        if lo < hi:
            chunk(lo, hi)

    return run


def bootstrap(fd: int, parent_pid: int) -> None:
    """Entry point of a worker process: ``python -c`` calls this with its socket."""
    conn = Connection(fd)
    setup = pickle.loads(conn.recv_bytes())
    sys.path[:] = setup.sys_path  # so functions pickled by reference import here too
    main(conn, parent_pid)


def main(conn: Connection, parent_pid: int) -> None:
    """The worker's loop (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["COREMAP_WORKERS"] = "1"  # nested calls run serially
    os.environ[IN_WORKER_ENV] = "1"
    _die_with_parent(parent_pid)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass
    funcs = FunctionCache()  # the same object per function: Numba's caches key on it
    segments: dict = {}
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            _after_eof(parent_pid)
            return
        msg = pickle.loads(data)
        if msg is STOP:
            return
        try:
            if isinstance(msg, CallSpec):
                reply = run_call(msg, funcs, segments)
            elif isinstance(msg, ProbeSpec):
                reply = probe(msg, funcs)
            elif isinstance(msg, TaskSpec):
                reply = run_task(msg, funcs)
            elif isinstance(msg, InitSpec):
                if _initialize(conn, msg):
                    continue
                return  # its initializer raised: the parent breaks the pool
            else:
                raise TypeError(f"unknown request {type(msg).__name__}")
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            reply = _report(exc, getattr(msg, "task_id", None), -1, -1)
        conn.send_bytes(pickle.dumps(reply))
        if reply.kind == ERROR and reply.error is not None and reply.error.exits:
            return  # asked to stop: the parent replaces this worker
