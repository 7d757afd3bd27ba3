"""The fast path with options and out=: planned once per distinct option value, then
cached; results identical to the planner's path, and out= checked on every call."""
from __future__ import annotations

import math

import numpy as np
import pytest

import coremap as cm
from coremap import _api


def w2(v):
    return math.sin(v) * math.exp(-v * v) + math.sqrt(v)


def _reference(x):
    return np.array([w2(v) for v in x.tolist()])


@pytest.fixture
def planned(monkeypatch):
    """Counts the calls that went through the planner."""
    calls = []
    real = _api.plan_call

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_api, "plan_call", counting)
    return calls


@pytest.mark.parametrize("options", [
    {"workers": 1}, {"workers": 2}, {"backend": "serial"}, {"backend": "threads"},
    {"schedule": "static", "workers": 2}, {"chunk_size": 256}, {"dtype": np.float32},
])
def test_repeated_options_are_planned_once(planned, options):
    x = np.random.default_rng(1).random(3000)
    want = _reference(x).astype(options.get("dtype", np.float64))
    for _ in range(4):
        got = cm.parallel_map(x, w2, **options)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6 if got.dtype == np.float32 else 0)
    assert len(planned) == 1


@pytest.mark.parametrize("workers", [None, 1, 2])
def test_out_is_written_and_returned_and_planned_once(planned, workers):
    x = np.random.default_rng(2).random(5000)
    out = np.full_like(x, -1.0)
    for k in range(3):
        out[:] = -1.0
        y = cm.parallel_map(x + k, w2, out=out, workers=workers)
        assert y is out
        np.testing.assert_array_equal(out, _reference(x + k))
    assert len(planned) == 1


def test_an_out_of_another_dtype_still_casts():
    x = np.random.default_rng(3).random(3000)
    out = np.empty(3000, np.float32)
    for _ in range(3):
        assert cm.parallel_map(x, w2, out=out) is out
        np.testing.assert_array_equal(out, _reference(x).astype(np.float32))


@pytest.mark.parametrize("case", ["forward", "backward", "same", "strided"])
def test_overlapping_or_strided_out_matches_numpy_on_every_call(case):
    for _ in range(3):
        x = np.arange(4000.0)
        y = x.copy()
        if case == "forward":
            cm.parallel_map(x[:-1], lambda v: v * 2.0, out=x[1:])
            np.multiply(y[:-1], 2.0, out=y[1:])
        elif case == "backward":
            cm.parallel_map(x[1:], lambda v: v * 2.0, out=x[:-1])
            np.multiply(y[1:], 2.0, out=y[:-1])
        elif case == "same":
            assert cm.parallel_map(x, lambda v: v * 2.0, out=x) is x
            np.multiply(y, 2.0, out=y)
        else:
            cm.parallel_map(x[::2].copy(), lambda v: v * 2.0, out=x[1::2])
            np.multiply(y[::2], 2.0, out=y[1::2])
        np.testing.assert_array_equal(x, y)


def test_a_read_only_out_is_refused_every_time():
    x = np.arange(3000.0)
    out = np.empty_like(x)
    cm.parallel_map(x, w2, out=out)
    out.flags.writeable = False
    for _ in range(2):
        with pytest.raises(ValueError):
            cm.parallel_map(x, w2, out=out)


def test_an_out_of_the_wrong_shape_is_refused_after_a_cached_call():
    x = np.arange(3000.0)
    cm.parallel_map(x, w2, out=np.empty(3000))
    cm.parallel_map(x, w2, out=np.empty(3000))
    with pytest.raises(ValueError):
        cm.parallel_map(x, w2, out=np.empty(2999))


def test_a_short_call_on_one_worker_runs_inline_without_a_job(monkeypatch):
    from coremap import _fastpath

    x = np.random.default_rng(4).random(20_000)
    for _ in range(2):  # planned, then timed once through a job
        cm.parallel_map(x, w2, workers=1)

    class NoJob:
        def __init__(self, prepared):
            self.run_inline = prepared.run_inline

        def run(self, *args, **kwargs):
            raise AssertionError("a job was run for a call known to be short")

    for entry in _fastpath._cache.values():
        if entry.prepared is not None:  # (a ufunc's entry has none)
            monkeypatch.setattr(entry, "prepared", NoJob(entry.prepared))
    np.testing.assert_array_equal(cm.parallel_map(x, w2, workers=1), _reference(x))


@pytest.mark.parametrize("estimate_us, threshold_us, inline", [
    (5, 10, True), (15, 10, False), (15, 40, True), (30, 400, False), (150, 400, False)])
