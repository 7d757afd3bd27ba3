"""coremap.Pool against multiprocessing.Pool: one suite run on both, then coremap's extras."""
from __future__ import annotations

import errno
import gc
import itertools
import multiprocessing
import multiprocessing.pool
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

import coremap as cm
from coremap import _shm
from coremap import pool as pool_module

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise KeyError(f"no {x}")
    return x


def slow(x):
    time.sleep(x)
    return x


def pid_of(_):
    return os.getpid()


_STATE = {}


def remember(value):
    _STATE["value"] = value


def recall(_):
    return _STATE.get("value")


@pytest.fixture(params=["multiprocessing", "coremap"])
def make_pool(request):
    pools = []

    def make(*args, **kwargs):
        if request.param == "multiprocessing":
            p = multiprocessing.get_context("forkserver").Pool(*args, **kwargs)
        else:
            p = cm.Pool(*args, **kwargs)
        pools.append(p)
        return p

    make.kind = request.param
    yield make
    for p in pools:
        p.terminate()
        p.join()


def test_map_and_friends(make_pool):
    with make_pool(2) as pool:
        assert pool.map(square, [0, 1, 2, 3, 4]) == [0, 1, 4, 9, 16]
        assert pool.map(square, range(100), chunksize=7) == [i * i for i in range(100)]
        assert pool.map(square, []) == []
        assert pool.map_async(square, range(10)).get(timeout=30) == [i * i for i in range(10)]
        assert [pool.apply_async(square, (i,)).get(timeout=30) for i in range(10)] == \
            [i * i for i in range(10)]
        assert pool.apply(add, (1, 2)) == 3
        assert pool.apply(add, (), {"a": 1, "b": 5}) == 6
        assert list(pool.imap(square, range(20), chunksize=3)) == [i * i for i in range(20)]
        assert sorted(pool.imap_unordered(square, range(20))) == [i * i for i in range(20)]
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.starmap_async(add, [(1, 2)]).get(timeout=30) == [3]


def test_exceptions_keep_their_type(make_pool):
    with make_pool(2) as pool:
        with pytest.raises(KeyError, match="no 3"):
            pool.map(fail_on_three, range(10))
        res = pool.apply_async(fail_on_three, (3,))
        with pytest.raises(KeyError):
            res.get(timeout=30)
        assert res.ready() and not res.successful()
        it = pool.imap(fail_on_three, range(6))
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError):
            next(it)
        assert pool.map(square, [2]) == [4]  # still usable


def test_callbacks(make_pool):
    got, errors = [], []
    done = threading.Event()
    with make_pool(2) as pool:
        pool.apply_async(square, (3,), callback=got.append).get(timeout=30)
        pool.map_async(square, [1, 2], callback=got.append).get(timeout=30)
        r = pool.apply_async(fail_on_three, (3,), error_callback=lambda e: (errors.append(e),
                                                                           done.set()))
        r.wait(30)
        done.wait(10)
    assert got == [9, [1, 4]]
    assert len(errors) == 1 and isinstance(errors[0], KeyError)


def test_async_result_protocol(make_pool):
    with make_pool(1) as pool:
        r = pool.apply_async(slow, (1.0,))
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.05)
        r.wait(0.01)
        assert not r.ready()
        assert r.get(timeout=30) == 1.0
        assert r.ready() and r.successful()
        it = pool.imap(slow, [0.5])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.05)
        assert it.next(timeout=30) == 0.5


def test_closed_and_terminated_pools(make_pool):
    pool = make_pool(2)
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.close()
    with pytest.raises(ValueError):
        pool.apply_async(square, (1,))
    with pytest.raises(ValueError):
        pool.map(square, [1])
    pool.join()
    pool2 = make_pool(1)
    pool2.terminate()
    with pytest.raises(ValueError):
        pool2.apply_async(square, (1,))
    pool2.join()
    with make_pool(1) as pool3:
        pass
    with pytest.raises(ValueError):
        pool3.map(square, [1])


