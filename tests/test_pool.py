"""coremap.Pool against multiprocessing.Pool: one suite run on both, then coremap's extras."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

import coremap as cm
from coremap import _shm

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
        with pytest.raises(TypeError, match="cannot send the arguments"):
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
