"""``coremap.Pool``: a drop-in for ``multiprocessing.Pool`` that does not hang.

Same methods, signatures and results as ``multiprocessing.Pool``; what differs
is what hurts there:

* a worker that dies (SIGKILL, segfault, ``os._exit``) fails the task it held
  with :class:`~coremap.WorkerCrashedError` and is replaced, where
  ``multiprocessing.Pool`` waits forever (bpo-22393);
* an exception that cannot be pickled or unpickled comes back as
  :class:`~coremap.RemoteError` (type name, message, traceback), where
  ``multiprocessing.Pool`` can hang (gh-79492);
* functions and arguments travel with cloudpickle, so lambdas and closures work;
  an argument that cannot be pickled fails at submit time;
* NumPy arrays of at least ``SHARE_BYTES`` travel through shared memory in
  both directions instead of through the pipe; results arrive as arrays that
  keep their own mapping alive, and no segment name outlives the task;
* ``terminate()`` fails outstanding results instead of leaving ``get()`` hanging.

Data flow (one handler thread per pool, like the stdlib's result handler):

    apply_async / map_async ── pickle the batch now (errors raise here) ──> task queue
    handler thread: idle worker <── ("task", batch) ; reply ──> result objects, callbacks
                    dead worker ──> its task fails with WorkerCrashedError; replaced

The workers are the process engine's (``engines/_processes.py``: fresh
interpreters, never forked; ``engines/_worker.py``: one loop for both).
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import pickle
import threading
import time
import weakref
from multiprocessing import TimeoutError as _MPTimeoutError
from multiprocessing.connection import wait
from multiprocessing.pool import MaybeEncodingError

from coremap import _config, _shm
from coremap._errors import WorkerCrashedError
from coremap.engines._messages import RESULT, STOP, InitSpec, TaskSpec

__all__ = ["Pool", "AsyncResult", "SHARE_BYTES"]

# Arrays at least this large travel through shared memory rather than the pipe.
# Chosen by benchmarks/bench_pool_threshold.py (16 arrays each way, 2 workers):
# segments cost 1.6x the pipe at 128 KiB, 0.79x at 256 KiB, 0.37x at 4 MiB.
SHARE_BYTES = 256 * 1024

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
TimeoutError = _MPTimeoutError  # what AsyncResult.get raises, as in multiprocessing


# -- arrays through shared memory --------------------------------------------------------
#
# Pickle protocol 5 hands every contiguous array buffer to ``buffer_callback``;
# the large ones are kept out of band and copied into one segment, the receiver
# passes views of that segment as ``buffers=`` to ``pickle.loads``, and NumPy
# rebuilds the arrays on them: zero copy on the receiving side, no Python walk
# over the arguments, arrays found at any depth (inside user objects too).

_ALIGN = 64


def dumps_shared(obj, fallback_cloudpickle: bool = True, threshold: int | None = None):
    """``(data, segment_info, segment)``: ``obj`` pickled, large buffers in a segment."""
    big = []
    threshold = SHARE_BYTES if threshold is None else threshold

    def take(pb):
        raw = pb.raw()
        if raw.nbytes >= threshold:
            big.append(raw)
            return False  # out of band: it goes through shared memory
        return True

    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=take)
    except Exception:
        if not fallback_cloudpickle:
            raise
        import cloudpickle  # lambdas and closures among the arguments

        big.clear()
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=take)
    if not big:
        return data, None, None
    offsets, total = [], 0
    for raw in big:
        offsets.append((total, raw.nbytes))
        total += -(-raw.nbytes // _ALIGN) * _ALIGN
    seg = _shm.Segment.create(total)
    view = memoryview(seg.mmap)
    for raw, (off, n) in zip(big, offsets):
        view[_shm.HEADER + off:_shm.HEADER + off + n] = raw.cast("B")
    del view
    return data, (seg.name, offsets), seg


def loads_shared(data, info, unlink: bool = False):
    """Inverse of ``dumps_shared``; ``unlink`` removes the segment's name once mapped."""
    if info is None:
        return pickle.loads(data)
    name, offsets = info
    seg = _shm.Segment.attach(name)
    if unlink:
        try:
            _shm._posixshmem.shm_unlink("/" + name)  # the mapping keeps the memory
        except FileNotFoundError:
            pass
    view = memoryview(seg.mmap)
    buffers = [view[_shm.HEADER + off:_shm.HEADER + off + n] for off, n in offsets]
    return pickle.loads(data, buffers=buffers)


