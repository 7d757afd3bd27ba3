"""The process engine: a persistent pool of worker processes over shared memory.

    ProcessEngine.execute(call, hooks)                    (the one interface, _base.py)
      │ a built-in kernel becomes its scalar form; the function is cloudpickled
      │ dtype: known, learnt by an earlier call, or probed in a worker (its results kept)
      │ operands (_layout.prepare_operands, _stage): arrays already in a segment
      │         (a SharedArray, found with _shm.segment_of) are used in place; others
      │         are copied once into pooled segments; the output is a pooled segment
      │         (or a SharedArray out=, written in place)
      │ control block (a segment): the job state (atomic chunk counter, cancel,
      │         progress) and one [lo, hi) slot per worker
      │ send each worker one small CallSpec (_messages.py): the function (cloudpickle,
      │         once per call), segment names, offsets, shapes, strides -- never array bytes
      ├──> worker k: attach (cached), claim chunks from the shared counter, compute in place
      │ wait on replies (each checked: its kind and task id) and on the workers'
      │         sentinels (a dead worker is seen at once)
      └── unlink the call's segment names; copy the output to the caller's array
          (Operands.result)

Workers are fresh interpreters (``subprocess``, see ``_Process``), never
forked: the parent may already run threads, Numba or OpenMP. They live
across calls, keep the pooled segments mapped (docs/benchmarks.rst: W1 10^8 took
1.35 s with fresh segments, 0.10 s with workers kept attached), and are
replaced when they die. Segment *names* are unlinked when the call ends, so
nothing lingers in /dev/shm even if the parent is later killed; the memory is
reused through the mappings, by calls whose workers all mapped the segment
while its name existed (a new worker cannot attach an unlinked name).

Failures: an exception in the function comes back with its type and the
worker's traceback as ``__cause__``; a worker that dies gives
``WorkerCrashedError`` naming the chunk, pid and signal; ``timeout`` kills the
workers still computing and raises ``TimeoutError``. Ctrl-C cancels through the
shared state; workers that do not stop within a second are killed. A worker
stopped (SIGSTOP, state ``T``) for ``STOPPED_GRACE`` is killed and counts as
dead; one that dies before its request is sent is a ``WorkerCrashedError`` too.
A reply for another task is a ``ProtocolError``, never a result.

The engine belongs to the process that created it: a forked child that calls
``parallel_map`` gets its own, and its exit (atexit) leaves the parent's workers
alone. A parent killed outright takes its workers with it, and they unlink its
segment names on the way out (``_worker._orphaned``).
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import DTypeLike

from coremap import _layout, _shm
from coremap._errors import RemoteError, WorkerCrashedError, exit_text, note_raised_by
from coremap._functions import digest
from coremap._kernels import _runner
from coremap._tasks import PROBE, probe_args, store_kept
from coremap.engines._base import (
    NO_HOOKS,
    Engine,
    Hooks,
    job_params,
    no_elements,
)
from coremap.engines._messages import (
    DONE,
    ERROR,
    PROBED,
    STOP,
    CallSpec,
    CtrlDesc,
    ErrorInfo,
    ProbeSpec,
    ProtocolError,
    Reply,
    Setup,
    ViewDesc,
    check_reply,
)

CTRL_STATE = 0
# slots start here, on the next cache line after the job's shared state: 16 bytes
# (lo, hi) per worker
CTRL_SLOTS = -(-_runner.STATE_BYTES // 64) * 64
STOP_GRACE = 1.0  # seconds a cancelled worker gets to finish its chunk
POOL_BYTES = 1 << 30  # pooled segment bytes kept mapped between calls
# A worker stopped (SIGSTOP, state T) this long makes no progress: it is reported
# as crashed and replaced. Long enough for a job-control stop/continue round trip
# (a user's Ctrl-Z then fg), short against the hang it replaces.
STOPPED_GRACE = 3.0

_engine = None
_engine_lock = threading.Lock()


def process_engine() -> ProcessEngine:
    """This process's engine (a forked child gets its own: the parent's is not its)."""
    global _engine
    engine = _engine
    if engine is None or engine.owner != os.getpid():
        with _engine_lock:
            if _engine is None or _engine.owner != os.getpid():
                _engine = ProcessEngine()
                atexit.register(_engine.shutdown)
            engine = _engine
    return engine


class _RemoteTraceback(Exception):
    """The worker's traceback, chained as ``__cause__`` (as concurrent.futures does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def rebuild_error(reply: Reply) -> BaseException:
    """The exception a worker reported: itself if it unpickles, else a RemoteError.

    The worker's traceback is chained as ``__cause__``. ``SystemExit`` and
    ``KeyboardInterrupt`` become RemoteError: a worker's exit must not stop
    the calling process.
    """
    err = _error_of(reply)
    exc = None
    if err.payload is not None and not err.exits:
        try:
            exc = pickle.loads(err.payload)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(err.type_name, err.message, err.traceback)
    exc.__cause__ = _RemoteTraceback(err.traceback)
    return exc


