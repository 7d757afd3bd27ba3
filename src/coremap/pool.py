"""``coremap.Pool``: a drop-in for ``multiprocessing.Pool`` that does not hang.

Same methods, signatures and results as ``multiprocessing.Pool``; what differs
is what hurts there:

* a worker that dies (SIGKILL, segfault, ``os._exit``) fails the task it held
  with :class:`~coremap.WorkerCrashedError` and is replaced, where
  ``multiprocessing.Pool`` waits forever (bpo-22393); so does a worker stopped
  (SIGSTOP, state ``T``) for ``STOPPED_GRACE`` seconds, killed first (a worker
  seen stopped gets no new task meanwhile);
* an initializer that raises breaks the pool: every task fails with
  ``BrokenProcessPool`` naming the initializer and its exception (as
  ``concurrent.futures`` does), where ``multiprocessing.Pool`` restarts workers
  forever and never answers;
* an exception that cannot be pickled or unpickled comes back as
  :class:`~coremap.RemoteError` (type name, message, traceback), where
  ``multiprocessing.Pool`` can hang (gh-79492);
* functions and arguments travel by reference when the workers can import them
  (stdlib pickle, as ``multiprocessing``), else by value with cloudpickle, so
  lambdas and closures work; an argument that cannot be pickled fails at submit
  time with its own exception;
* NumPy arrays of at least ``SHARE_BYTES`` travel through shared memory in
  both directions instead of through the pipe (through the pipe after a
  one-time warning when shared memory is short); results arrive as arrays that
  keep their own mapping alive, and no segment name outlives the task;
* a callback that raises is reported (``threading.excepthook``) and the pool
  goes on; ``terminate()`` fails outstanding results instead of leaving
  ``get()`` hanging.

Data flow (one handler thread per pool, like the stdlib's result handler):

    apply_async / map_async ── pickle every batch now (errors raise here) ──> job queue
    imap / imap_unordered   ── the iterable itself ──────────────────────────> job queue
    handler thread: idle worker <── ("task", spec): the next batch of the oldest job
                                    (imap pulls it from its iterable only now; large
                                    arrays are staged into a segment only now)
                    worker ──> Reply(kind, task id, ...): checked against the task the
                                    worker holds; anything else is a protocol error
                    dead worker ──> its task fails with WorkerCrashedError; replaced
                    worker stopped too long ──> killed, then as a dead worker

Messages are the process engine's named ones (``engines/_messages.py``:
``TaskSpec``, ``InitSpec``, ``Reply``): every reply names its kind and the task
it answers, ``(job number, batch index)``; an initializer's failure answers the
``InitSpec``'s own id (``INIT_TASK``), so it can never be taken for a task's
result.

The workers are the process engine's (``engines/_processes.py``: fresh
interpreters, never forked; ``engines/_worker.py``: one loop for both).
"""
from __future__ import annotations

import collections
import itertools
import os
import pickle
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import TimeoutError as _MPTimeoutError
from multiprocessing.connection import Connection, wait
from multiprocessing.pool import (  # type: ignore[attr-defined] # not in typeshed
    MaybeEncodingError,
    RemoteTraceback,
)
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from coremap import _config, _shm
from coremap._errors import WorkerCrashedError, exit_text
from coremap._functions import digest
from coremap.engines._messages import (
    ERROR,
    RESULT,
    STOP,
    InitSpec,
    ProtocolError,
    Reply,
    TaskSpec,
    check_reply,
)
from coremap.engines._transport import Payload, loads_shared, pickle_payload, stage

if TYPE_CHECKING:
    from coremap.engines._processes import _Worker

__all__ = ["Pool", "AsyncResult", "MapResult", "IMapIterator", "SHARE_BYTES"]

# Arrays at least this large travel through shared memory rather than the pipe.
# Chosen by benchmarks/bench_pool_threshold.py (16 arrays each way, 2 workers):
# segments cost 1.6x the pipe at 128 KiB, 0.79x at 256 KiB, 0.37x at 4 MiB.
SHARE_BYTES = 256 * 1024

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
TimeoutError = _MPTimeoutError  # what AsyncResult.get raises, as in multiprocessing

_T = TypeVar("_T")
_S = TypeVar("_S")


# The id an ``InitSpec`` carries: a worker whose initializer raised answers it.
INIT_TASK = ("init", -1)


# -- arrays through shared memory (engines/_transport.py) ---------------------------------

_warned_full = False  # the "shared memory is short" warning is given once per process


