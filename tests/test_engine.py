"""The thread engine: GIL-free kernels, scheduling, bit-identical results, Ctrl-C, config."""
from __future__ import annotations

import decimal
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import coremap as cm
from coremap import _workloads
from coremap._bench import median_time
from coremap._kernels import _runner
from coremap.engines import thread_engine


def spin(v):
    s = v
    for _ in range(200):
        s = s * 0.999 + 0.001
    return s


# -- bit-identical across workers and chunk sizes ----------------------------------------

SPECIALS = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-308, 5e-324, -1.5],
                    dtype=np.float64)
# a NaN with a payload
SPECIALS[1] = np.frombuffer(np.uint64(0x7FF8_0000_0000_BEEF).tobytes(), np.float64)[0]


def keep(v):
    return v * 1.0


def kernel_w2(v):
    return np.sin(v) * np.exp(-v * v) + np.sqrt(abs(v))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 5000),
    workers=st.sampled_from([1, 2, 3, 8]),
    chunk=st.one_of(st.none(), st.integers(1, 3000)),
    schedule=st.sampled_from(["guided", "dynamic", "static"]),
)
def test_bit_identical_any_workers_and_chunks(n, workers, chunk, schedule):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n) * 10
    x[: min(n, SPECIALS.size)] = SPECIALS[: min(n, SPECIALS.size)]
    ref = cm.parallel_map(x, kernel_w2, backend="serial")
    got = cm.parallel_map(x, kernel_w2, backend="threads", workers=workers, chunk_size=chunk,
                          schedule=schedule)
    assert same_bits(got, ref)
    ref = cm.parallel_map(x, keep, backend="serial")
    assert same_bits(ref, x)  # NaN payloads and -0.0 survive a kernel
    got = cm.parallel_map(x, np.cbrt, backend="threads", workers=workers, chunk_size=chunk,
                          schedule=schedule)
    assert same_bits(got, np.cbrt(x))


# -- the runner --------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["guided", "dynamic", "static"])
@pytest.mark.parametrize("n, workers, chunk", [(0, 1, 1), (1, 4, 1), (10, 3, 3), (10_007, 2, 64)])
def test_job_claims_cover_range_once(schedule, n, workers, chunk):
    job = _runner.Job(n, workers, schedule, chunk, 1 << 20)
    seen = np.zeros(n, np.int64)
    assert job.enter() == (n > 0)
    while (c := job.claim()) is not None:
        lo, hi = c
        assert 0 <= lo < hi <= n
        seen[lo:hi] += 1
        job.complete(lo, hi)
    if n:
        job.leave()
    assert np.all(seen == 1)
    assert job.done == n and job.finished


def test_guided_chunks_shrink():
    job = _runner.Job(100_000, 2, "guided", 100, 1 << 30)
    sizes = []
    while (c := job.claim()) is not None:
        sizes.append(c[1] - c[0])
    assert sizes[0] == 25_000  # remaining / (2 * workers)
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-2] == 100  # the minimum, then the rest


def test_timed_chunks_are_capped():
    job = _runner.Job(1_000_000, 2, "guided", 1, 1 << 30, target_ns=1_000_000, first_chunk=10)
    lo, hi = job.claim()
    assert hi - lo == 10  # cost unknown: a small first chunk
    sizes = []
    for _ in range(5):
        job.complete(lo, hi, (hi - lo) * 10_000)  # 10 us per element
        lo, hi = job.claim()
        sizes.append(hi - lo)
    # at most twice the chunk just timed, then 1 ms of work
    assert sizes == [20, 40, 80, 100, 100]


def test_cancel_stops_claims():
    job = _runner.Job(100, 1, "dynamic", 10)
    assert job.claim() == (0, 10)
    job.cancel()
    assert job.claim() is None and job.cancelled


# -- the engine --------------------------------------------------------------------------

@pytest.mark.skipif(cm._config.usable_cores() < 2, reason="needs two cores")
def test_threads_run_without_the_gil():
    """Two workers beat one on a compute-bound kernel: the kernel holds no GIL."""
    x = np.random.default_rng(0).random(200_000)
    out = np.empty_like(x)
    cm.parallel_map(x, spin, out=out)  # compile
    one = median_time(lambda: cm.parallel_map(x, spin, out=out, workers=1, backend="threads"))
    two = median_time(lambda: cm.parallel_map(x, spin, out=out, workers=2, backend="threads"))
    assert one / two > 1.3, f"1 worker {one:.4f}s, 2 workers {two:.4f}s"