def _error_of(reply: Reply) -> ErrorInfo:
    """An ERROR reply's error (each one carries it)."""
    if reply.error is None:
        raise ProtocolError(f"a worker sent a {reply.kind!r} reply without its error "
                            "(internal error)")
    return reply.error


class _Process:
    """A worker process started with ``subprocess`` (the parts of ``Process`` used here).

    Not ``multiprocessing.Process``: its spawn and forkserver methods re-import
    the user's ``__main__`` script in every worker, which runs the script's
    top-level code again (and fails in any script without an
    ``if __name__ == "__main__":`` guard). Functions reach workers by
    cloudpickle, so workers never need ``__main__``; this starts a fresh
    interpreter instead (never fork: the parent may run threads), hands it the
    parent's ``sys.path``, and talks to it over a socket pair.
    """

    def __init__(self, index: int) -> None:
        import socket
        import subprocess
        import sys

        ours, theirs = socket.socketpair()
        code = ("import sys; from coremap.engines._worker import bootstrap; "
                f"bootstrap({theirs.fileno()}, {os.getpid()})")
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL, close_fds=True,
                # its own session: a terminal's Ctrl-C reaches only the parent, which
                # cancels the call through the shared job state
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.pid = self._popen.pid
        self.name = f"coremap-worker-{index}"
        from multiprocessing.connection import Connection

        self.conn = Connection(ours.detach())
        self.conn.send_bytes(pickle.dumps(Setup(list(sys.path))))
        try:
            self.sentinel = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # pragma: no cover - no pidfd: the socket's EOF
            self.sentinel = self.conn.fileno()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def close(self) -> None:
        if self.conn.closed:
            return
        if self.sentinel != self.conn.fileno():
            os.close(self.sentinel)
        self.conn.close()


def _stopped(pid: int) -> bool:
    """True if ``pid`` is in the stopped state (``T`` in /proc/<pid>/stat: SIGSTOP and
    friends; not ``t``, a debugger's trace stop)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone, or no /proc (macOS): not known to be stopped
        return False
    return stat[stat.rfind(b")") + 2:][:1] == b"T"


class _StopWatch:
    """Which workers have stayed stopped for ``STOPPED_GRACE`` seconds (checked twice a second)."""

    def __init__(self) -> None:
        self.since: dict[int, float] = {}
        self.next_check = 0.0

    def overdue(self, workers) -> list:
        now = time.monotonic()
        if now < self.next_check:
            return []
        self.next_check = now + 0.5
        late = []
        for w in workers:
            if not _stopped(w.process.pid):
                self.since.pop(w.process.pid, None)
            elif now - self.since.setdefault(w.process.pid, now) >= STOPPED_GRACE:
                late.append(w)
        return late


class _Worker:
    __slots__ = ("process", "conn", "index")

    def __init__(self, index: int) -> None:
        self.process = _Process(index)
        self.conn = self.process.conn
        self.index = index

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.process.close()


class _Info(NamedTuple):
    """What error messages need to know of a call that has no CallSpec (the probe)."""

    func_name: str
    shape: tuple
    order: str


class _Slots:
    """A stand-in for the slot table when no job runs (the probe)."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __getitem__(self, key):
        return self.rows[key] if isinstance(key, int) else self.rows[key[0]][key[1]]