def _pickle_payload(obj: Any) -> Payload:
    """A batch of arguments pickled, arrays of ``SHARE_BYTES`` or more out of band."""
    return pickle_payload(obj, SHARE_BYTES)


def _pickle_function(func: Callable[..., Any]) -> bytes:
    """A function for the workers: by reference when importable, else by value.

    By reference first, as ``multiprocessing`` does: cloudpickle ships by value
    some functions that stdlib pickle names (a classmethod, whose function is
    not found under its qualified name), and by value drags in every global
    they use (a lock, a connection).
    """
    try:
        return pickle_payload(func, threshold=2**63).data
    except Exception as exc:
        raise TypeError(f"cannot send {func!r} to the pool's workers: {exc}") from exc


def _warn_short(exc: OSError) -> None:
    global _warned_full
    if _warned_full:
        return
    _warned_full = True
    try:
        warnings.warn(f"shared memory is short ({exc}): coremap.Pool sends large arrays "
                      "through the pipe instead, which is slower; give /dev/shm more room "
                      "(e.g. docker run --shm-size=1g) to move them through shared memory",
                      RuntimeWarning, stacklevel=3)
    except Exception:  # noqa: S110 - warnings turned into errors must not stop the pool
        pass


def _rebuild_error(reply: Reply) -> BaseException:
    """The worker's exception, with its traceback as a ``RemoteTraceback`` ``__cause__``
    (what ``multiprocessing.Pool`` gives)."""
    from coremap.engines._processes import rebuild_error

    exc = rebuild_error(reply)
    tb = reply.error.traceback if reply.error is not None else ""
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


# -- results -------------------------------------------------------------------------

def _run_callback(hook: Callable[[Any], object], value: Any) -> None:
    """Call a user callback; what it raises is reported, never raised here: the
    thread that runs it delivers every other result too."""
    try:
        hook(value)
    except BaseException:  # noqa: BLE001
        exc_type, exc, tb = sys.exc_info()
        try:
            threading.excepthook(threading.ExceptHookArgs(
                (exc_type, exc, tb, threading.current_thread())))
        except BaseException:  # noqa: BLE001, S110 - a broken hook must not stop delivery
            pass
        finally:
            del exc, tb


class AsyncResult(Generic[_T]):
    """The result of :meth:`Pool.apply_async`, as in ``multiprocessing``.

    Examples
    --------
    >>> import coremap as cm
    >>> with cm.Pool(1) as pool:
    ...     r = pool.apply_async(divmod, (7, 2))
    ...     r.get(timeout=30)
    (3, 1)
    """

    def __init__(self, pool: Pool, callback: Callable[[_T], object] | None = None,
                 error_callback: Callable[[BaseException], object] | None = None) -> None:
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success: bool | None = None
        self._value: Any = None
        self._pool = pool
        self._job = next(pool._job_numbers)

    def ready(self) -> bool:
        """Whether the call has completed (successfully or not).

        Returns
        -------
        bool
        """
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call completed without raising.

        Returns
        -------
        bool

        Raises
        ------
        ValueError
            If the result is not ready yet.
        """
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is available or ``timeout`` seconds pass.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most; None waits as long as it takes.
        """
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> _T:
        """The result when it arrives; the call's exception if it raised.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most; None waits as long as it takes.

        Returns
        -------
        object
            What the function returned.

        Raises
        ------
        multiprocessing.TimeoutError
            If the result is not ready within ``timeout``.
        BaseException
            What the function raised (its worker traceback as ``__cause__``),
            :class:`~coremap.WorkerCrashedError` if its worker died, or
            ``BrokenProcessPool`` if the pool's initializer raised.
        """
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, index: int, ok: bool, value: Any) -> None:
        self._finish(ok, value[0] if ok else value)

    def _abort(self, exc: BaseException) -> None:
        self._finish(False, exc)

    def _finish(self, ok: bool, value: Any) -> None:
        if self.ready():
            return
        self._success, self._value = ok, value
        hook = self._callback if ok else self._error_callback
        if hook is not None:
            _run_callback(hook, value)
        self._event.set()
        self._pool._jobs.pop(self._job, None)