def test_small_call_stays_in_calling_thread():
    thread_engine().shutdown()
    x = np.arange(1000.0)
    cm.parallel_map(x, keep)
    cm.parallel_map(x, np.sin)
    assert thread_engine().size == 0  # no helper was worth waking


def test_large_call_uses_helpers():
    x = np.random.default_rng(0).random(300_000)
    cm.parallel_map(x, spin, workers=2)
    assert thread_engine().size >= 1


def test_progress_bar(capsys):
    x = np.random.default_rng(0).random(100_000)
    got = cm.parallel_map(x, keep, progress=True, workers=2)
    np.testing.assert_array_equal(got, x)
    err = capsys.readouterr().err
    assert "100%" in err and "100k" in err
    cm.parallel_map(x, keep, progress=True, backend="serial")
    assert "100%" in capsys.readouterr().err


def test_concurrent_callers_share_the_pool():
    import concurrent.futures

    x = np.random.default_rng(0).random(200_000)
    want = cm.parallel_map(x, spin, backend="serial")
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: cm.parallel_map(x, spin, workers=2), range(8)))
    for r in results:
        assert same_bits(r, want)


def test_nested_call_does_not_deadlock():
    def outer(chunk):
        return cm.parallel_map(chunk, keep, workers=2)

    x = np.random.default_rng(0).random(200_000)
    got = cm.parallel_map(x, outer, vectorized=True, workers=2, chunk_size=10_000)
    np.testing.assert_array_equal(got, x)


# -- config ------------------------------------------------------------------------------

def test_config_context_and_env(monkeypatch):
    x = np.ones(10)
    assert cm.explain(x, keep).workers == cm._config.usable_cores()
    with cm.config(workers=3, backend="threads"):
        plan = cm.explain(x, keep)
        assert plan.workers == 3 and plan.engine == "threads"
        with cm.config(backend="serial"):
            assert cm.explain(x, keep).engine == "serial"
        assert cm.explain(x, keep).engine == "threads"
    monkeypatch.setenv("COREMAP_WORKERS", "5")
    monkeypatch.setenv("COREMAP_BACKEND", "threads")
    plan = cm.explain(x, keep)
    assert plan.workers == 5 and plan.engine == "threads"
    assert cm.explain(x, keep, workers=1, backend="serial").workers == 1
    monkeypatch.setenv("COREMAP_WORKERS", "many")
    with pytest.raises(ValueError, match="COREMAP_WORKERS"):
        cm.parallel_map(x, keep)
    monkeypatch.setenv("COREMAP_WORKERS", "2")
    monkeypatch.setenv("COREMAP_BACKEND", "gpu")
    with pytest.raises(ValueError, match="COREMAP_BACKEND"):
        cm.parallel_map(x, keep)


def test_config_is_thread_local():
    import threading

    seen = []
    with cm.config(workers=7):
        t = threading.Thread(target=lambda: seen.append(cm.explain(np.ones(3), keep).workers))
        t.start()
        t.join(10)
    assert seen == [cm._config.usable_cores()]


def test_config_validates():
    with pytest.raises(ValueError):
        with cm.config(workers=0):
            pass
    with pytest.raises(ValueError):
        with cm.config(backend="nope"):
            pass


def test_fast_path_respects_config():
    x = np.random.default_rng(0).random(300_000)
    thread_engine().shutdown()
    cm.parallel_map(x, spin)  # cached under the default config
    thread_engine().shutdown()
    with cm.config(workers=1):
        cm.parallel_map(x, spin)
    assert thread_engine().size == 0


# -- explain -----------------------------------------------------------------------------

def test_explain_reports_plan():
    x = np.random.default_rng(0).random(10**6)
    plan = cm.explain(x, kernel_w2)
    text = str(plan)
    assert plan.engine == "threads" and plan.kind == "numba"
    assert "Numba compiled it" in text and "guided" in text and "1,000,000" in text
    plan = cm.explain(x, np.sin, workers=1)
    assert plan.engine == "serial" and "workers=1" in str(plan)
    plan = cm.explain(x, cm.kernels.affine(2.0, 1.0))
    assert plan.kind == "builtin"
    plan = cm.explain(x, lambda c: c, vectorized=True)
    assert plan.kind == "vectorized" and plan.out_dtype is None
    plan = cm.explain(x, lambda v: float(decimal.Decimal(v)))
    assert plan.kind == "python" and plan.engine == "processes"
    assert "Numba could not compile" in str(plan)
    assert repr(plan) == str(plan)