def test_close_then_join_finishes_work(make_pool):
    pool = make_pool(2)
    r = pool.map_async(slow, [0.1] * 4)
    pool.close()
    pool.join()
    assert r.get(timeout=1) == [0.1] * 4


def test_initializer_and_maxtasksperchild(make_pool):
    with make_pool(2, initializer=remember, initargs=("hello",)) as pool:
        assert pool.map(recall, range(4)) == ["hello"] * 4
    with make_pool(1, maxtasksperchild=1) as pool:
        pids = pool.map(pid_of, range(4), chunksize=1)
    assert len(set(pids)) == 4


def test_bad_arguments(make_pool):
    with pytest.raises(ValueError):
        make_pool(0)
    with pytest.raises(TypeError):
        make_pool(1, initializer=3)
    with pytest.raises(ValueError):
        make_pool(1, maxtasksperchild=0)
    with make_pool(1) as pool:
        with pytest.raises(ValueError):
            pool.imap(square, [1, 2], chunksize=0)
        if make_pool.kind == "coremap":  # multiprocessing returns [None, None] here
            with pytest.raises(ValueError, match="Chunksize must be 1"):
                pool.map(square, [1, 2], chunksize=0)


def _gen(k):
    for i in range(10):
        if i == k:
            raise ZeroDivisionError("iterable broke")
        yield i


def test_imap_iterable_that_raises(make_pool):
    with make_pool(2) as pool:
        it = pool.imap(square, _gen(4))
        assert [next(it) for _ in range(4)] == [0, 1, 4, 9]
        with pytest.raises(ZeroDivisionError):
            next(it)
        assert pool.map(square, [3]) == [9]


def test_imap_consumes_its_iterable_lazily(make_pool):
    pulled = []

    def counting():
        for i in itertools.count():
            pulled.append(i)
            yield i

    with make_pool(2) as pool:
        it = pool.imap(square, itertools.count())
        assert [it.next(timeout=30) for _ in range(5)] == [0, 1, 4, 9, 16]
        pool.terminate()  # an endless job holds the pool (as in multiprocessing)
    with make_pool(2) as pool:
        it = pool.imap_unordered(square, counting(), chunksize=3)
        got = {next(it) for _ in range(6)}
        assert len(got) == 6 and all(round(v ** 0.5) ** 2 == v for v in got)
        # bounded read-ahead (multiprocessing: what its pipe holds), never the whole stream
        assert len(pulled) < 10**6
        pool.terminate()


def test_imap_unordered_iterable_that_raises(make_pool):
    with make_pool(2) as pool:
        it = pool.imap_unordered(square, _gen(4))
        got = []
        with pytest.raises(ZeroDivisionError):
            for _ in range(10):
                got.append(it.next(timeout=30))
        assert set(got) <= {0, 1, 4, 9}  # unordered: the error may overtake results
        assert pool.map(square, [3]) == [9]


class NoPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_pickling_error_keeps_its_type(make_pool):
    with make_pool(2) as pool:
        with pytest.raises(RuntimeError, match="cannot pickle"):
            pool.map(square, [NoPickle()] * 10)
        assert pool.map(square, [2]) == [4]


_MODULE_LOCK = threading.Lock()


class Locked:
    """cloudpickle ships ``Locked.square`` by value (a classmethod's function is not
    found by its qualified name), and by value it needs the module's lock."""

    @classmethod
    def square(cls, x):
        with _MODULE_LOCK:
            return x * x


def test_function_importable_by_reference(make_pool):
    with make_pool(1) as pool:
        assert pool.map(Locked.square, [1, 2, 3]) == [1, 4, 9]
        assert pool.apply(Locked.square, (4,)) == 16


def test_remote_traceback_is_the_cause(make_pool):
    with make_pool(1) as pool:
        with pytest.raises(KeyError) as info:
            pool.apply(fail_on_three, (3,))
    cause = info.value.__cause__
    assert type(cause) is multiprocessing.pool.RemoteTraceback
    assert "fail_on_three" in cause.tb and 'raise KeyError(f"no {x}")' in cause.tb


def test_worker_list(make_pool):
    pool = make_pool(3)
    assert len(pool._pool) == 3
    assert all(w.pid and w.is_alive() for w in pool._pool)
    pool.close()
    pool.join()