class MapResult(AsyncResult[list[_T]]):
    """The result of :meth:`Pool.map_async` and :meth:`Pool.starmap_async`: a list."""

    def __init__(self, pool: Pool, chunks: int, callback: Callable[[list[_T]], object] | None,
                 error_callback: Callable[[BaseException], object] | None) -> None:
        super().__init__(pool, callback, error_callback)
        self._parts: list = [None] * chunks
        self._left = chunks
        if chunks == 0:
            self._finish(True, [])

    def _set(self, index: int, ok: bool, value: Any) -> None:
        if self.ready():
            return
        if not ok:
            self._finish(False, value)
            return
        self._parts[index] = value
        self._left -= 1
        if self._left == 0:
            self._finish(True, list(itertools.chain.from_iterable(self._parts)))
            self._parts = []


class IMapIterator(Generic[_T]):
    """The iterator of :meth:`Pool.imap_unordered` (and base of ``imap``'s), with
    ``next(timeout)``."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._job = next(pool._job_numbers)
        self._cond = threading.Condition()
        self._items: Any = collections.deque()
        self._expected: int | None = None  # number of chunks, known once the input ended
        self._taken = 0
        self._pending: collections.deque = collections.deque()
        self._aborted: BaseException | None = None

    def __iter__(self) -> IMapIterator[_T]:
        return self

    def _store(self, index: int, item: tuple[bool, Any]) -> None:
        self._items.append(item)

    def _take(self) -> tuple[bool, Any] | None:
        return self._items.popleft() if self._items else None

    def _set(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            if self._aborted is None:
                self._store(index, (ok, value))
            self._cond.notify_all()

    def _set_length(self, chunks: int) -> None:
        with self._cond:
            self._expected = chunks
            self._cond.notify_all()

    def _abort(self, exc: BaseException) -> None:
        with self._cond:
            self._aborted = exc
            self._cond.notify_all()

    def ready(self) -> bool:  # for the pool's bookkeeping: an iterator is never "done"
        return False

    def next(self, timeout: float | None = None) -> _T:
        """The next result.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most; None waits as long as it takes.

        Returns
        -------
        object

        Raises
        ------
        StopIteration
            When every result has been returned.
        multiprocessing.TimeoutError
            If no result arrives within ``timeout``.
        BaseException
            What the function (or the input iterable) raised for this item.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._pending:
                if self._expected is not None and self._taken >= self._expected:
                    self._pool._jobs.pop(self._job, None)
                    raise StopIteration
                got = self._take()
                if got is not None:
                    ok, value = got
                    self._taken += 1
                    if not ok:
                        raise value
                    self._pending.extend(value)
                    continue
                if self._aborted is not None:
                    raise self._aborted
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                self._cond.wait(left)
            return self._pending.popleft()

    __next__ = next