class _SegmentPool:
    """Segments kept mapped between calls (names unlinked): best fit, bounded bytes.

    A pooled segment's name is gone, so only workers that mapped it while the
    name existed can use it again: each segment remembers those worker pids,
    and is reused only by a call whose workers all have it.
    """

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self.free: list[_shm.Segment] = []
        self.busy: list[_shm.Segment] = []
        self.mapped: dict[str, set[int]] = {}
        self.pids: set[int] = set()  # the workers of the call being prepared

    def take(self, nbytes: int) -> _shm.Segment:
        fits = [s for s in self.free if nbytes <= s.data_bytes <= 4 * nbytes + (1 << 20)
                and self.mapped.get(s.name, set()) >= self.pids]
        if fits:
            seg = min(fits, key=lambda s: s.data_bytes)
            self.free.remove(seg)
        else:
            seg = _shm.Segment.create(nbytes)
        self.busy.append(seg)
        return seg

    def release_all(self, attached: set[int]) -> None:
        """End of a call: unlink the names, keep the mappings for the next call."""
        for seg in self.busy:
            seg.unlink()
            self.mapped.setdefault(seg.name, set()).update(attached)
        self.free = self.busy + self.free
        self.busy = []
        total = 0
        keep = []
        for seg in self.free:
            total += seg.size
            if total > self.limit:
                self._drop(seg)
            else:
                keep.append(seg)
        self.free = keep

    def _drop(self, seg) -> None:
        self.mapped.pop(seg.name, None)
        seg.unlink()
        seg.close()

    def flush(self) -> None:
        for seg in self.free:
            self._drop(seg)
        self.free = []

    def names(self) -> list[str]:
        return [s.name for s in self.free + self.busy]