@pytest.mark.parametrize("kind", ["multiprocessing", "coremap"])
def test_resource_warning_when_a_running_pool_is_collected(kind):
    pool = (multiprocessing.get_context("forkserver").Pool(1) if kind == "multiprocessing"
            else cm.Pool(1))
    pool.terminate()
    pool.join()
    pool._state = multiprocessing.pool.RUN  # as CPython's test does
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del pool
        gc.collect()


# -- what only coremap.Pool does ------------------------------------------------------

def test_lambdas_and_closures():
    k = 3
    with cm.Pool(2) as pool:
        assert pool.map(lambda x: x * k, [1, 2]) == [3, 6]


def test_worker_killed_during_map_raises_instead_of_hanging():
    with cm.Pool(2) as pool:
        pids = set(pool.map(pid_of, range(8), chunksize=1))

        def killer():
            time.sleep(0.5)
            os.kill(sorted(pids)[0], signal.SIGKILL)

        threading.Thread(target=killer).start()
        t = time.perf_counter()
        with pytest.raises(cm.WorkerCrashedError, match="SIGKILL"):
            pool.map(slow, [0.3] * 20, chunksize=1)
        assert time.perf_counter() - t < 6.0
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_stopped_worker_is_a_crash_and_replaced():
    """Item 9: a worker SIGSTOPped while it runs a task would hang that task (as in
    multiprocessing and loky): it is a WorkerCrashedError once stopped for
    STOPPED_GRACE, the worker is killed and replaced, and the pool goes on."""
    from coremap.engines._processes import STOPPED_GRACE

    with cm.Pool(2) as pool:
        proc = pool._pool[0]
        victim = proc.pid
        started = pool.apply_async(slow, (0.2,))  # both workers warm and idle
        assert started.get(10) == 0.2
        pending = [pool.apply_async(slow, (0.5,)) for _ in range(2)]
        time.sleep(0.1)  # each worker holds one of them
        os.kill(victim, signal.SIGSTOP)
        try:
            t = time.perf_counter()
            outcomes = []
            for r in pending:
                try:
                    outcomes.append(r.get(STOPPED_GRACE + 6.0))
                except cm.WorkerCrashedError as exc:
                    outcomes.append(exc)
            assert time.perf_counter() - t < STOPPED_GRACE + 6.0
            crashes = [o for o in outcomes if isinstance(o, cm.WorkerCrashedError)]
            assert len(crashes) == 1 and 0.5 in outcomes
            assert crashes[0].pid == victim and "stopped" in str(crashes[0])
            deadline = time.monotonic() + 5.0
            while victim in [p.pid for p in pool._pool] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert victim not in [p.pid for p in pool._pool]
        finally:
            if proc.is_alive():  # never leave it behind, stopped (poll: never a reused pid)
                os.kill(victim, signal.SIGCONT)
                proc.kill()
                proc.join(5)
        assert pool.map(square, range(5), chunksize=1) == [0, 1, 4, 9, 16]
        assert len(pool._pool) == 2


def test_stopped_idle_worker_gets_no_task_and_is_replaced():
    """A worker stopped while idle: tasks go to the others (none fails), and it is
    replaced once stopped for STOPPED_GRACE."""
    from coremap.engines._processes import STOPPED_GRACE

    with cm.Pool(2) as pool:
        proc = pool._pool[0]
        assert pool.map(square, range(4), chunksize=1) == [0, 1, 4, 9]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(1.2)  # the handler checks twice a second
            assert pool.map(square, range(6), chunksize=1) == [0, 1, 4, 9, 16, 25]
            deadline = time.monotonic() + STOPPED_GRACE + 5.0
            while proc.pid in [p.pid for p in pool._pool] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.pid not in [p.pid for p in pool._pool]
        finally:
            if proc.is_alive():  # never leave it behind, stopped
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.join(5)
        assert pool.map(square, range(4), chunksize=1) == [0, 1, 4, 9]


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable(x):
    raise Unpicklable("no pickle")