class _OrderedIter(IMapIterator[_T]):
    """``imap``: results in submission order."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._items = {}

    def _store(self, index: int, item: tuple[bool, Any]) -> None:
        self._items[index] = item

    def _take(self) -> tuple[bool, Any] | None:
        return self._items.pop(self._taken, None)


# -- jobs and tasks ----------------------------------------------------------------------

class _Task:
    """One batch of one job, on its way to a worker or running there.

    ``batch`` is kept until the task is done: it holds what the worker still
    needs from the caller (a temporary ``SharedArray`` whose segment would
    otherwise be unlinked, the large buffers staged only when sent).
    """

    __slots__ = ("job", "index", "batch", "payload", "segment", "shared", "inband")

    def __init__(self, job: _Job, index: int, batch: list, payload: Payload) -> None:
        self.job, self.index = job, index
        self.batch: list | None = batch
        self.payload: Any = payload  # Payload until released
        self.segment: _shm.Segment | None = None
        self.shared: Any = None
        self.inband: list | None = None

    @property
    def id(self) -> tuple[int, int]:
        return (self.job.result._job, self.index)

    def release(self) -> None:
        """The worker is done with it (or it never reached one): let go of its inputs."""
        if self.segment is not None:
            self.segment.unlink()
        self.segment = self.shared = self.inband = None
        self.batch = self.payload = None


class _Job:
    """One submitted call: its function (pickled once), how to call it, its result
    object, and the batches not yet sent (a list, or an iterable read lazily)."""

    def __init__(self, func_bytes: bytes, mode: str, result: Any,
                 source: Iterator[Any] | None = None, chunksize: int = 1) -> None:
        self.func = func_bytes
        self.key = digest(func_bytes)
        self.mode = mode
        self.result = result
        self.tasks: collections.deque[_Task] = collections.deque()
        self.source = source  # imap: the caller's iterator, read as workers free up
        self.chunksize = chunksize
        self.chunks = 0

    def take(self) -> _Task | None:
        """The next task to send; None when this job has no more."""
        if self.result.ready():  # it already failed: the rest need not run
            self.drop()
            return None
        if self.tasks:
            return self.tasks.popleft()
        while self.source is not None:
            index = self.chunks
            try:
                batch = list(itertools.islice(self.source, self.chunksize))
            except Exception as exc:  # the input raised: its chunk raises, the input ends
                self.result._set(index, False, exc)
                self._end(index + 1)
                return None
            if not batch:
                self._end(index)
                return None
            self.chunks += 1
            try:
                payload = _pickle_payload(batch)
            except Exception as exc:  # as multiprocessing: this chunk fails, the rest go on
                self.result._set(index, False, exc)
                continue
            return _Task(self, index, batch, payload)
        return None

    def _end(self, chunks: int) -> None:
        self.source = None
        self.result._set_length(chunks)

    def drop(self) -> None:
        for task in self.tasks:
            task.release()
        self.tasks.clear()
        self.source = None


# -- the pool ------------------------------------------------------------------------

class Pool:
    """A pool of worker processes with the API of ``multiprocessing.Pool``.

    Parameters
    ----------
    processes : int, optional
        Number of workers (default: the usable cores).
    initializer : callable, optional
        Called as ``initializer(*initargs)`` in each worker when it starts. If it
        raises, the pool is broken: every task fails with
        ``concurrent.futures.process.BrokenProcessPool`` naming it.
    initargs : iterable
        Arguments of ``initializer``.
    maxtasksperchild : int, optional
        Replace a worker after it has run this many tasks (batches).
    context : object, optional
        Accepted for compatibility and ignored: workers are always fresh
        interpreters (never forked), whatever the start method.

    Raises
    ------
    ValueError
        If ``processes`` or ``maxtasksperchild`` is not a positive int.
    TypeError
        If ``initializer`` is not callable or cannot be pickled.

    Examples
    --------
    >>> import coremap as cm
    >>> with cm.Pool(2) as pool:
    ...     pool.map(abs, [-1, -2, 3])
    [1, 2, 3]
    """

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None) -> None:
        if processes is None:
            processes = _config.usable_cores()
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (
            isinstance(maxtasksperchild, bool) or not isinstance(maxtasksperchild, int)
            or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        self._init: bytes | None = None
        self._init_name = ""
        if initializer is not None:
            self._init = _pickle_function((initializer, tuple(initargs)))  # type: ignore[arg-type]
            self._init_name = getattr(initializer, "__qualname__", None) or repr(initializer)
        self._processes = processes
        self._maxtasks = maxtasksperchild
        self._state = RUN
        self._broken: tuple[str, BaseException] | None = None
        self._lock = threading.RLock()
        self._job_numbers = itertools.count()
        self._tasks: collections.deque[_Job] = collections.deque()
        self._retry: collections.deque[_Task] = collections.deque()
        self._jobs: dict[int, Any] = {}
        self._busy: dict[_Worker, _Task] = {}
        self._counts: dict[_Worker, int] = {}
        self._workers: list[_Worker] = []
        self._wakeup_r, self._wakeup_w = _pipe()
        from coremap.engines._processes import _StopWatch

        self._stops = _StopWatch()  # workers stopped (SIGSTOP) too long: killed, replaced
        try:
            for _ in range(processes):
                self._workers.append(self._start_worker())
        except BaseException:  # never leave the workers already started behind
            self._state = TERMINATE
            _shutdown(self._workers, self._wakeup_w, os.getpid())
            self._wakeup_r.close()
            raise
        # the thread holds the pool only by a weak reference between steps, so a pool
        # dropped while running is collected: warned about, its workers stopped
        self._handler = threading.Thread(target=_handle, args=(weakref.ref(self),),
                                         name="coremap-pool-handler", daemon=True)
        self._handler.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._wakeup_w,
                                           os.getpid())

    # -- workers ----------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        from coremap.engines._processes import _Worker

        w = _Worker(len(self._workers))
        if self._init is not None:
            # a worker dead already fails this send: its sentinel reports it, and it
            # is replaced like any other dead worker
            _send_quietly(w, InitSpec(INIT_TASK, self._init))
        self._counts[w] = 0
        return w

    @property
    def _pool(self) -> list:
        """The worker processes (``pid``, ``is_alive()``), as ``multiprocessing.Pool._pool``."""
        with self._lock:
            return [w.process for w in self._workers]

    def _repopulate_pool(self) -> None:
        """Kept for code written against ``multiprocessing.Pool``: the handler thread
        replaces workers as they exit; this waits for a replacement in progress."""
        with self._lock:
            pass

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- submitting ----------------------------------------------------------------------
    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._check_running()
            if self._broken is not None:
                job.drop()
                job.result._abort(self._broken_error())
                return
            self._jobs[job.result._job] = job.result
            self._tasks.append(job)
        self._wake()

    def _eager_job(self, func: Callable[..., Any], batches: list[tuple[int, list]], result: Any,
                   mode: str) -> _Job:
        """A job whose batches are all pickled now, so bad arguments raise here, with
        their own exception (large buffers are staged only when each batch is sent)."""
        job = _Job(_pickle_function(func), mode, result)
        for index, batch in batches:
            try:
                payload = _pickle_payload(batch)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python 3.11+; the exception keeps its type
                    exc.add_note(f"(while sending the arguments of task {index} to the "
                                 "pool's workers)")
                raise
            job.tasks.append(_Task(job, index, batch, payload))
        return job

    def apply_async(self, func: Callable[..., _T], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[_T], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    ) -> AsyncResult[_T]:
        """Call ``func(*args, **kwds)`` in a worker; return at once.

        Parameters
        ----------
        func : callable
            Sent by reference when the workers can import it, else by value
            (cloudpickle: lambdas and closures work).
        args : iterable
            Positional arguments.
        kwds : mapping, optional
            Keyword arguments.
        callback : callable, optional
            Called with the result in the pool's handler thread; what it raises
            goes to ``threading.excepthook`` and the pool goes on.
        error_callback : callable, optional
            Called with the exception instead, when the call fails.

        Returns
        -------
        AsyncResult

        Raises
        ------
        ValueError
            If the pool is not running.
        BaseException
            What pickling ``func`` or the arguments raised (``TypeError`` for a
            lock, for example), before anything is sent.
        """
        self._check_running()
        result: AsyncResult[_T] = AsyncResult(self, callback, error_callback)
        self._submit(self._eager_job(func, [(0, [(tuple(args), dict(kwds or {}))])], result,
                                     "apply"))
        return result

    def apply(self, func: Callable[..., _T], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] | None = None) -> _T:
        """Call ``func(*args, **kwds)`` in a worker and wait for the result.

        Parameters
        ----------
        func : callable
        args : iterable
        kwds : mapping, optional

        Returns
        -------
        object
            What ``func`` returned.

        Raises
        ------
        BaseException
            What ``func`` raised, with the worker's traceback as ``__cause__``
            (a ``multiprocessing.pool.RemoteTraceback``).

        Examples
        --------
        >>> import coremap as cm
        >>> with cm.Pool(1) as pool:
        ...     pool.apply(pow, (2, 10))
        1024
        """
        return self.apply_async(func, args, kwds).get()

    def _batches(self, iterable: Iterable[Any], chunksize: int | None
                 ) -> list[tuple[int, list]]:
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        if len(items) == 0:
            return []
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        return [(i, items[k:k + chunksize]) for i, k in enumerate(range(0, len(items), chunksize))]

    def map_async(self, func: Callable[[_S], _T], iterable: Iterable[_S],
                  chunksize: int | None = None,
                  callback: Callable[[list[_T]], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None,
                  ) -> MapResult[_T]:
        """:meth:`map` without waiting: return a result object at once.

        Parameters
        ----------
        func : callable
        iterable : iterable
            Read whole now (as ``multiprocessing`` does).
        chunksize : int, optional
            Items per task (default: about four tasks per worker).
        callback, error_callback : callable, optional
            As in :meth:`apply_async`.

        Returns
        -------
        MapResult
        """
        return self._map_async(func, iterable, chunksize, callback, error_callback, "map")

    def starmap_async(self, func: Callable[..., _T], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[list[_T]], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None,
                      ) -> MapResult[_T]:
        """:meth:`starmap` without waiting: return a result object at once.

        Parameters
        ----------
        func : callable
        iterable : iterable of iterables
            Argument tuples.
        chunksize : int, optional
        callback, error_callback : callable, optional

        Returns
        -------
        MapResult
        """
        return self._map_async(func, iterable, chunksize, callback, error_callback, "star")

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                   chunksize: int | None, callback: Callable[[list[Any]], object] | None,
                   error_callback: Callable[[BaseException], object] | None,
                   mode: str) -> MapResult[Any]:
        self._check_running()
        batches = self._batches(iterable, chunksize)
        result: MapResult = MapResult(self, len(batches), callback, error_callback)
        if batches:
            self._submit(self._eager_job(func, batches, result, mode))
        return result

    def map(self, func: Callable[[_S], _T], iterable: Iterable[_S],
            chunksize: int | None = None) -> list[_T]:
        """``list(map(func, iterable))``, computed by the workers.

        Parameters
        ----------
        func : callable
        iterable : iterable
        chunksize : int, optional
            Items per task (default: about four tasks per worker).

        Returns
        -------
        list

        Raises
        ------
        BaseException
            The first exception of ``func`` (by task), with the worker's
            traceback as ``__cause__``; :class:`~coremap.WorkerCrashedError` if a
            worker died.

        Examples
        --------
        >>> import coremap as cm
        >>> with cm.Pool(2) as pool:
        ...     pool.map(abs, range(-3, 1))
        [3, 2, 1, 0]
        """
        return self.map_async(func, iterable, chunksize).get()

    def starmap(self, func: Callable[..., _T], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[_T]:
        """``list(itertools.starmap(func, iterable))``, computed by the workers.

        Parameters
        ----------
        func : callable
        iterable : iterable of iterables
        chunksize : int, optional

        Returns
        -------
        list

        Examples
        --------
        >>> import coremap as cm
        >>> with cm.Pool(2) as pool:
        ...     pool.starmap(pow, [(2, 3), (3, 2)])
        [8, 9]
        """
        return self.starmap_async(func, iterable, chunksize).get()

    def imap(self, func: Callable[[_S], _T], iterable: Iterable[_S],
             chunksize: int = 1) -> IMapIterator[_T]:
        """An iterator of ``func``'s results, in order, as they come.

        The iterable is read lazily, as workers free up (an endless one works);
        if it raises, the iterator raises at that item's chunk.

        Parameters
        ----------
        func : callable
        iterable : iterable
        chunksize : int
            Items per task.

        Returns
        -------
        IMapIterator
            Its ``next(timeout)`` takes a timeout.

        Examples
        --------
        >>> import itertools, coremap as cm
        >>> with cm.Pool(2) as pool:
        ...     it = pool.imap(abs, itertools.count(-2))
        ...     [next(it) for _ in range(4)]
        [2, 1, 0, 1]
        """
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[[_S], _T], iterable: Iterable[_S],
                       chunksize: int = 1) -> IMapIterator[_T]:
        """Like :meth:`imap`, with results in the order they are done.

        Parameters
        ----------
        func : callable
        iterable : iterable
        chunksize : int

        Returns
        -------
        IMapIterator
        """
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int,
              ordered: bool) -> IMapIterator[Any]:
        self._check_running()
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        source = iter(iterable)
        it: IMapIterator = (_OrderedIter if ordered else IMapIterator)(self)
        self._submit(_Job(_pickle_function(func), "map", it, source, chunksize))
        return it

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more tasks; the workers exit once the queued ones are done."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
        self._wake()

    def terminate(self) -> None:
        """Stop the workers now; outstanding results fail instead of hanging."""
        with self._lock:
            self._state = TERMINATE
        self._wake()
        if self._handler.is_alive() and threading.current_thread() is not self._handler:
            self._handler.join(10)
        self._finalizer()

    def join(self) -> None:
        """Wait for the workers to exit (after :meth:`close` or :meth:`terminate`).

        Raises
        ------
        ValueError
            If the pool is still running.
        RuntimeError
            If called from a callback (the handler thread).
        """
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if threading.current_thread() is self._handler:
            raise RuntimeError("cannot join the pool from its own callback")
        self._handler.join()
        self._finalizer()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<coremap.Pool state={self._state} pool_size={len(self._workers)}>"

    def __reduce__(self) -> NoReturn:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # as multiprocessing.Pool: a pool collected while running was never closed
        if getattr(self, "_state", None) == RUN:
            # no ``source=self``: a recorded warning would keep the pool alive
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning)
            self._state = TERMINATE  # and if something resurrects it, the handler ends
            self._wake()

    # -- the broken state ------------------------------------------------------------------
    def _broken_error(self) -> BrokenProcessPool:
        assert self._broken is not None
        what, cause = self._broken
        err = BrokenProcessPool(f"{what} raised {type(cause).__name__}: {cause}; no task can "
                                "run in this pool (fix it and start a new Pool)")
        err.__cause__ = cause
        return err

    def _break(self, what: str, cause: BaseException) -> None:
        """Fail every task, queued and future (an initializer raised: no worker is usable)."""
        with self._lock:
            if self._broken is None:
                self._broken = (what, cause)
            jobs = list(self._jobs.values())
            for job in self._tasks:
                job.drop()
            self._tasks.clear()
            for task in self._retry:
                task.release()
            self._retry.clear()
        for result in jobs:
            result._abort(self._broken_error())

    # -- the handler thread --------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wakeup_w.send_bytes(b"x")
        except OSError:
            pass

    def _drain_wakeups(self) -> None:
        while self._wakeup_r.poll():
            self._wakeup_r.recv_bytes()

    def _fail_outstanding(self) -> None:
        """The handler is ending: fail what is still waiting, let go of its inputs."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            tasks = [*self._busy.values(), *self._retry]
            self._busy.clear()
            self._retry.clear()
            for job in self._tasks:
                job.drop()
            self._tasks.clear()
        for task in tasks:
            task.release()
        for result in jobs:  # never leave a get() waiting on a pool that is gone
            result._abort(RuntimeError("the pool was terminated before this result "
                                       "was computed"))

    def _step(self) -> bool:
        """One round of the handler: send, wait (0.5 s at most), receive, reap.
        False once the pool is terminated, or closed with nothing left to do."""
        if self._state == TERMINATE:
            return False
        # not under the lock: reading an imap input or sending a large batch must not
        # hold up threads that submit (only this thread takes tasks off the queues)
        self._dispatch()
        with self._lock:
            if (self._state == CLOSE and not self._tasks and not self._retry
                    and not self._busy):
                for w in self._workers:
                    _send_quietly(w, STOP)
                return False
            conns = {w.conn: w for w in self._workers}
            sentinels = {w.process.sentinel: w for w in self._workers}
        ready = wait([self._wakeup_r, *conns, *sentinels], timeout=0.5)
        for r in ready:
            if r is self._wakeup_r:
                self._drain_wakeups()
            elif r in conns:
                self._receive(conns[r])
        for r in ready:
            if r in sentinels:
                self._reap(sentinels[r])
        self._kill_stopped()
        return True

    def _kill_stopped(self) -> None:
        """Kill the workers stopped (SIGSTOP, state ``T``) for ``STOPPED_GRACE``: the
        task one holds would hang until SIGCONT; it fails, the worker is replaced."""
        with self._lock:
            workers = list(self._workers)
        for w in self._stops.overdue(workers):
            w.process.kill()  # SIGKILL ends a stopped process too
            w.process.join(5)
            self._reap(w, stopped=True)
            self._stops.since.pop(w.process.pid, None)  # a later worker may get its pid

    def _next_task(self) -> _Task | None:
        """The next task to send (the handler thread only: it alone takes from the queues)."""
        while self._retry:
            task = self._retry.popleft()
            if not task.job.result.ready():
                return task
            task.release()
        while self._tasks:
            new = self._tasks[0].take()
            if new is not None:
                return new
            self._tasks.popleft()
        return None

    def _message(self, task: _Task, w: _Worker) -> TaskSpec:
        """The message that sends ``task`` (staged) to worker ``w``."""
        return TaskSpec(task.id, task.job.func, task.job.key, task.payload.data, task.shared,
                        task.job.mode, SHARE_BYTES, task.inband)

    def _dispatch(self) -> None:
        for w in self._workers:
            # a worker seen stopped gets no new task: it is killed if it stays so
            if w in self._busy or w.process.pid in self._stops.since \
                    or not w.process.is_alive():
                continue
            task = self._next_task()
            if task is None:
                return
            try:
                task.shared, task.segment, task.inband = stage(task.payload, _warn_short)
                data = pickle.dumps(self._message(task, w), protocol=pickle.HIGHEST_PROTOCOL)
                w.conn.send_bytes(data)
            except OSError:
                # it died after the liveness check: the task never reached it, so it
                # goes to the next worker (its sentinel reports this one)
                if task.segment is not None:
                    task.segment.unlink()
                task.segment = task.shared = task.inband = None
                self._retry.appendleft(task)
                continue
            self._busy[w] = task

    def _receive(self, w: _Worker) -> None:
        try:
            raw = w.conn.recv_bytes()
        except (EOFError, OSError):
            w.process.join(1)  # it died: its sentinel reports it
            return
        try:
            reply = pickle.loads(raw)
        except Exception as exc:  # noqa: BLE001 - treated as a reply of unknown kind
            reply = exc
        with self._lock:
            task = self._busy.pop(w, None)
        if isinstance(reply, Reply) and reply.kind == ERROR and reply.task_id == INIT_TASK:
            if task is not None:
                task.release()
            self._break(f"the pool's initializer {self._init_name}()", _rebuild_error(reply))
            return
        try:
            if task is None:
                raise ProtocolError(f"a worker holding no task sent {reply!r:.100}")
            check_reply(reply, task.id, (RESULT,))
        except ProtocolError as exc:
            self._protocol_error(w, task, exc)
            return
        with self._lock:
            self._counts[w] = self._counts.get(w, 0) + 1
            retire = (reply.kind == ERROR and reply.error.exits) or (
                self._maxtasks is not None and self._counts[w] >= self._maxtasks)
        result, index = task.job.result, task.index
        task.release()  # argument segments: the worker is done with them
        if reply.kind == RESULT:
            try:
                data, info = reply.value
                values = loads_shared(data, info, unlink=True)
            except Exception as exc:  # noqa: BLE001 - a result that cannot be unpickled here
                result._set(index, False, MaybeEncodingError(exc, "<result>"))
            else:
                result._set(index, True, values)
        else:
            result._set(index, False, _rebuild_error(reply))
        if retire:
            self._replace(w, graceful=True)

    def _protocol_error(self, w: _Worker, task: _Task | None, exc: ProtocolError) -> None:
        """A worker said something other than the answer to the task it holds: fail
        that task (never take the message for its result) and replace the worker."""
        if task is not None:
            task.job.result._set(task.index, False, ProtocolError(
                f"protocol error from pool worker {w.process.pid}: {exc}; the worker was "
                "replaced"))
            task.release()
        self._replace(w, graceful=False)

    def _reap(self, w: _Worker, stopped: bool = False) -> None:
        """A worker died (or was killed, ``stopped`` too long): fail its task, start
        another (unless the pool is ending)."""
        if w not in self._workers or w.process.is_alive():
            return
        if w.conn.poll():  # its last words (a result, a failed initializer) come first
            self._receive(w)
            if w not in self._workers:
                return
        with self._lock:
            task = self._busy.pop(w, None)
        if task is not None:
            from coremap.engines._processes import STOPPED_GRACE

            code = w.process.exitcode
            what = exit_text(code, STOPPED_GRACE if stopped else None)
            task.job.result._set(task.index, False, WorkerCrashedError(
                f"pool worker {w.process.pid} {what} while running task {task.index}",
                pid=w.process.pid, exitcode=code))
            task.release()
        _shm.cleanup_stale()  # result segments it may have left behind
        self._replace(w, graceful=False)

    def _replace(self, w: _Worker, graceful: bool) -> None:
        with self._lock:
            if w not in self._workers:
                return
            i = self._workers.index(w)
            if graceful:
                _send_quietly(w, STOP)
                w.process.join(2)
            w.kill()
            self._counts.pop(w, None)
            if self._state == TERMINATE or self._broken is not None:
                del self._workers[i]
                return
            try:
                self._workers[i] = self._start_worker()
            except OSError as exc:  # no process can start (pid or memory limit)
                del self._workers[i]
                if not self._workers:
                    self._break("starting a pool worker", exc)


def _handle(ref: weakref.ref[Pool]) -> None:
    """The handler thread's loop (see the module docstring)."""
    while True:
        pool = ref()
        if pool is None:  # collected while running: its finalizer stopped the workers
            return
        try:
            if not pool._step():
                pool._fail_outstanding()
                return
        except BaseException:
            pool._fail_outstanding()
            raise
        del pool


def _send_quietly(w: _Worker, msg: Any) -> bool:
    try:
        w.conn.send_bytes(pickle.dumps(msg))
    except OSError:
        return False
    return True


def _pipe() -> tuple[Connection, Connection]:
    from multiprocessing import Pipe

    return Pipe(duplex=False)


def _shutdown(workers: list[_Worker], wakeup_w: Connection, owner: int) -> None:
    """Stop the workers (terminate, join, garbage collection and exit all end here).

    Only in the process that started them: a forked child's exit runs this too.
    """
    if os.getpid() != owner:
        return
    for w in list(workers):
        _send_quietly(w, STOP)
    end = time.monotonic() + 1.0
    for w in list(workers):
        w.process.join(max(0.0, end - time.monotonic()))
        w.kill()
    try:
        wakeup_w.close()
    except OSError:
        pass
