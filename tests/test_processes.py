"""The process engine: results against the serial engine, and the fault bar of RELIABILITY.md."""
from __future__ import annotations

import ctypes
import decimal
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from helpers import same_bits

import coremap as cm
from coremap import _shm
from coremap.engines._processes import process_engine

pytestmark = pytest.mark.timeout(60)


def dec2(v):
    """A function Numba cannot compile."""
    return float(decimal.Decimal(v) * 2)


def poly(v):
    return v * v + 1.0


@pytest.fixture
def engine():
    return process_engine()


def _segments(pid=None):
    """The segments created by ``pid`` (this process by default): coremap processes
    running beside the suite have their own."""
    pid = os.getpid() if pid is None else pid
    return {n for n in _shm.list_segments() if _shm.creator_pid(n) == pid}


# -- results ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "func, vectorized",
    [(dec2, False), (poly, False), (np.sqrt, False), (lambda c: c * 2.5, True),
     (cm.kernels.affine(2.0, 1.0), False)],
)
@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative"])
def test_matches_serial(func, vectorized, layout):
    x = np.abs(np.random.default_rng(0).standard_normal((60, 50)))
    x = {"C": x, "F": np.asfortranarray(x), "strided": x[::2, 1::3], "negative": x[::-1]}[layout]
    want = cm.parallel_map(x, func, vectorized=vectorized, backend="serial")
    got = cm.parallel_map(x, func, vectorized=vectorized, backend="processes", workers=2,
                          chunk_size=97)
    assert same_bits(got, want)


def test_broadcast_scalars_and_out():
    a = np.random.default_rng(1).random((40, 1))
    b = np.random.default_rng(2).random((1, 30))

    def g(u, v, k):
        return float(decimal.Decimal(u) + decimal.Decimal(v)) * k

    want = cm.parallel_map((a, b, 3), g, backend="serial")
    out = np.empty((40, 30))
    got = cm.parallel_map((a, b, 3), g, backend="processes", out=out)
    assert got is out and same_bits(out, want)


def _watch_calls(engine, monkeypatch):
    """The pooled segments a call takes (shapes) and the operands' segment names it sends."""
    taken, sent = [], []
    take, run = engine.segment_array, engine.run

    def counting_take(shape, dtype, order="C"):
        taken.append(tuple(shape))
        return take(shape, dtype, order=order)

    def recording_run(spec, *args, **kwargs):
        sent.append([None if v is None else v[0] for v in spec.views])
        return run(spec, *args, **kwargs)

    monkeypatch.setattr(engine, "segment_array", counting_take)
    monkeypatch.setattr(engine, "run", recording_run)
    return taken, sent


def test_shared_array_in_and_out_zero_copy(engine, monkeypatch):
    x = cm.SharedArray.from_array(np.random.default_rng(0).random(10**5))
    out = cm.SharedArray.zeros(10**5)
    try:
        cm.parallel_map(x, dec2, out=out, backend="processes")  # the dtype probe
        taken, sent = _watch_calls(engine, monkeypatch)
        res = cm.parallel_map(x, dec2, out=out, backend="processes")
        assert res is out
        np.testing.assert_allclose(out, 2 * x)
        # the workers attach the caller's own segments by name: nothing is copied
        assert taken == []
        assert sent == [[x._segment.name, out._segment.name]]
    finally:
        x.unlink()
        out.unlink()


@pytest.mark.parametrize("part", ["whole", "view", "broadcast"])
def test_shared_input_is_attached_not_copied(part, engine, monkeypatch):
    rng = np.random.default_rng(1)
    x = cm.SharedArray.from_array(rng.random((300, 200)))
    col = cm.SharedArray.from_array(rng.random((300, 1)))
    out = cm.SharedArray.zeros(x.shape)
    try:
        arg, other = {"whole": (x, col), "view": (x[1::2, ::3], col[1::2]),
                      "broadcast": (x[0], col)}[part]
        res = out[: len(other), : arg.shape[-1]]
        taken, sent = _watch_calls(engine, monkeypatch)
        cm.parallel_map((arg, other), np.add, out=res, backend="processes")
        np.testing.assert_array_equal(res, np.add(arg, other))
        assert taken == []  # no operand copied into a pooled segment
        assert sent == [[x._segment.name, col._segment.name, out._segment.name]]
    finally:
        for a in (x, col, out):
            a.unlink()