def test_unpicklable_exception_is_reported_not_hung():
    with cm.Pool(2) as pool:
        for _ in range(20):
            with pytest.raises(cm.RemoteError, match="Unpicklable"):
                pool.apply(raise_unpicklable, (1,))
        assert pool.map(square, range(3)) == [0, 1, 4]


def test_unpicklable_argument_fails_at_submit():
    with cm.Pool(1) as pool:
        with pytest.raises(TypeError, match="cannot pickle"):
            pool.apply_async(square, (threading.Lock(),))
        assert pool.apply(square, (2,)) == 4


def test_exit_in_task_replaces_worker():
    with cm.Pool(1) as pool:
        with pytest.raises(cm.RemoteError, match="SystemExit"):
            pool.apply(os.sys.exit, (3,))
        assert pool.apply(square, (5,)) == 25


def test_large_arrays_travel_through_shared_memory():
    arrays = [np.random.default_rng(i).random(10**6) for i in range(4)]
    before = set(_shm.list_segments())
    with cm.Pool(2) as pool:
        out = pool.map(np.sqrt, arrays)
        small = pool.map(np.sqrt, [np.arange(4.0)])
    for a, b in zip(arrays, out):
        np.testing.assert_array_equal(np.sqrt(a), b)
        assert isinstance(b.base, type(b.base)) and b.flags.writeable
    np.testing.assert_array_equal(small[0], np.sqrt(np.arange(4.0)))
    assert set(_shm.list_segments()) <= before
    out[0][:] = 0  # the result owns a live mapping
    assert out[0].sum() == 0


def test_terminate_fails_outstanding_results():
    pool = cm.Pool(1)
    r = pool.apply_async(slow, (30,))
    time.sleep(0.2)
    pool.terminate()
    with pytest.raises(RuntimeError, match="terminated"):
        r.get(timeout=10)
    pool.join()


def bad_init():
    raise ValueError("init broke")


def test_raising_initializer_breaks_the_pool_and_shifts_nothing():
    with cm.Pool(1, initializer=bad_init) as pool:
        results = [pool.apply_async(square, (i,)) for i in range(6)]
        for r in results:
            with pytest.raises(BrokenProcessPool,
                               match="initializer bad_init.*ValueError.*init broke") as info:
                r.get(timeout=30)
            assert isinstance(info.value.__cause__, ValueError)
        with pytest.raises(BrokenProcessPool, match="bad_init"):
            pool.map(square, range(3))
        it = pool.imap(square, range(3))
        with pytest.raises(BrokenProcessPool, match="bad_init"):
            it.next(timeout=30)
    with cm.Pool(2, initializer=bad_init) as pool:
        with pytest.raises(BrokenProcessPool, match="bad_init"):
            pool.map(square, range(100), chunksize=1)


def test_reply_for_another_task_is_a_protocol_error(monkeypatch):
    real = pool_module.Pool._message

    def wrong_id(self, task, w):
        return real(self, task, w)._replace(task_id=(-1, 0))

    with cm.Pool(1) as pool:
        monkeypatch.setattr(pool_module.Pool, "_message", wrong_id)
        with pytest.raises(RuntimeError, match="protocol error.*task"):
            pool.apply(square, (3,), )
        monkeypatch.setattr(pool_module.Pool, "_message", real)
        assert [pool.apply(square, (i,)) for i in range(4)] == [0, 1, 4, 9]


def test_raising_callbacks_are_reported_and_the_pool_goes_on(monkeypatch):
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def bad(_):
        raise OSError("callback broke")

    with cm.Pool(2) as pool:
        assert pool.apply_async(square, (3,), callback=bad).get(timeout=30) == 9
        r = pool.apply_async(fail_on_three, (3,), error_callback=bad)
        with pytest.raises(KeyError):
            r.get(timeout=30)
        assert pool.map_async(square, [1, 2], callback=bad).get(timeout=30) == [1, 4]
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
    assert [str(e) for e in seen] == ["callback broke"] * 3