def test_explain_validates_like_parallel_map():
    with pytest.raises(ValueError):
        cm.explain(np.ones(3), keep, workers=0)


# -- Ctrl-C ------------------------------------------------------------------------------

CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import coremap as cm

    def slow(v):
        s = 0.0
        for i in range(20000):
            s += np.sin(v + i)
        return s

    def slow_chunk(c):
        time.sleep(0.05)
        return c

    # The cost per element rises steeply along a sorted array (as v**2, from ~0): a
    # chunk sized on the first elements would run for minutes further on.
    def rising(v):
        s = 0.0
        for i in range(int(3e8 * v * v)):
            s += np.sin(s + i)
        return s

    def rising_chunk(c):
        time.sleep(0.3 * c.size * c[-1] ** 2)
        return c

    kind = sys.argv[1]
    x = np.random.default_rng(0).random(2_000_000)
    if kind == "numba":
        cm.parallel_map(x[:10], slow)
        call = lambda: cm.parallel_map(x, slow)
    elif kind == "rising":
        cm.parallel_map(np.linspace(0.0, 1e-3, 10), rising)  # compiled on cheap elements
        x = np.linspace(0.0, 1.0, 2_000_000)
        call = lambda: cm.parallel_map(x, rising)
    elif kind == "rising_vectorized":
        x = np.linspace(0.0, 1.0, 2_000_000)
        call = lambda: cm.parallel_map(x, rising_chunk, vectorized=True, backend="threads")
    else:
        call = lambda: cm.parallel_map(x, slow_chunk, vectorized=True, chunk_size=1000)
    print("ready", flush=True)
    t = time.perf_counter()
    try:
        call()
    except KeyboardInterrupt:
        print(f"interrupted {time.perf_counter() - t:.3f}", flush=True)
        sys.exit(3)
    print("finished", flush=True)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["numba", "vectorized", "rising", "rising_vectorized"])