def test_no_array_bytes_are_pickled(engine):
    def add1(c):
        return c + 1.0

    x = np.random.default_rng(0).random(10**7)
    cm.parallel_map(x, add1, vectorized=True, backend="processes")
    sent = engine.last_bytes_sent
    workers = cm.explain(x, add1, vectorized=True, backend="processes").workers
    # one small message per worker (function, names, offsets), whatever the core count
    assert sent < 4_000 * workers, (sent, workers)
    cm.parallel_map(x[:100_000], add1, vectorized=True, backend="processes")
    assert abs(engine.last_bytes_sent - sent) < 100 * workers  # not proportional to the data


def test_auto_sends_uncompilable_functions_to_processes():
    x = np.random.default_rng(0).random(300_000)
    with pytest.warns(cm.CoremapWarning, match="worker processes"):
        got = cm.parallel_map(x, dec2)
    np.testing.assert_allclose(got, 2 * x)
    plan = cm.explain(x, dec2)
    assert plan.engine == "processes" and "Numba could not compile" in str(plan)


def test_auto_keeps_tiny_uncompilable_calls_serial():
    x = np.arange(50.0)
    with pytest.warns(cm.CoremapWarning):
        got = cm.parallel_map(x, dec2)
    np.testing.assert_array_equal(got, 2 * x)


def test_nested_call_in_worker_runs_serially():
    def inner(c):
        return cm.parallel_map(c, dec2, backend="processes")

    x = np.arange(2000.0)
    got = cm.parallel_map(x, inner, vectorized=True, backend="processes", workers=2)
    np.testing.assert_array_equal(got, 2 * x)


# -- failures ---------------------------------------------------------------------------

class Boom(Exception):
    pass


def raises_at(v):
    if v == 1234.0:
        raise Boom(f"bad element {v}")
    return float(decimal.Decimal(v))


def test_exception_type_cause_and_index(engine):
    x = np.arange(5000.0)
    with pytest.raises(Boom, match="bad element 1234") as info:
        cm.parallel_map(x, raises_at, backend="processes", workers=2)
    cause = info.value.__cause__
    assert cause is not None and "raises_at" in str(cause) and "Traceback" in str(cause)
    if sys.version_info >= (3, 11):
        assert any("(1234,)" in n for n in info.value.__notes__)
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes"), 2 * x)


def test_exception_returns_fast_while_other_chunks_sleep(engine):
    def slow_or_fail(c):
        if c[0] == 0:
            raise Boom("first chunk")
        time.sleep(10)
        return c

    x = np.arange(101 * 100.0)
    t = time.perf_counter()
    with pytest.raises(Boom):
        cm.parallel_map(x, slow_or_fail, vectorized=True, backend="processes", workers=2,
                        schedule="dynamic", chunk_size=100)
    assert time.perf_counter() - t < 5.0


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = __import__("threading").Lock()