def export_results(results, threshold: int | None = None):
    """A worker's reply payload: results pickled, large arrays left in a segment that
    the parent adopts (maps, then unlinks)."""
    data, info, seg = dumps_shared(results, fallback_cloudpickle=False, threshold=threshold)
    if seg is not None:
        seg._finalizer.detach()  # the parent unlinks it once mapped
    return data, info


def encoding_error(exc, results):
    return MaybeEncodingError(exc, results)


# -- results -------------------------------------------------------------------------

class AsyncResult:
    """The result of ``apply_async`` (and the base of ``map_async``'s), as in multiprocessing."""

    def __init__(self, pool, callback=None, error_callback=None) -> None:
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = None
        self._value = None
        self._pool = pool

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, index: int, ok: bool, value) -> None:
        self._finish(ok, value[0] if ok else value)

    def _finish(self, ok: bool, value) -> None:
        if self.ready():
            return
        self._success, self._value = ok, value
        if ok and self._callback is not None:
            self._callback(value)
        if not ok and self._error_callback is not None:
            self._error_callback(value)
        self._event.set()
        self._pool._jobs.pop(id(self), None)


class MapResult(AsyncResult):
    def __init__(self, pool, chunks: int, callback, error_callback) -> None:
        super().__init__(pool, callback, error_callback)
        self._parts: list = [None] * chunks
        self._left = chunks
        if chunks == 0:
            self._finish(True, [])

    def _set(self, index: int, ok: bool, value) -> None:
        if self.ready():
            return
        if not ok:
            self._finish(False, value)
            return
        self._parts[index] = value
        self._left -= 1
        if self._left == 0:
            self._finish(True, list(itertools.chain.from_iterable(self._parts)))