def test_worker_dead_before_its_first_message_is_replaced(monkeypatch):
    from coremap.engines import _processes

    real = _processes._Worker
    killed = []

    class DiesAtStart(real):
        __slots__ = ()

        def __init__(self, index):
            super().__init__(index)
            if not killed:  # the first worker dies before the pool sends it anything
                killed.append(self.process.pid)
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.join(10)

    monkeypatch.setattr(_processes, "_Worker", DiesAtStart)
    with cm.Pool(1, initializer=remember, initargs=("hello",)) as pool:
        assert pool.map(recall, range(3)) == ["hello"] * 3
    assert killed


def _limited_create(limit):
    real = _shm.Segment.create

    def create(nbytes):
        mine = [n for n in _shm.list_segments() if n.startswith(f"coremap_{os.getpid()}_")]
        if len(mine) >= limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(nbytes)

    return create


def test_map_stages_batches_as_they_are_sent(monkeypatch):
    monkeypatch.setattr(_shm.Segment, "create", _limited_create(1))
    big = [np.full(10**5, float(i)) for i in range(5)]
    with cm.Pool(1) as pool:
        out = pool.map(np.negative, big, chunksize=1)  # no warning: one segment at a time
    for a, b in zip(big, out):
        np.testing.assert_array_equal(b, -a)


def test_full_shared_memory_falls_back_to_the_pipe(monkeypatch):
    monkeypatch.setattr(_shm.Segment, "create", _limited_create(0))
    monkeypatch.setattr(pool_module, "_warned_full", False)
    big = np.arange(10**6, dtype=float)
    with cm.Pool(1) as pool:
        with pytest.warns(RuntimeWarning, match="shared memory"):
            np.testing.assert_array_equal(pool.apply(np.negative, (big,)), -big)
        out = pool.map(np.negative, [big] * 3, chunksize=1)  # warned once only
    for b in out:
        np.testing.assert_array_equal(b, -big)
    # the worker's side: results that do not fit go back through the pipe
    from coremap.engines import _transport

    data, info = _transport.export_results([big], pool_module.SHARE_BYTES)
    assert info is None
    np.testing.assert_array_equal(_transport.loads_shared(data, info)[0], big)


def test_temporary_shared_array_lives_until_its_task_is_done():
    with cm.Pool(1) as pool:
        blocker = pool.apply_async(slow, (0.5,))
        r = pool.apply_async(np.sum, (cm.SharedArray.from_array(np.arange(10.0)),))
        gc.collect()
        assert r.get(timeout=30) == 45.0
        assert blocker.get(timeout=30) == 0.5


def test_a_running_pool_dropped_unclosed_is_collected_and_stopped():
    pool = cm.Pool(2)
    assert pool.map(square, [1, 2]) == [1, 4]
    procs, handler = pool._pool, pool._handler
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del pool
        gc.collect()
        handler.join(10)  # it lets go of the pool between steps
    assert not handler.is_alive()
    for p in procs:
        p.join(10)
        assert not p.is_alive()


def test_a_failed_start_leaves_no_worker_behind(monkeypatch):
    from coremap.engines import _processes

    real = _processes._Worker
    started = []

    def second_fails(index):
        if started:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        started.append(real(index))
        return started[-1]

    monkeypatch.setattr(_processes, "_Worker", second_fails)
    with pytest.raises(BlockingIOError):
        cm.Pool(2)
    started[0].process.join(10)
    assert not started[0].process.is_alive()


def test_a_slow_imap_input_does_not_block_submitting():
    entered, release = threading.Event(), threading.Event()

    def slow_input():
        yield 1
        entered.set()
        release.wait(30)  # the pool's thread is reading this input meanwhile
        yield 2

    with cm.Pool(2) as pool:
        it = pool.imap(square, slow_input())
        assert entered.wait(30)
        submitted = []
        t = threading.Thread(target=lambda: submitted.append(pool.apply_async(square, (3,))))
        t.start()
        t.join(10)
        done = not t.is_alive()
        release.set()
        t.join(30)
        assert done, "apply_async waited for the imap input"
        assert submitted[0].get(timeout=30) == 9
        assert list(it) == [1, 4]
