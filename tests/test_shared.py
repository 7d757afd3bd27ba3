"""SharedArray and its segments: pickled by name, zero copy, private, nothing leaked."""
from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import stat

import numpy as np
import pytest

import coremap as cm
from coremap import _shm


def _segments():
    return set(_shm.list_segments())


def test_create_attach_and_write_through():
    a = cm.SharedArray.zeros((3, 4))
    assert a.name.startswith("coremap_") and a.dtype == np.float64 and not a.any()
    b = pickle.loads(pickle.dumps(a))
    b[1, 2] = 5.0
    assert a[1, 2] == 5.0
    assert len(pickle.dumps(cm.SharedArray.zeros(10**6))) < 500  # by name, never by content
    a.unlink()


def test_views_pickle_as_views():
    a = cm.SharedArray.from_array(np.arange(24.0).reshape(4, 6))
    v = a[1:, ::-2].T
    w = pickle.loads(pickle.dumps(v))
    assert w.shape == v.shape and w.strides == v.strides
    np.testing.assert_array_equal(w, v)
    w[0, 0] = -1.0
    assert v[0, 0] == -1.0
    a.unlink()


def test_results_in_private_memory_are_plain_arrays():
    a = cm.SharedArray.from_array(np.arange(5.0))
    assert type(a + 1) is np.ndarray
    assert type(np.sin(a)) is np.ndarray
    assert isinstance(a.sum(), np.floating)
    assert type(a.copy()) is np.ndarray or a.copy().name is None
    assert type(a[1:]) is cm.SharedArray and a[1:].name == a.name
    p = pickle.loads(pickle.dumps(a + 1))
    np.testing.assert_array_equal(p, np.arange(5.0) + 1)
    a.unlink()


def test_fortran_order_and_dtypes():
    x = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    a = cm.SharedArray.from_array(x)
    assert a.flags.f_contiguous and a.dtype == np.int16
    np.testing.assert_array_equal(a, x)
    a.unlink()
    with pytest.raises(TypeError, match="object dtype"):
        cm.SharedArray.empty(3, dtype=object)
    with pytest.raises(ValueError, match="negative"):
        cm.SharedArray.empty((-1, 2))


def test_unlink_and_context_manager():
    before = _segments()
    with cm.SharedArray.zeros(100) as a:
        assert a.name in _segments()
        a[:] = 1
    assert _segments() == before
    assert a.sum() == 100  # the mapping outlives the name


def test_segment_freed_when_garbage():
    before = _segments()
    a = cm.SharedArray.zeros(1000)
    v = a[10:]
    del a
    assert len(_segments() - before) == 1  # a view still uses it
    del v
    import gc

    gc.collect()
    assert _segments() == before


def test_mode_0600_even_with_umask_000():
    old = os.umask(0)
    try:
        a = cm.SharedArray.zeros(10)
    finally:
        os.umask(old)
    mode = os.stat(f"/dev/shm/{a.name}").st_mode
    assert stat.S_IMODE(mode) == 0o600
    a.unlink()


def test_precreated_name_is_never_attached(monkeypatch):
    planted = f"coremap_{os.getpid()}_{'0' * 16}"
    fd = os.open(f"/dev/shm/{planted}", os.O_CREAT | os.O_RDWR, 0o644)
    os.close(fd)
    tokens = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(_shm.secrets, "token_hex", lambda n: next(tokens))
    try:
        a = cm.SharedArray.zeros(10)
        assert a.name == f"coremap_{os.getpid()}_{'1' * 16}"
        assert os.path.getsize(f"/dev/shm/{planted}") == 0  # untouched
        a.unlink()
    finally:
        os.unlink(f"/dev/shm/{planted}")


def test_full_shm_is_an_oserror_not_sigbus(monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = _segments()
    monkeypatch.setattr(_shm.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="not enough shared memory") as info:
        cm.SharedArray.zeros(10**6)
    assert info.value.errno == errno.ENOSPC
    assert _segments() == before  # nothing left behind


def test_lock_excludes_other_holders():
    a = cm.SharedArray.zeros(1)
    lock = a.lock
    assert lock.acquire()
    other = pickle.loads(pickle.dumps(a)).lock
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(other.acquire(timeout=0.2)))
    t.start()
    t.join(5)
    assert got == [False] and lock.locked()
    lock.release()
    assert other.acquire(block=False)
    other.release()
    with pytest.raises(ValueError, match="unlocked"):
        lock.release()
    a.unlink()


def _add_under_lock(arr, n):
    for _ in range(n):
        with arr.lock:
            arr[0] += 1


class _Writer(multiprocessing.Process):
    """A Process subclass writing into a SharedArray (the tutorial's pattern)."""

    def __init__(self, arr, k):
        super().__init__()
        self.arr = arr
        self.k = k

    def run(self):
        self.arr[self.k] = os.getpid()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_processes_see_the_same_memory(method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method}")
    ctx = multiprocessing.get_context(method)
    a = cm.SharedArray.zeros(4, dtype=np.int64)
    procs = [ctx.Process(target=_add_under_lock, args=(a[:1], 200)) for _ in range(2)]
    procs += [_Writer(a, 1)] if method == "fork" else []
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert a[0] == 400
    if method == "fork":
        assert a[1] == procs[-1].pid
        assert a.name in _segments()  # a forked child never unlinks its parent's segment
    a.unlink()


def _dead_pid():
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=os.getpid)
    p.start()
    p.join(30)
    return p.pid


def test_cleanup_stale_removes_only_dead_owners():
    dead = _dead_pid()
    stale = f"coremap_{dead}_{'a' * 16}"
    fd = os.open(f"/dev/shm/{stale}", os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    live = cm.SharedArray.zeros(10)
    removed = cm.cleanup_stale()
    assert stale in removed
    assert live.name in _segments()
    assert not os.path.exists(f"/dev/shm/{stale}")
    live.unlink()