class IMapIterator:
    """The iterator of ``imap_unordered`` (and base of ``imap``'s), with ``next(timeout)``."""

    def __init__(self, pool) -> None:
        self._pool = pool
        self._cond = threading.Condition()
        self._items = collections.deque()
        self._expected: int | None = None  # number of chunks, known once submitted
        self._taken = 0
        self._pending: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def _store(self, index: int, item) -> None:
        self._items.append(item)

    def _take(self):
        return self._items.popleft() if self._items else None

    def _set(self, index: int, ok: bool, value) -> None:
        with self._cond:
            self._store(index, (ok, value))
            self._cond.notify_all()

    def _set_length(self, chunks: int) -> None:
        with self._cond:
            self._expected = chunks
            self._cond.notify_all()

    def ready(self) -> bool:  # for the pool's bookkeeping
        return False

    def next(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._pending:
                if self._expected is not None and self._taken >= self._expected:
                    self._pool._jobs.pop(id(self), None)
                    raise StopIteration
                got = self._take()
                if got is not None:
                    ok, value = got
                    self._taken += 1
                    if not ok:
                        raise value
                    self._pending.extend(value)
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                self._cond.wait(left)
            return self._pending.popleft()

    __next__ = next


class _OrderedIter(IMapIterator):
    """``imap``: results in submission order."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self._items = {}

    def _store(self, index: int, item) -> None:
        self._items[index] = item

    def _take(self):
        return self._items.pop(self._taken, None)


# -- the pool ------------------------------------------------------------------------

class Pool:
    """A pool of worker processes with the API of ``multiprocessing.Pool``.

    Parameters
    ----------
    processes : int, optional
        Number of workers (default: the usable cores).
    initializer : callable, optional
        Called as ``initializer(*initargs)`` in each worker when it starts.
    initargs : tuple
    maxtasksperchild : int, optional
        Replace a worker after it has run this many tasks (batches).
    context : object, optional
        Accepted for compatibility and ignored: workers are always fresh
        interpreters (never forked), whatever the start method.

    Examples
    --------
    >>> import coremap as cm
    >>> with cm.Pool(2) as pool:
    ...     pool.map(abs, [-1, -2, 3])
    [1, 2, 3]
    """

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None) -> None:
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
        import cloudpickle

        self._init = (cloudpickle.dumps((initializer, tuple(initargs)))
                      if initializer is not None else None)
        self._maxtasks = maxtasksperchild
        self._state = RUN
        self._lock = threading.RLock()
        self._tasks: collections.deque = collections.deque()
        self._jobs: dict[int, object] = {}
        self._busy: dict = {}  # worker -> (task, result object, index, keepalive)
        self._counts: dict = {}
        self._workers: list = []
        self._wakeup_r, self._wakeup_w = _pipe()
        for _ in range(processes):
            self._workers.append(self._start_worker())
        self._handler = threading.Thread(target=self._handle, name="coremap-pool-handler",
                                         daemon=True)
        self._handler.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._wakeup_w)

    # -- workers ----------------------------------------------------------------------
    def _start_worker(self):
        from coremap.engines._processes import _Worker

        w = _Worker(len(self._workers))
        if self._init is not None:
            w.conn.send_bytes(pickle.dumps(InitSpec(None, self._init)))
        self._counts[w] = 0
        return w

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- submitting ----------------------------------------------------------------------
    def _submit(self, func, batches, result, mode: str = "map") -> None:
        """Pickle every batch now (so bad arguments raise here), then queue them."""
        import cloudpickle

        try:
            func_bytes = cloudpickle.dumps(func)
        except Exception as exc:
            raise TypeError(f"cannot send {func!r} to the pool's workers: {exc}") from exc
        key = hashlib.blake2b(func_bytes, digest_size=16).hexdigest()
        tasks = []
        for index, batch in batches:
            try:
                data, info, seg = dumps_shared(batch)
            except Exception as exc:
                raise TypeError(f"cannot send the arguments of task {index} to the pool's "
                                f"workers: {exc}") from exc
            keep = [seg] if seg is not None else []
            tasks.append((TaskSpec(None, func_bytes, key, data, info, mode, SHARE_BYTES),
                          result, index, keep))
        with self._lock:
            self._check_running()
            self._jobs[id(result)] = result
            self._tasks.extend(tasks)
        self._wake()

    def apply_async(self, func, args=(), kwds=None, callback=None, error_callback=None):
        self._check_running()
        result = AsyncResult(self, callback, error_callback)
        self._submit(func, [(0, [(tuple(args), dict(kwds or {}))])], result, mode="apply")
        return result

    def apply(self, func, args=(), kwds=None):
        return self.apply_async(func, args, kwds).get()

    def _batches(self, iterable, chunksize, star):
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), len(self._workers) * 4)
            if extra:
                chunksize += 1
        if len(items) == 0:
            return [], 0
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        batches = [(i, items[k:k + chunksize])
                   for i, k in enumerate(range(0, len(items), chunksize))]
        return batches, len(batches)

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, chunksize, callback, error_callback, False)

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None):
        return self._map_async(func, iterable, chunksize, callback, error_callback, True)

    def _map_async(self, func, iterable, chunksize, callback, error_callback, star):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        batches, n = self._batches(iterable, chunksize, star)
        result = MapResult(self, n, callback, error_callback)
        if n:
            self._submit(func, batches, result, mode="star" if star else "map")
        return result

    def map(self, func, iterable, chunksize=None):
        return self.map_async(func, iterable, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        return self.starmap_async(func, iterable, chunksize).get()

    def imap(self, func, iterable, chunksize=1):
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func, iterable, chunksize=1):
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func, iterable, chunksize, ordered):
        self._check_running()
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        it = (_OrderedIter if ordered else IMapIterator)(self)
        items, failure = [], None
        try:
            for item in iterable:  # consumed now; an error is raised in its place
                items.append(item)
        except Exception as exc:
            failure = exc
        batches, n = self._batches(items, chunksize, False) if items else ([], 0)
        if n:
            self._submit(func, batches, it)
        if failure is not None:
            it._set(n, False, failure)
            n += 1
        it._set_length(n)
        return it

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
        self._wake()

    def terminate(self) -> None:
        with self._lock:
            self._state = TERMINATE
        self._wake()
        if self._handler.is_alive() and threading.current_thread() is not self._handler:
            self._handler.join(10)
        self._finalizer()

    def join(self) -> None:
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if threading.current_thread() is self._handler:
            raise RuntimeError("cannot join the pool from its own callback")
        self._handler.join()
        self._finalizer()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<coremap.Pool state={self._state} pool_size={len(self._workers)}>"

    # -- the handler thread --------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wakeup_w.send_bytes(b"x")
        except OSError:
            pass

    def _handle(self) -> None:
        try:
            self._loop()
        finally:
            with self._lock:
                jobs = list(self._jobs.values())
                self._jobs.clear()
            for job in jobs:  # never leave a get() waiting on a pool that is gone
                job._set(10**9, False, RuntimeError("the pool was terminated before this "
                                                    "result was computed"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._state == TERMINATE:
                    return
                self._dispatch()
                if self._state == CLOSE and not self._tasks and not self._busy:
                    for w in self._workers:
                        _send_quietly(w, STOP)
                    return
                conns = {w.conn: w for w in self._busy}
                sentinels = {w.process.sentinel: w for w in self._workers}
            ready = wait([self._wakeup_r, *conns, *sentinels], timeout=0.5)
            for r in ready:
                if r is self._wakeup_r:
                    while self._wakeup_r.poll():
                        self._wakeup_r.recv_bytes()
                elif r in conns:
                    self._receive(conns[r])
            for r in ready:
                if r in sentinels:
                    self._reap(sentinels[r])

    def _dispatch(self) -> None:
        for w in self._workers:
            if not self._tasks:
                return
            if w in self._busy or not w.process.is_alive():
                continue
            spec, result, index, keep = task = self._tasks.popleft()
            if result.ready():
                continue  # its job already failed: skip the rest of it
            spec = spec._replace(task_id=(id(result), index))
            try:
                w.conn.send_bytes(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:
                self._tasks.appendleft(task)
                continue
            self._busy[w] = task

    def _receive(self, w) -> None:
        try:
            reply = pickle.loads(w.conn.recv_bytes())
        except (EOFError, OSError):
            return  # it died: its sentinel reports it
        except Exception as exc:  # a result that cannot be unpickled here
            with self._lock:
                task = self._busy.pop(w, None)
            if task is not None:
                task[1]._set(task[2], False, MaybeEncodingError(exc, "<result>"))
            return
        with self._lock:
            task = self._busy.pop(w, None)
            self._counts[w] = self._counts.get(w, 0) + 1
            retire = self._maxtasks is not None and self._counts[w] >= self._maxtasks
        if task is None:
            return
        _, result, index, keep = task
        if reply.kind == RESULT:
            try:
                values = loads_shared(*reply.value, unlink=True)
            except Exception as exc:
                result._set(index, False, MaybeEncodingError(exc, "<result>"))
            else:
                result._set(index, True, values)
        else:
            from coremap.engines._processes import rebuild_error

            result._set(index, False, rebuild_error(reply))
            if reply.error.exits:
                retire = True
        for seg in keep:  # argument segments: the worker is done with them
            seg.unlink()
        keep.clear()
        if retire:
            self._replace(w, graceful=True)

    def _reap(self, w) -> None:
        """A worker died: fail its task, start another (unless the pool is ending)."""
        if w.process.is_alive() or w not in self._workers:
            return
        with self._lock:
            task = self._busy.pop(w, None)
        if task is not None:
            code = w.process.exitcode
            how = _describe_exit(code)
            task[1]._set(task[2], False, WorkerCrashedError(
                f"pool worker {w.process.pid} died ({how}) while running task {task[2]}",
                pid=w.process.pid, exitcode=code))
        _shm.cleanup_stale()  # result segments it may have left behind
        self._replace(w, graceful=False)

    def _replace(self, w, graceful: bool) -> None:
        with self._lock:
            if w not in self._workers:
                return
            i = self._workers.index(w)
            if graceful:
                _send_quietly(w, STOP)
                w.process.join(2)
            w.kill()
            self._counts.pop(w, None)
            if self._state != TERMINATE:
                self._workers[i] = self._start_worker()


def _send_quietly(w, msg) -> None:
    try:
        w.conn.send_bytes(pickle.dumps(msg))
    except OSError:
        pass


def _describe_exit(code) -> str:
    import signal

    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _pipe():
    from multiprocessing import Pipe

    return Pipe(duplex=False)


def _shutdown(workers, wakeup_w) -> None:
    """Stop the workers (terminate, join, garbage collection and exit all end here)."""
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
