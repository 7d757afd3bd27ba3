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
    # this process's segments: coremap processes running beside the suite have their own
    return {n for n in _shm.list_segments() if _shm.creator_pid(n) == os.getpid()}


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
    tag = _shm.namespace_tag()
    planted = f"coremap_{os.getpid()}_{tag}_{'a' * 9}"
    fd = os.open(f"/dev/shm/{planted}", os.O_CREAT | os.O_RDWR, 0o644)
    os.close(fd)
    tokens = iter(["a" * 9, "b" * 9])
    monkeypatch.setattr(_shm, "_random_part", lambda: next(tokens))
    try:
        a = cm.SharedArray.zeros(10)
        assert a.name == f"coremap_{os.getpid()}_{tag}_{'b' * 9}"
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


def _plant(name):
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    return name


def _stale_name(pid, tag=None):
    return f"coremap_{pid}_{tag or _shm.namespace_tag()}_{_shm._random_part()}"


def test_cleanup_stale_removes_only_dead_owners():
    dead = _dead_pid()
    stale = _plant(_stale_name(dead))
    live = cm.SharedArray.zeros(10)
    removed = cm.cleanup_stale()
    assert stale in removed
    assert live.name in _segments()
    assert not os.path.exists(f"/dev/shm/{stale}")
    live.unlink()


@pytest.mark.parametrize("pid", [1, 4_194_303])  # pid_max is at most 2**22
def test_names_fit_the_macos_limit(pid, monkeypatch):
    """macOS refuses POSIX shared-memory names over 31 characters, "/" included."""
    monkeypatch.setattr(_shm.os, "getpid", lambda: pid)
    names = {_shm.new_name() for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert len("/" + name) <= 31 and _shm.parse_name(name) == (pid, _shm.namespace_tag())
    monkeypatch.undo()
    a = cm.SharedArray.zeros(3)
    assert len("/" + a.name) <= 31 and _shm.creator_pid(a.name) == os.getpid()
    a.unlink()


def test_cleanup_never_judges_another_namespace():
    """A pid from another pid namespace (or boot) means nothing here: never cleaned."""
    dead = _dead_pid()
    ours = _shm.namespace_tag()
    other = next(t for t in ("aaaa", "bbbb") if t != ours)
    foreign = _plant(_stale_name(dead, other))
    old_format = _plant(f"coremap_{dead}_{'c' * 16}")
    try:
        removed = cm.cleanup_stale()
        assert foreign not in removed and old_format not in removed
        assert os.path.exists(f"/dev/shm/{foreign}") and os.path.exists(f"/dev/shm/{old_format}")
    finally:
        os.unlink(f"/dev/shm/{foreign}")
        os.unlink(f"/dev/shm/{old_format}")


def test_cleanup_never_removes_a_held_segment():
    """A live owner holds its segment's lock: even a pid that looks dead keeps it."""
    import fcntl

    stale = _plant(_stale_name(_dead_pid()))
    fd = os.open(f"/dev/shm/{stale}", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as the owner would, from another namespace
        assert stale not in cm.cleanup_stale()
        assert os.path.exists(f"/dev/shm/{stale}")
    finally:
        os.close(fd)
    assert stale in cm.cleanup_stale()  # released: an orphan now


def _unshare_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.timeout(60)
def test_live_segment_in_another_pid_namespace_survives(monkeypatch):
    """Issue: a container with --ipc=host shares /dev/shm, not pids."""
    import subprocess
    import sys

    if not _unshare_works():
        pytest.skip("needs unshare --pid (root or user namespaces)")
    code = ("import sys, coremap as cm; a = cm.SharedArray.zeros(10); "
            "print(a.name, flush=True); sys.stdin.read(); a.unlink()")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith("coremap_"), name
        # its pid means nothing here: say it looks dead, as it may
        monkeypatch.setattr(_shm, "_pid_alive", lambda pid: False)
        assert name not in cm.cleanup_stale()
        assert name in _shm.list_segments()
    finally:
        proc.communicate("", timeout=30)
    assert name not in _shm.list_segments()  # its owner unlinked it


def test_unremovable_stale_segment_is_skipped(monkeypatch):
    """Another user's stale segment (sticky /dev/shm: PermissionError) breaks nothing."""
    stale = _plant(_stale_name(_dead_pid()))
    path = f"/dev/shm/{stale}"

    def refuse(target, *args, **kwargs):
        if stale in str(target):
            raise PermissionError(1, "Operation not permitted", target)
        return real_unlink(target, *args, **kwargs)

    real_unlink, real_shm_unlink = os.unlink, _shm._posixshmem.shm_unlink
    monkeypatch.setattr(_shm.os, "unlink", refuse)
    monkeypatch.setattr(_shm._posixshmem, "shm_unlink",
                        lambda n: refuse(n) if stale in n else real_shm_unlink(n))
    try:
        assert stale not in cm.cleanup_stale()  # no PermissionError
        from coremap.engines._processes import ProcessEngine

        engine = ProcessEngine()  # a fresh engine cleans at its first start
        try:
            engine.prepare(1)
        finally:
            engine.shutdown()
    finally:
        monkeypatch.undo()
        os.unlink(path)


def test_creation_never_waits_on_a_cleaner(monkeypatch):
    """A name whose lock a cleaner took first is dropped, and another name is taken."""
    import fcntl

    tokens = iter(["c" * 9, "d" * 9])
    monkeypatch.setattr(_shm, "_random_part", lambda: next(tokens))
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_flock(fd, op)

    monkeypatch.setattr(_shm.fcntl, "flock", flock)
    a = cm.SharedArray.zeros(10)
    tag = _shm.namespace_tag()
    assert a.name == f"coremap_{os.getpid()}_{tag}_{'d' * 9}"
    assert f"coremap_{os.getpid()}_{tag}_{'c' * 9}" not in _segments()
    assert calls[0] & fcntl.LOCK_NB  # never a blocking wait
    a.unlink()


def test_an_orphaned_worker_removes_the_segments_of_its_unreaped_parent():
    """A worker re-parented by its parent's SIGKILL runs while the dead parent may
    still be a zombie (its own parent has not reaped it): ``kill(pid, 0)`` says alive.
    The worker knows better, and removes what the parent left."""
    import time

    pid = os.fork()
    if pid == 0:  # the "parent" that dies: a segment, then exit without finalizers
        kept = cm.SharedArray.zeros(10)
        os._exit(0 if kept.size == 10 else 1)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until it is a zombie (exited, not reaped)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        left = {n for n in _shm.list_segments() if _shm.parse_name(n)[0] == pid}
        assert len(left) == 1
        assert _shm.clean(creators={pid}) == []  # a zombie looks alive
        assert set(_shm.clean(creators={pid}, dead={pid})) == left
        assert not {n for n in _shm.list_segments() if _shm.parse_name(n)[0] == pid}
    finally:
        os.waitpid(pid, 0)