def test_a_call_runs_inline_below_the_pools_escalation_threshold(
        monkeypatch, estimate_us, threshold_us, inline):
    """One kernel call when a job would not post its helpers anyway (the work is under
    the pool's escalation threshold, and at most 25 us); else a job with helpers."""
    from coremap import _fastpath
    from coremap._kernels import _runner

    monkeypatch.setattr(_fastpath, "_cache", {})  # this test's entry alone
    x = np.random.default_rng(6).random(10_000)
    for _ in range(2):
        cm.parallel_map(x, w2, workers=2)
    (entry,) = _fastpath._cache.values()
    ran = []

    class Spy:
        def __init__(self, prepared):
            self.prepared = prepared

        def run_inline(self, *args):
            ran.append("inline")
            return self.prepared.run_inline(*args)

        def run(self, *args, **kwargs):
            ran.append("job")
            return self.prepared.run(*args, **kwargs)

    monkeypatch.setattr(entry, "prepared", Spy(entry.prepared))
    monkeypatch.setattr(_runner, "escalate_threshold_ns", lambda: threshold_us * 1000)
    for _ in range(3):
        entry.ns_per_element = estimate_us * 1000 / x.size
        np.testing.assert_array_equal(cm.parallel_map(x, w2, workers=2), _reference(x))
    assert ran == ["inline" if inline else "job"] * 3


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_repeated_call_makes_no_job_in_python(monkeypatch, workers):
    """Past its first calls, a cached call's job is built and run in one compiled
    call (_runner.Prepared): no Job(...), set_kernel or engine run in Python."""
    from coremap import _fastpath
    from coremap.engines import _base, _serial, _threads

    x = np.random.default_rng(5).random(400_000)  # long enough for a job, not inline
    out = np.empty_like(x)
    for _ in range(2):
        cm.parallel_map(x, w2, out=out, workers=workers)

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path went through Python's job machinery")

    monkeypatch.setattr(_base, "new_job", refuse)
    monkeypatch.setattr(_fastpath, "new_job", refuse)
    monkeypatch.setattr(_threads.ThreadEngine, "run", refuse)
    monkeypatch.setattr(_serial.SerialEngine, "run", refuse)
    for k in range(3):
        assert cm.parallel_map(x + k, w2, out=out, workers=workers) is out
        np.testing.assert_array_equal(out, _reference(x + k))


def test_an_error_in_an_inline_call_names_its_element():
    x = np.arange(1.0, 20_001.0)
    f = lambda v: 1.0 / (v - 12_345.0)  # noqa: E731
    good = np.arange(1.0, 20_001.0)
    good[12_344] = 0.5
    for _ in range(3):  # cached and inline by now
        cm.parallel_map(good, f, workers=1)
    with pytest.raises(ZeroDivisionError) as info:
        cm.parallel_map(x, f, workers=1)
    assert any("12344" in n for n in getattr(info.value, "__notes__", ["12344"]))


class _Twice(cm.kernels.BuiltinKernel):
    """A second built-in kernel: 2 * x, on the affine loop with its own operands."""

    __slots__ = ()

    def __call__(self, x):
        return 2 * x

    def result_dtype(self, in_dtypes):
        return np.dtype(in_dtypes[0])

    def operands(self, dtype):
        return (np.asarray(2, dtype), np.asarray(0, dtype))

    def address(self, dtype):
        from coremap._kernels import _builtin

        return _builtin.affine_address(np.dtype(dtype).char)

    def scalar(self, dtype):
        return lambda v: 2 * v


def test_every_built_in_kernel_is_cached_through_its_own_interface():
    x = np.arange(5000.0)
    twice = _Twice()
    for _ in range(3):  # planned, then cached
        np.testing.assert_array_equal(cm.parallel_map(x, twice), 2 * x)
        np.testing.assert_array_equal(cm.parallel_map(x, _Twice()), 2 * x)
        np.testing.assert_array_equal(cm.parallel_map(x, cm.kernels.affine(3.0, 1.0)),
                                      3 * x + 1)


def test_a_function_of_sixteen_inputs_repeats_through_the_fast_path():
    """More operands than the inline call's fixed arrays: the full path runs it, no error."""
    xs = tuple(np.arange(100.0) + k for k in range(16))

    def f(a, b, c, d, e, f_, g, h, i, j, k, l_, m, n, o, p):
        return a + b + c + d + e + f_ + g + h + i + j + k + l_ + m + n + o + p

    for _ in range(3):
        np.testing.assert_array_equal(cm.parallel_map(xs, f), sum(xs))


def test_an_inline_call_keeps_its_estimate_current(monkeypatch):
    """A call run inline is timed too: if its elements grow costlier, the next call
    is judged on the new cost (not held inline by an old estimate)."""
    from coremap import _fastpath

    monkeypatch.setattr(_fastpath, "_cache", {})
    x = np.random.default_rng(8).random(20_000)
    for _ in range(2):
        cm.parallel_map(x, w2, workers=2)
    (entry,) = _fastpath._cache.values()
    entry.ns_per_element = 1e-6  # far below anything measured: the call runs inline
    np.testing.assert_array_equal(cm.parallel_map(x, w2, workers=2), _reference(x))
    assert entry.ns_per_element > 1e-3