def test_ctrl_c_stops_within_a_second(kind, tmp_path):
    """Ctrl-C acts within a second, also when the cost per element rises along the array
    (a chunk length learnt on cheap elements must not run on costly ones)."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), kind], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        elapsed = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, out
    assert out.startswith("interrupted")
    assert elapsed < 3.0, f"exited {elapsed:.2f}s after Ctrl-C"
    reported = float(out.split()[1]) - 0.5
    assert reported < 1.0, f"KeyboardInterrupt {reported:.2f}s after Ctrl-C"


def test_workloads_match_numpy():
    x = _workloads.data(20_000, sort=True)
    np.testing.assert_allclose(cm.parallel_map(x, _workloads.w2), _workloads.w2_numpy(x),
                               rtol=1e-12)
    np.testing.assert_array_equal(cm.parallel_map(x, _workloads.w3), _workloads.w3_numpy(x))
    np.testing.assert_array_equal(cm.parallel_map(x, _workloads.w1), _workloads.w1_numpy(x))


@pytest.mark.timeout(180)
def test_more_than_2_31_elements():
    """2**32 elements (two broadcast inputs): int64 indices end to end, no overflow."""
    a = np.arange(2**16, dtype=np.uint8).reshape(-1, 1)
    b = np.arange(2**16, dtype=np.uint8).reshape(1, -1)
    out = cm.parallel_map((a, b), lambda u, v: u ^ v, dtype=np.uint8)
    assert out.shape == (2**16, 2**16) and out.size > 2**31
    for i, j in [(0, 0), (12345, 54321), (2**16 - 1, 2**16 - 1), (2**15, 2**16 - 3)]:
        assert out[i, j] == (i % 256) ^ (j % 256)
    assert np.array_equal(out[-1], (255 ^ (np.arange(2**16) % 256)).astype(np.uint8))
    del out


# -- nothing writes after the call: timeout, errors (issue: timeout kept writing) ---------

def slow_numba(v):
    s = v
    for _ in range(20_000):
        s = s * 0.999 + 0.001
    return s


def slow_chunk(c):
    time.sleep(0.02)
    return c + 1.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["numba", "vectorized"])
def test_timeout_leaves_out_untouched_after_raising(kind):
    """After TimeoutError, no thread of the call writes into ``out`` any more."""
    x = np.linspace(0.0, 1.0, 400_000)
    if kind == "numba":
        cm.parallel_map(x[:10], slow_numba)
        kwargs = {}
        func = slow_numba
    else:
        kwargs = {"vectorized": True, "chunk_size": 1000}
        func = slow_chunk
    out = np.full_like(x, -1.0)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not finish within 0.3 s"):
        cm.parallel_map(x, func, out=out, workers=2, backend="threads", timeout=0.3, **kwargs)
    assert time.perf_counter() - t0 < 2.0
    out[:] = -2.0  # what the caller writes after the error must stay
    time.sleep(0.5)
    assert np.all(out == -2.0), f"{np.count_nonzero(out != -2.0)} elements overwritten"


def test_error_in_a_helper_stops_all_writes():
    """A failing chunk cancels the call; when it raises, every helper has stopped."""

    def fails_late(c):
        if c[0] >= 150_000:
            raise ValueError("late")
        time.sleep(0.005)
        return c

    x = np.arange(200_000.0)
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match="late"):
        cm.parallel_map(x, fails_late, out=out, vectorized=True, workers=3, chunk_size=1000,
                        schedule="dynamic", backend="threads")
    snapshot = out.copy()
    time.sleep(0.2)
    assert same_bits(out, snapshot)


# -- nested calls never wait for pool threads busy with their parent ----------------------

NESTED_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import coremap as cm

    def keep(v):
        return v * 1.0

    opts = {"progress": True} if sys.argv[1] == "progress" else {"timeout": 5.0}

    def outer(chunk):  # runs on both pool threads at once; inner: as many workers
        return cm.parallel_map(chunk, keep, workers=2, **opts)

    x = np.random.default_rng(0).random(200_000)
    got = cm.parallel_map(x, outer, vectorized=True, workers=3, chunk_size=5_000,
                          schedule="dynamic")
    assert np.array_equal(got, x)
    print("ok", flush=True)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opt", ["progress", "timeout"])
def test_nested_call_with_progress_or_timeout(opt, tmp_path):
    """An inner call with progress/timeout inside a vectorized pool thread finishes."""
    script = tmp_path / "nested.py"
    script.write_text(NESTED_SCRIPT)
    res = subprocess.run([sys.executable, str(script), opt], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


def _thread_starts_fail_after(monkeypatch, allowed):
    """Make ``threading.Thread.start`` fail for pool threads after ``allowed`` starts,
    as it does at the thread limit ("can't start new thread")."""
    import threading

    real = threading.Thread.start
    started = []

    def start(self):
        if self.name.startswith("coremap-thread-"):
            if len(started) >= allowed:
                raise RuntimeError("can't start new thread")
            started.append(self)
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return started


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_thread_that_cannot_start_leaves_the_pool_consistent(monkeypatch, timeout):
    """Item 12: when a helper thread cannot start, the call runs with the threads
    already started (the right result), and the pool holds exactly those, alive."""
    engine = thread_engine()
    engine.shutdown()
    started = _thread_starts_fail_after(monkeypatch, 2)
    x = np.arange(20_000.0)
    with pytest.warns(RuntimeWarning, match="could not start"):
        got = cm.parallel_map(x, lambda c: c * 2.0, vectorized=True, workers=4,
                              chunk_size=500, schedule="static", backend="threads",
                              timeout=timeout)
    np.testing.assert_array_equal(got, 2 * x)
    assert engine._threads == started and all(t.is_alive() for t in started)
    assert len(engine._queues) == 2
    engine.shutdown()


@pytest.mark.timeout(60)
def test_no_thread_can_start_for_a_watched_call(monkeypatch):
    """With a deadline the caller only watches a Python task: with no thread at all it
    raises a clear error before any work, instead of waiting for the deadline."""
    engine = thread_engine()
    engine.shutdown()
    _thread_starts_fail_after(monkeypatch, 0)
    calls = []

    def double(c):
        calls.append(len(c))
        return c * 2.0

    with pytest.warns(RuntimeWarning, match="running with 0 of the 2"), \
            pytest.raises(RuntimeError, match="could not start a worker thread"):
        cm.parallel_map(np.arange(20_000.0), double, vectorized=True, workers=2,
                        chunk_size=500, backend="threads", timeout=30.0)
    assert engine._threads == [] and engine._queues == []
    assert sum(calls) <= 256  # at most the result-dtype probe ran