class Unbuildable(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from args
        super().__init__(f"{a}-{b}")


def raise_unpicklable(v):
    if v == 3.0:
        raise Unpicklable("cannot pickle me")
    return float(decimal.Decimal(v))


def raise_unbuildable(v):
    if v == 3.0:
        raise Unbuildable(1, 2)
    return float(decimal.Decimal(v))


@pytest.mark.parametrize("func, name", [(raise_unpicklable, "Unpicklable"),
                                        (raise_unbuildable, "Unbuildable")])
def test_exceptions_that_do_not_travel(func, name, engine):
    x = np.arange(100.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    pids = engine.pids()
    for _ in range(20):
        with pytest.raises(cm.RemoteError) as info:
            cm.parallel_map(x, func, backend="processes", workers=2)
        assert name in info.value.type_name and "Traceback" in info.value.traceback
    assert engine.pids() == pids  # the workers survived
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes"), 2 * x)


def test_unpicklable_function_fails_before_dispatch(engine):
    import threading

    lock = threading.Lock()
    x = np.arange(100.0)
    before = engine.last_bytes_sent

    def uses_lock(v):
        with lock:
            return float(decimal.Decimal(v))

    with pytest.raises(TypeError, match="cannot send .*uses_lock to worker processes"):
        cm.parallel_map(x, uses_lock, backend="processes")
    assert engine.last_bytes_sent == before


def exit_in(v):
    if v == 3.0:
        sys.exit(7)
    return float(decimal.Decimal(v))


def interrupt_in(v):
    if v == 3.0:
        raise KeyboardInterrupt
    return float(decimal.Decimal(v))


@pytest.mark.parametrize("func, name", [(exit_in, "SystemExit"),
                                        (interrupt_in, "KeyboardInterrupt")])
def test_exit_and_interrupt_inside_function(func, name, engine):
    x = np.arange(100.0)
    with pytest.raises(cm.RemoteError, match=name):
        cm.parallel_map(x, func, backend="processes", workers=2)
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes"), 2 * x)


def kill_self(v):
    if v == 500.0:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(decimal.Decimal(v))


def segfault(v):
    if v == 500.0:
        ctypes.string_at(0)
    return float(decimal.Decimal(v))


def hard_exit(v):
    if v == 500.0:
        os._exit(3)
    return float(decimal.Decimal(v))


@pytest.mark.parametrize("func, how", [(kill_self, "SIGKILL"), (segfault, "SIGSEGV"),
                                       (hard_exit, "exit code 3")])
def test_worker_death_is_an_error_then_recovery(func, how, engine):
    x = np.arange(2000.0)
    before = _segments()
    t = time.perf_counter()
    with pytest.raises(cm.WorkerCrashedError, match=how) as info:
        cm.parallel_map(x, func, backend="processes", workers=2, chunk_size=100)
    assert time.perf_counter() - t < 5.0
    err = info.value
    assert err.pid and err.chunk is not None and err.chunk[0] <= 500 < err.chunk[1]
    assert "(500,)" in str(err) or f"({err.chunk[0]},)" in str(err)
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes", workers=2),
                                  2 * x)
    assert _segments() <= before


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_every_worker_killed_at_once(workers, engine):
    x = np.arange(50_000.0)
    cm.parallel_map(x[:10], dec2, backend="processes", workers=workers)

    victims = engine.pids()[:workers]

    def killer():
        time.sleep(0.3)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    import threading

    t = threading.Thread(target=killer)
    t.start()

    def slow(v):
        time.sleep(0.001)
        return v

    with pytest.raises(cm.WorkerCrashedError):
        cm.parallel_map(x, slow, backend="processes", workers=workers)
    t.join(10)
    # the call may end on the first death it sees, before the killer's last kill lands
    assert _wait_gone(victims, 5.0)
    np.testing.assert_array_equal(cm.parallel_map(x[:100], dec2, backend="processes",
                                                  workers=workers), 2 * x[:100])


def test_timeout_names_chunk_and_replaces_worker(engine):
    def hang(c):
        if c[0] == 0:
            time.sleep(60)
        return c

    x = np.arange(10_000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    pids = set(engine.pids())
    t = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not finish within 1.0 s") as info:
        cm.parallel_map(x, hang, vectorized=True, backend="processes", workers=2,
                        chunk_size=1000, timeout=1.0)
    assert time.perf_counter() - t < 1.0 + 1.5
    assert "chunk of elements (0,)" in str(info.value)
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes", workers=2),
                                  2 * x)
    assert set(engine.pids()) != pids  # the stuck worker was replaced


def test_timeout_on_threads():
    def slow(c):
        time.sleep(0.2)
        return c

    with pytest.raises(TimeoutError, match="did not finish"):
        cm.parallel_map(np.arange(20_000.0), slow, vectorized=True, backend="threads",
                        workers=2, chunk_size=1000, timeout=0.5)


def test_ten_threads_share_the_engine():
    import concurrent.futures

    x = np.arange(3000.0)
    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        results = list(ex.map(lambda k: cm.parallel_map(x + k, dec2, backend="processes"),
                              range(10)))
    for k, r in enumerate(results):
        np.testing.assert_array_equal(r, 2 * (x + k))


def test_no_listening_tcp_socket(engine):
    cm.parallel_map(np.arange(100.0), dec2, backend="processes", workers=2)
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if parts[3] == "0A":  # LISTEN
                        listening.add(parts[9])
        except FileNotFoundError:
            pass
    ours = set()
    for pid in [os.getpid(), *engine.pids()]:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    assert not (ours & listening)


# -- the whole process: Ctrl-C, a killed parent, pools after threads ------------------

SCRIPT = textwrap.dedent(
    """
    import decimal, os, signal, sys, time
    import numpy as np
    import coremap as cm
    from coremap.engines._processes import process_engine

    def slow(v):
        time.sleep(0.002)
        return float(decimal.Decimal(v))

    mode = sys.argv[1]
    x = np.arange(200_000.0)
    if mode == "after-threads":
        cm.parallel_map(np.random.default_rng(0).random(10**6), lambda v: v * 2.0)
        cm.parallel_map(np.arange(10.0), np.sin, backend="threads")
    cm.parallel_map(x[:10], slow, backend="processes", workers=2)
    print("pids", *process_engine().pids(), flush=True)
    if mode == "after-threads":
        y = cm.parallel_map(x[:4000], slow, backend="processes", workers=2)
        print("ok", bool((y == x[:4000]).all()), flush=True)
        sys.exit(0)
    if mode == "idle":
        time.sleep(60)
    t = time.perf_counter()
    try:
        cm.parallel_map(x, slow, backend="processes", workers=2)
    except KeyboardInterrupt:
        print(f"interrupted {time.perf_counter() - t:.3f}", flush=True)
        sys.exit(3)
    """
)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _wait_gone(pids, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _start(tmp_path, mode):
    script = tmp_path / "proc.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "pids", line
    return proc, [int(p) for p in line[1:]]


@pytest.mark.parametrize("target", ["group", "parent"])
def test_ctrl_c_stops_processes(tmp_path, target):
    proc, pids = _start(tmp_path, "busy")
    try:
        time.sleep(0.7)
        t0 = time.perf_counter()
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3 and out.startswith("interrupted"), out
    assert elapsed < 3.0
    assert _wait_gone(pids, 2.0), "a worker outlived its parent"
    assert _segments(proc.pid) == set()  # the interrupted call left nothing behind


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_parent_killed_workers_follow(tmp_path, mode):
    proc, pids = _start(tmp_path, mode)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert _wait_gone(pids, 2.0), "a worker outlived its SIGKILLed parent"
    cm.cleanup_stale()


def test_process_pool_after_threads_and_numba(tmp_path):
    proc, _ = _start(tmp_path, "after-threads")
    out, _ = proc.communicate(timeout=50)
    assert proc.returncode == 0 and "ok True" in out


def test_segments_gone_after_sigkilled_worker(engine):
    before = _segments()
    with pytest.raises(cm.WorkerCrashedError):
        cm.parallel_map(np.arange(2000.0), kill_self, backend="processes", workers=2)
    time.sleep(1.0)
    assert _segments() <= before


def test_warning_free_on_explicit_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.parallel_map(np.arange(10.0), dec2, backend="processes")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.timeout(240)
def test_soak_with_worker_kills(engine):
    """Many calls with workers killed now and then: descriptors, RSS and /dev/shm stay flat."""
    x = np.arange(2000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    before_fds, before_rss, before_shm = _fds(), _rss_mb(), _segments()
    crashes = 0
    for i in range(600):
        if i % 100 == 50:
            os.kill(engine.pids()[i % 2], signal.SIGKILL)
        try:
            got = cm.parallel_map(x, dec2, backend="processes", workers=2)
        except cm.WorkerCrashedError:
            crashes += 1
            continue
        assert got[-1] == 2 * x[-1]
    assert crashes <= 6
    assert _fds() <= before_fds + 4
    assert _rss_mb() < before_rss + 64
    assert _segments() <= before_shm


# -- the parent <-> worker protocol ------------------------------------------------------

def test_replies_are_named_and_checked():
    from coremap.engines import _messages as m

    reply = m.Reply(m.DONE, 7)
    assert m.check_reply(reply, 7, (m.DONE,)) is reply
    err = m.Reply(m.ERROR, 7, error=m.ErrorInfo(0, 1, None, "builtins.SystemExit", "", "", []))
    assert m.check_reply(err, 7, (m.DONE,)).error.exits
    with pytest.raises(m.ProtocolError, match="answered task 6 while task 7"):
        m.check_reply(m.Reply(m.DONE, 6), 7, (m.DONE,))
    with pytest.raises(m.ProtocolError, match="'probed' reply"):
        m.check_reply(m.Reply(m.PROBED, 7, np.float64), 7, (m.DONE,))
    with pytest.raises(m.ProtocolError):
        m.check_reply(("done", 7), 7, (m.DONE,))  # the old positional tuple


def test_reply_for_another_task_is_a_protocol_error(engine):
    """A stale reply in a worker's pipe is never taken for the current call's result."""
    import pickle

    from coremap.engines import _messages as m

    x = np.arange(3000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=1)
    w = engine._workers[0]
    # a request behind the engine's back: its answer (for task 10**6) is out of step
    import cloudpickle

    w.conn.send_bytes(pickle.dumps(m.ProbeSpec(10**6, cloudpickle.dumps(dec2), "python",
                                               "dec2", [False], [x[:4]])))
    time.sleep(0.5)
    with pytest.raises(m.ProtocolError, match="answered task 1000000"):
        cm.parallel_map(x, lambda v: float(decimal.Decimal(v)) * 3, backend="processes",
                        workers=1)
    assert not w.process.is_alive()  # out of step: killed, replaced next call
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes", workers=1),
                                  2 * x)


def test_worker_gone_before_send_is_worker_crashed(engine, monkeypatch):
    """Item 15: a worker that dies between the liveness check and the send."""
    x = np.arange(3000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    victim = engine._workers[1]
    real_ensure = type(engine)._ensure

    def ensure_then_kill(self, n):
        procs = real_ensure(self, n)
        if victim.process.is_alive():  # dies after the check, before the send
            os.kill(victim.process.pid, signal.SIGKILL)
            victim.process.join(5)
        return procs

    monkeypatch.setattr(type(engine), "_ensure", ensure_then_kill)
    with pytest.raises(cm.WorkerCrashedError, match="SIGKILL") as info:
        cm.parallel_map(x, dec2, backend="processes", workers=2)
    assert info.value.pid == victim.process.pid
    monkeypatch.undo()
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes", workers=2),
                                  2 * x)


# -- stopped workers, killed parents, forked children, nested pools, leaks ----------------

def slow_dec2(v):
    time.sleep(0.0005)
    return float(decimal.Decimal(v) * 2)


def test_stopped_worker_is_a_crash_and_replaced(engine):
    """Item 9: a worker SIGSTOPped mid-chunk would hang the call (as in multiprocessing
    and loky): it is a WorkerCrashedError once stopped for STOPPED_GRACE."""
    import threading

    from coremap.engines._processes import STOPPED_GRACE

    x = np.arange(20_000.0)
    cm.parallel_map(x[:10], dec2, backend="processes", workers=2)
    victim = engine.pids()[1]
    stopper = threading.Timer(0.5, os.kill, (victim, signal.SIGSTOP))
    stopper.start()
    try:
        t = time.perf_counter()
        with pytest.raises(cm.WorkerCrashedError, match="stopped") as info:
            cm.parallel_map(x, slow_dec2, backend="processes", workers=2,
                            schedule="dynamic", chunk_size=200)
        assert time.perf_counter() - t < STOPPED_GRACE + 6.0
        assert info.value.pid == victim and info.value.chunk is not None
        assert _wait_gone([victim], 5.0)
    finally:
        stopper.join(5)
        if _alive(victim):
            os.kill(victim, signal.SIGKILL)
    np.testing.assert_array_equal(cm.parallel_map(x, dec2, backend="processes", workers=2),
                                  2 * x)
    assert victim not in engine.pids()


def test_stopped_idle_worker_does_not_hang_the_next_call(engine):
    """A worker stopped between calls: the others compute the call, it is replaced."""
    x = np.arange(4000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    victim = engine.pids()[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        got = cm.parallel_map(x, dec2, backend="processes", workers=2)
        np.testing.assert_array_equal(got, 2 * x)
        assert _wait_gone([victim], 5.0)
    finally:
        if _alive(victim):
            os.kill(victim, signal.SIGKILL)
    cm.parallel_map(x[:10], dec2, backend="processes", workers=2)
    assert victim not in engine.pids()


def test_briefly_stopped_worker_is_kept(engine):
    """A stop shorter than the grace (a Ctrl-Z then fg) is not a crash."""
    x = np.arange(4000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    victim = engine.pids()[0]
    os.kill(victim, signal.SIGSTOP)
    import threading

    resume = threading.Timer(0.8, os.kill, (victim, signal.SIGCONT))
    resume.start()
    try:
        got = cm.parallel_map(x, dec2, backend="processes", workers=2)
    finally:
        resume.join(5)
        os.kill(victim, signal.SIGCONT)
    np.testing.assert_array_equal(got, 2 * x)
    assert victim in engine.pids()


KILLED_PARENT = textwrap.dedent(
    """
    import decimal, sys, time
    import numpy as np
    import coremap as cm
    from coremap.engines._processes import process_engine

    def slow(v):
        time.sleep(0.002)
        return float(decimal.Decimal(v))

    kept = cm.SharedArray.zeros(1000)  # the user's own segment, never passed to a call
    cm.parallel_map(np.arange(10.0), slow, backend="processes", workers=2)
    print("pids", *process_engine().pids(), flush=True)
    if sys.argv[1] == "busy":
        cm.parallel_map(np.arange(200_000.0), slow, backend="processes", workers=2)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_parent_killed_leaves_no_segment(tmp_path, mode):
    """Item 13: the workers, which outlive a SIGKILLed parent briefly, unlink its segments."""
    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line and line[0] == "pids", line
        pids = [int(p) for p in line[1:]]
        end = time.monotonic() + 10
        want = 2 if mode == "busy" else 1  # the call's segments, and the user's array
        while len(_segments(proc.pid)) < want and time.monotonic() < end:
            time.sleep(0.05)
        assert len(_segments(proc.pid)) >= want
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert _wait_gone(pids, 3.0)
    end = time.monotonic() + 2.0
    while _segments(proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert _segments(proc.pid) == set()


FORKING_PARENT = textwrap.dedent(
    """
    import decimal, os, sys, time
    import numpy as np
    import coremap as cm

    def dec2(v):
        return float(decimal.Decimal(v) * 2)

    x = np.arange(3000.0)
    cm.parallel_map(x, dec2, backend="processes", workers=2)
    pool = cm.Pool(2)
    assert pool.map(abs, [-1, -2]) == [1, 2]
    from coremap.engines._processes import process_engine

    def workers():
        return process_engine().pids() + [w.process.pid for w in pool._workers]

    before = workers()
    a = cm.SharedArray.from_array(x)
    for k in range(10):
        pid = os.fork()
        if pid == 0:
            if k == 0:  # the child's own calls get the child's own engine
                assert (cm.parallel_map(x, dec2, backend="processes", workers=2) == 2 * x).all()
            sys.exit(0)  # a normal exit: atexit handlers and finalizers run here
        assert os.waitpid(pid, 0)[1] == 0
    time.sleep(0.5)
    print("same workers", workers() == before, flush=True)
    errors = 0
    for _ in range(5):
        try:
            ok = (cm.parallel_map(x, dec2, backend="processes", workers=2) == 2 * x).all()
            ok = ok and pool.map(abs, range(-50, 0)) == list(range(50, 0, -1))
            ok = ok and a.name in os.listdir("/dev/shm")
        except Exception as exc:
            print(type(exc).__name__, exc, flush=True)
            errors += 1
            continue
        assert ok
    pool.terminate()
    a.unlink()
    print("errors", errors, flush=True)
    """
)


def test_forked_child_exit_leaves_the_parent_working(tmp_path):
    """Item 16: a forked child's exit must not stop its parent's workers or segments."""
    script = tmp_path / "forks.py"
    script.write_text(FORKING_PARENT)
    out = subprocess.run([sys.executable, "-W", "ignore", str(script)], capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "same workers True" in out.stdout and "errors 0" in out.stdout, out.stdout


def _nested_engine_size(_=None):
    """Run a nested parallel_map of a function Numba cannot compile; return how many
    processes this process's engine started for it."""
    import warnings

    from coremap.engines import _processes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cm.parallel_map(np.arange(300_000.0), dec2, workers=2)
    assert got[-1] == 2 * 299_999.0
    return 0 if _processes._engine is None else _processes._engine.size


def _nested_in_thread(_=None):
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(_nested_engine_size()))
    t.start()
    t.join(50)
    return out[0]


@pytest.mark.timeout(120)
def test_nested_calls_start_no_grandchildren():
    """Item 14: inside a Pool task, a thread of it, or an engine worker: serial."""
    with cm.Pool(1) as pool:
        assert pool.apply(_nested_engine_size) == 0
        assert pool.apply(_nested_in_thread) == 0

    def inner(c):
        return np.full(len(c), float(_nested_engine_size()))

    got = cm.parallel_map(np.arange(4.0), inner, vectorized=True, backend="processes",
                          workers=1)
    assert (got == 0).all()


def test_uncompilable_calls_keep_no_results_alive():
    """Item 11: the cached 'Numba cannot compile' verdict must not hold past calls' frames."""
    import gc
    import weakref

    x = np.arange(100.0)
    refs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            res = cm.parallel_map(x, dec2, backend="serial")
            refs.append(weakref.ref(res))
            del res
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_cached_not_compilable_verdict_is_a_fresh_exception():
    """Item 11: the verdict is cached, never the exception object (its traceback grows)."""
    from coremap._kernels import _numba

    def depth(exc):
        n, tb = 0, exc.__traceback__
        while tb is not None:
            n, tb = n + 1, tb.tb_next
        return n

    seen = []
    for _ in range(3):
        with pytest.raises(_numba.NotCompilable) as info:
            _numba.resolve(dec2, (np.dtype(np.float64),))
        seen.append(info.value)
    assert seen[0] is not seen[1] and seen[1] is not seen[2]
    assert str(seen[1]) == str(seen[2]) and depth(seen[1]) == depth(seen[2])


def test_segments_are_found_below_the_front_end(engine):
    from coremap import _shm

    x = cm.SharedArray.from_array(np.arange(10.0))
    try:
        assert isinstance(x, _shm.SegmentArray)
        whole = np.asarray(x)  # NumPy collapses the .base chain past the SharedArray
        assert _shm.segment_of(whole, x) is x._segment
        assert _shm.segment_of(x[::3]) is x._segment
        assert _shm.segment_of(np.arange(3.0)) is None
        assert _shm.segment_of(np.arange(3.0), x) is None  # not inside x's segment
        pooled, seg = engine.segment_array((4,), np.float64)
        # a pooled operand is an array in a segment, not the front end's SharedArray
        assert type(pooled) is _shm.SegmentArray and _shm.segment_of(pooled[1:]) is seg
        del pooled
        engine.pool.release_all(set())
    finally:
        x.unlink()


def test_the_process_engine_takes_the_same_prepared_call(engine, monkeypatch):
    from coremap import _plan

    x = cm.SharedArray.from_array(np.arange(3000.0))
    try:
        call = _plan.plan_call(x, dec2, backend="processes", workers=2)
        assert call.out_dtype is None  # learnt by the engine (a probe in a worker)
        taken, sent = _watch_calls(engine, monkeypatch)
        got = engine.execute(call)
        np.testing.assert_array_equal(got, 2 * np.arange(3000.0))
        assert call.out_dtype == np.float64
        assert sent[0][0] == x._segment.name  # the input attached by name, not copied
        assert taken == [(3000,)]  # only the output is a pooled segment
    finally:
        x.unlink()


def test_the_workers_slots_lie_after_the_jobs_shared_state():
    """The control block holds the job's shared state, then one (lo, hi) slot per
    worker: the slots must not overlap the state, whatever its size."""
    from coremap._kernels import _runner
    from coremap.engines import _processes

    assert _processes.CTRL_SLOTS >= _processes.CTRL_STATE + _runner.STATE_BYTES
    assert _processes.CTRL_SLOTS % 64 == 0