class ProcessEngine(Engine):
    """The pool of worker processes (see the module docstring)."""

    name = "processes"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._ids = itertools.count()
        self.pool = _SegmentPool()
        self.last_bytes_sent = 0
        self._cleaned = False
        # The process that started the workers. A forked child inherits this object,
        # its sockets and the atexit hook: there, shutdown must do nothing (or the
        # child's normal exit would stop the parent's workers).
        self.owner = os.getpid()

    @property
    def size(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _ensure(self, n: int) -> list[_Worker]:
        if not self._cleaned:
            _shm.cleanup_stale()  # segments that killed coremap processes left behind
            self._cleaned = True
        started = False
        for i, w in enumerate(self._workers):
            if not w.process.is_alive():
                w.kill()
                self._workers[i] = _Worker(i)
                started = True
        while len(self._workers) < n:
            self._workers.append(_Worker(len(self._workers)))
            started = True
        if started:
            # pooled segments were mapped by the old set of workers: a new worker
            # cannot attach them (their names are gone), so they would only hold
            # memory and a descriptor (mmap keeps a dup of the fd) from now on
            self.pool.flush()
        procs = self._workers[:n]
        self.pool.pids = {w.process.pid for w in procs}
        return procs

    def segment_array(
        self, shape: tuple[int, ...], dtype: DTypeLike, order: _shm.Order = "C"
    ) -> tuple[_shm.SegmentArray, _shm.Segment]:
        """An array in a pooled segment (``_shm.SegmentArray``), for one call's operand."""
        import math

        dt = np.dtype(dtype)
        seg = self.pool.take(math.prod(shape) * dt.itemsize)
        return _shm.array_in(seg, shape, dt, order), seg

    def prepare(self, workers: int) -> list[_Worker]:
        """Start (or replace) the workers of the next call; call before ``segment_array``."""
        with self._lock:
            return self._ensure(workers)

    def execute(self, call: Any, hooks: Hooks = NO_HOOKS) -> np.ndarray:
        """Run ``call`` on the workers: operands in shared memory, nothing pickled but
        names, offsets, shapes and strides (and the function, once per worker)."""
        if not call.size:
            return no_elements(call)
        call, func_bytes = _shippable(call)
        with self._lock:
            call, probed = self._learn_dtype(call, func_bytes)
            procs = self.prepare(call.workers)
            ops = self._operands(call)
            skip = 0
            if probed is not None:  # the probe's results, kept: those elements run once
                store_kept(ops.space, ops.space.grid(len(call.inputs)), probed, 0,
                           len(probed))
                skip = len(probed)
            spec = _call_spec(call, func_bytes, *self._stage(call, ops.space), skip)
            self.run(spec, procs, timeout=call.timeout, on_progress=hooks.on_progress)
            return ops.result()

    def _learn_dtype(self, call, func_bytes: bytes):
        """``(call, probed)``: the result dtype, probed in a worker if no earlier call of
        this signature did (the parent never runs user code); its results, or None."""
        if call.out_dtype is None:
            call.out_dtype = _probed_dtype(call)
        if call.out_dtype is not None:
            return call, None
        t0 = time.monotonic()
        values = self.probe(ProbeSpec(
            task_id=-1, func=func_bytes, kind=call.kind, func_name=call.func_name,
            scalars=[i.is_scalar for i in call.inputs], args=probe_args(call),
        ), call.shape, call.order, call.timeout)
        call.out_dtype = values.dtype
        # (a vectorized function of the wrong length fails in its chunk: nothing kept)
        probed = values if values.shape == (min(call.size, PROBE),) else None
        if call.timeout is not None:
            call = dataclasses.replace(
                call, timeout=max(1e-3, call.timeout - (time.monotonic() - t0)))
        try:
            _probed.setdefault(call.func, {})[(call.kind, call.in_dtypes)] = call.out_dtype
        except TypeError:  # not weak-referenceable or unhashable: probe every call
            pass
        return call, probed

    def _operands(self, call) -> _layout.Operands:
        """The call's operands with a pooled segment as the target (or a SharedArray
        ``out=`` itself, written in place)."""
        def segment():
            return self.segment_array(call.shape, call.out_dtype, order=call.order)[0]

        direct = call.out is not None and _shm.segment_of(call.out) is not None \
            and not _layout.needs_native_copy(call.out)
        return _layout.prepare_operands(call, target=call.out if direct else segment(),
                                        temporary=segment)

    def _stage(
        self, call: Any, space: _layout.Space
    ) -> tuple[list[np.ndarray], list[_shm.Segment | None]]:
        """``(views, segments)``: every operand in a segment (arrays in one already used
        in place, others copied once into a pooled segment); scalars have None."""
        views = list(space.views)
        segs: list[_shm.Segment | None] = []
        for k, v in enumerate(views):
            origin = call.inputs[k].value if k < len(call.inputs) else None
            seg = _shm.segment_of(v, origin)
            if seg is None and k < len(call.inputs) and call.inputs[k].is_scalar:
                segs.append(None)
                continue
            if seg is None:  # copied once into a pooled segment, in iteration order
                arr, seg = self.segment_array(v.shape, v.dtype)
                np.copyto(arr, v)
                views[k] = arr
            segs.append(seg)
        if _layout.build_space(views) is None:
            for k in _layout.bad_operands(views):
                if segs[k] is not None:
                    arr, segs[k] = self.segment_array(views[k].shape, views[k].dtype)
                    np.copyto(arr, views[k])
                    views[k] = arr
        return views, segs

    def run(self, spec: CallSpec, procs: list[_Worker], timeout: float | None = None,
            on_progress: Callable[[int], None] | None = None) -> None:
        """Send one prepared call to the workers from ``prepare``; raise the first failure.

        ``spec`` is the call's CallSpec; its ``task_id``, ``ctrl``, ``keep`` and
        ``func_key`` are filled in here.
        """
        with self._lock:
            ctrl = self.pool.take(CTRL_SLOTS + 16 * len(procs))
            job = spec.job.job(state=ctrl.address + CTRL_STATE, init=True, state_owner=ctrl)
            slot_view = np.ndarray((len(procs), 2), np.int64, buffer=ctrl.mmap,
                                   offset=CTRL_SLOTS)
            slot_view[:] = -1
            spec = spec._replace(
                task_id=next(self._ids), keep=frozenset(self.pool.names()),
                func_key=digest(spec.func))
            sent = 0
            started: list[_Worker] = []
            try:
                for w in procs:
                    msg = spec._replace(ctrl=CtrlDesc(ctrl.name, CTRL_STATE,
                                                      CTRL_SLOTS + 16 * w.index))
                    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
                    sent += len(data)
                    try:
                        self._send(w, data, slot_view, spec)
                    except BaseException:
                        # the workers that got the call must answer it (or go) before
                        # the next call, or their late replies would be out of step
                        self._abandon({v.conn: v for v in started}, job)
                        raise
                    started.append(w)
                self.last_bytes_sent = sent
                self._wait(procs, job, slot_view, spec, timeout, on_progress)
            finally:
                del slot_view
                self.pool.release_all({w.process.pid for w in procs})

    def _send(self, w: _Worker, data: bytes, slot_view, spec) -> None:
        """Send one request; a worker that died meanwhile is a WorkerCrashedError."""
        try:
            w.conn.send_bytes(data)
        except OSError as exc:  # BrokenPipeError, ConnectionResetError: it is gone
            error = self._crash_error(w, slot_view, spec)
            w.kill()  # in case it lives on without its socket; replaced next call
            raise error from exc

    def probe(self, spec: ProbeSpec, shape: tuple[int, ...], order: str,
              timeout: float | None = None) -> np.ndarray:
        """Run the probe in a worker; return its results (an array) or raise its error."""
        with self._lock:
            w = self._ensure(1)[0]
            spec = spec._replace(task_id=next(self._ids))
            k = len(spec.args[0]) if spec.args else 1
            info = _Info(spec.func_name, shape, order)
            self._send(w, pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL),
                       _Slots([[0, k]]), info)
            deadline = None if timeout is None else time.monotonic() + timeout
            stops = _StopWatch()
            try:
                while True:
                    if deadline is not None and time.monotonic() >= deadline:
                        w.kill()
                        raise TimeoutError(
                            f"{spec.func_name} did not finish within {timeout} s (worker "
                            f"{w.process.pid} on the {self._chunk_text(0, k, info)}, run first "
                            "to learn the result dtype; pass dtype= to skip that)")
                    ready = wait([w.conn, w.process.sentinel], timeout=0.1)
                    if w.conn in ready:
                        try:
                            reply = self._receive(w, spec.task_id, (PROBED,))
                        except (EOFError, OSError):
                            ready = [w.process.sentinel]  # it died: report the crash
                        else:
                            if reply.kind == PROBED:
                                return reply.value
                            self._retire_if_exiting(w, reply)
                            raise self._rebuild_error(reply, info)
                    if w.process.sentinel in ready:
                        raise self._crash_error(w, _Slots([[0, k]]), info)
                    if stops.overdue([w]):
                        w.kill()
                        raise self._crash_error(w, _Slots([[0, k]]), info, stopped=True)
            except KeyboardInterrupt:
                w.kill()
                raise

    @staticmethod
    def _receive(w: _Worker, task_id, kinds) -> Reply:
        """The worker's reply to ``task_id``; a reply out of step kills it (ProtocolError)."""
        data = w.conn.recv_bytes()
        try:
            return check_reply(pickle.loads(data), task_id, kinds)
        except Exception:
            w.kill()  # its stream is out of step with ours: it cannot be trusted again
            raise

    def _wait(self, procs, job, slot_view, spec, timeout, on_progress) -> None:
        pending = {w.conn: w for w in procs}
        sentinels = {w.process.sentinel: w for w in procs}
        first_error: BaseException | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        stop_deadline = None
        stops = _StopWatch()

        def fail(error: BaseException) -> None:
            nonlocal first_error, stop_deadline
            if first_error is None:
                first_error = error
                job.cancel()
                stop_deadline = time.monotonic() + STOP_GRACE

        try:
            while pending:
                wait_for = 0.1
                if deadline is not None:
                    wait_for = max(0.0, min(wait_for, deadline - time.monotonic()))
                ready = wait(list(pending) + [s for s, w in sentinels.items()
                                              if w.conn in pending], timeout=wait_for)
                # replies first: a worker that replied and then exited is not a crash
                for r in sorted(ready, key=lambda r: r not in pending):
                    if r in pending:
                        w = pending[r]
                        try:
                            reply = self._receive(w, spec.task_id, (DONE,))
                        except (EOFError, OSError):
                            continue  # it died: its sentinel reports it
                        except ProtocolError as exc:
                            del pending[r]
                            fail(exc)
                            continue
                        del pending[r]
                        self._retire_if_exiting(w, reply)
                        if reply.kind == ERROR:
                            fail(self._rebuild_error(reply, spec))
                    elif r in sentinels and sentinels[r].conn in pending:
                        w = sentinels[r]
                        del pending[w.conn]
                        fail(self._crash_error(w, slot_view, spec))
                for w in stops.overdue(list(pending.values())):
                    del pending[w.conn]
                    w.kill()  # SIGKILL ends a stopped process too
                    if slot_view[w.index, 0] >= 0 or job.done < spec.job.size:
                        fail(self._crash_error(w, slot_view, spec, stopped=True))
                    # else: it held no chunk and the others computed everything: the
                    # result is whole, the worker is replaced next call
                if on_progress is not None:
                    on_progress(job.done)
                now = time.monotonic()
                if deadline is not None and now >= deadline and first_error is None:
                    fail(self._timeout_error(procs, slot_view, spec, timeout))
                    for w in list(pending.values()):
                        if slot_view[w.index, 0] >= 0:  # still computing: stuck
                            w.kill()
                            del pending[w.conn]
                if stop_deadline is not None and now >= stop_deadline:
                    for w in pending.values():
                        w.kill()  # did not stop within the grace period
                    pending.clear()
        except BaseException:
            self._abandon(pending, job)  # Ctrl-C (or anything else) while waiting
            raise
        if first_error is not None:
            raise first_error

    @staticmethod
    def _abandon(pending: dict[Connection, _Worker], job: Any) -> None:
        """Cancel; give the ``pending`` workers a moment to finish their chunk and
        answer (the answer is dropped); kill those that do not."""
        job.cancel()
        end = time.monotonic() + STOP_GRACE
        while pending and time.monotonic() < end:
            ready = wait(list(pending), timeout=0.05)
            for conn in [c for c in pending if c in ready]:
                try:
                    conn.recv_bytes()
                except (EOFError, OSError):
                    pass
                pending.pop(conn, None)
        for w in pending.values():
            w.kill()

    @staticmethod
    def _retire_if_exiting(w: _Worker, reply: Reply) -> None:
        """A worker that reported SystemExit/KeyboardInterrupt exits: reap it now."""
        if reply.kind == ERROR and _error_of(reply).exits:
            w.process.join(2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(2)

    # -- errors ----------------------------------------------------------------------
    @staticmethod
    def _chunk_text(lo, hi, spec) -> str:
        """``spec``: anything with ``shape`` and ``order`` (a CallSpec, an _Info)."""
        from coremap._tasks import index

        if lo is None or lo < 0:
            return "before any chunk"
        return f"chunk of elements {index(spec, lo)} to {index(spec, hi - 1)}"

    def _rebuild_error(self, reply: Reply, spec) -> BaseException:
        exc = rebuild_error(reply)
        err = _error_of(reply)
        if not err.raised_by_noted:
            note_raised_by(exc, spec.func_name, "in a worker process, on the "
                           f"{self._chunk_text(err.lo, err.hi, spec)}")
        return exc

    def _crash_error(self, w, slot_view, spec, stopped: bool = False) -> WorkerCrashedError:
        w.process.join(1)
        code = w.process.exitcode
        lo, hi = (int(v) for v in slot_view[w.index])
        what = exit_text(code, STOPPED_GRACE if stopped else None)
        return WorkerCrashedError(
            f"worker process {w.process.pid} {what} while computing "
            f"{self._chunk_text(lo, hi, spec)} of {spec.func_name}; it will be replaced",
            pid=w.process.pid, exitcode=code, chunk=(lo, hi) if lo >= 0 else None,
        )

    def _timeout_error(self, procs, slot_view, spec, timeout) -> TimeoutError:
        stuck = [(w, int(slot_view[w.index, 0]), int(slot_view[w.index, 1])) for w in procs
                 if slot_view[w.index, 0] >= 0]
        where = "; ".join(f"worker {w.process.pid} on the {self._chunk_text(lo, hi, spec)}"
                          for w, lo, hi in stuck) or "no chunk in progress"
        return TimeoutError(f"{spec.func_name} did not finish within {timeout} s ({where})")

    def shutdown(self) -> None:
        """Stop every worker and free the pooled segments (in the owner process only)."""
        if os.getpid() != self.owner:
            return
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send_bytes(pickle.dumps(STOP))
                except OSError:
                    pass
            end = time.monotonic() + 2.0
            for w in self._workers:
                w.process.join(max(0.0, end - time.monotonic()))
                w.kill()
            self._workers = []
            self.pool.flush()


# -- preparing a call for the workers --------------------------------------------------

# (function, input dtypes) -> result dtype probed in a worker. A process round
# trip costs about as much as a small call, so the probe runs once per signature;
# later results are cast to it with the "same_kind" rule (or fail loudly).
_probed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probed_dtype(call):
    try:
        return _probed.get(call.func, {}).get((call.kind, call.in_dtypes))
    except TypeError:
        return None


def _shippable(call):
    """``(call, func_bytes)``: the call as workers run it (a built-in kernel becomes its
    scalar form, which they compile with Numba) and its function pickled."""
    import cloudpickle

    if call.kind == "builtin":
        call = dataclasses.replace(call, kind="numba", func=call.func.scalar(call.out_dtype))
    try:
        func_bytes = cloudpickle.dumps(call.func)
    except Exception as exc:
        raise TypeError(f"cannot send {call.func_name} to worker processes: "
                        f"{type(exc).__name__}: {exc}") from exc
    return call, func_bytes


def _describe(view, seg) -> ViewDesc:
    offset = view.__array_interface__["data"][0] - seg.address
    return ViewDesc(seg.name, offset, view.shape, view.strides, view.dtype)


def _call_spec(call, func_bytes: bytes, views, segs, skip: int) -> CallSpec:
    """The message each worker gets; its task_id, func_key, ctrl and keep are filled in
    by ``ProcessEngine.run`` (the placeholders here are never sent)."""
    light = [inp if inp.is_scalar else _layout.Input(None, np.empty((), inp.dtype), False)
             for inp in call.inputs]
    job = job_params(call)
    return CallSpec(
        task_id=-1, kind=call.kind, func=func_bytes, func_key="", func_name=call.func_name,
        shape=call.shape, order=call.order, inputs=light, in_dtypes=call.in_dtypes,
        out_dtype=call.out_dtype,
        views=[None if s is None else _describe(v, s) for v, s in zip(views, segs)],
        job=job, ctrl=CtrlDesc("", 0, 0), keep=frozenset(), skip=skip,
    )
