"""Run insights: ``explain(..., run=True)`` runs the call and reports what happened."""
from __future__ import annotations

import decimal
import math

import numpy as np
import pytest
from helpers import same_bits

import coremap as cm
from coremap import _insights

pytestmark = pytest.mark.timeout(120)


def wavy(v):
    s = 0.0
    for k in range(int(v) % 20):
        s += math.sin(k * v)
    return s


def dec2(v):
    """A function Numba cannot compile."""
    return float(decimal.Decimal(v) * 2)


def _x(n=200_000):
    return np.random.default_rng(1).random(n) * 100


@pytest.mark.parametrize("func, vectorized", [(wavy, False), (np.sin, False),
                                              (lambda c: c * 2.0, True)])
@pytest.mark.parametrize("schedule", ["guided", "dynamic", "static"])
def test_run_matches_the_call_and_accounts_for_every_element(func, vectorized, schedule):
    x = _x()
    got = cm.explain(x, func, run=True, workers=2, vectorized=vectorized, schedule=schedule)
    assert isinstance(got, cm.Insights)
    want = cm.parallel_map(x, func, workers=2, vectorized=vectorized, schedule=schedule)
    assert same_bits(got.result, want)
    assert got.plan.engine == "threads" and got.plan.schedule == schedule
    assert sum(w.elements for w in got.workers) == x.size == got.elements
    assert sum(w.chunks for w in got.workers) >= 1
    assert all(w.busy_s > 0 for w in got.workers if w.chunks)
    assert 0 < got.plan_s <= got.wall_s and got.run_s > 0 and got.elements_per_s > 0
    assert got.imbalance is None or got.imbalance >= 0
    assert got.bytes_shared is None  # not the process engine


def test_printed_like_the_plan_with_what_happened():
    got = cm.explain(_x(), wavy, run=True, workers=2)
    text = str(got)
    assert text.startswith(str(got.plan))
    assert "what happened" in text and "elements/s" in text
    for w in got.workers:
        assert w.name in text
    assert repr(got) == text


def test_compile_time_is_seen_on_the_first_call_only():
    def fresh(v):  # a new function object: Numba compiles it in this test
        return v * 3.0 + 1.0

    first = cm.explain(_x(1000), fresh, run=True)
    again = cm.explain(_x(1000), fresh, run=True)
    assert first.compile_s > 0
    assert again.compile_s == 0
    assert first.compile_s <= first.wall_s


def test_serial_engine_is_one_worker_the_caller():
    got = cm.explain(_x(5000), wavy, run=True, backend="serial", chunk_size=512,
                     schedule="dynamic")
    assert [w.name for w in got.workers] == ["MainThread"]
    assert got.workers[0].chunks == math.ceil(5000 / 512)
    assert got.imbalance is None


def test_processes_report_bytes_moved():
    x = _x(20_000)
    got = cm.explain(x, dec2, run=True, backend="processes", workers=2)
    assert same_bits(got.result, cm.parallel_map(x, dec2, backend="processes", workers=2))
    assert got.bytes_shared == 2 * x.nbytes  # the input copied in, the output segment
    assert got.bytes_copied_back == x.nbytes
    assert got.bytes_messages > 0
    assert "per-worker figures are not reported" in str(got)


def test_processes_shared_out_is_not_copied_back():
    x = _x(20_000)
    out = cm.SharedArray.zeros(x.shape)
    try:
        got = cm.explain(x, dec2, run=True, backend="processes", workers=2, out=out)
        assert got.result is out and got.bytes_copied_back == 0
        assert got.bytes_shared == x.nbytes  # the input copied in; no output segment
        np.testing.assert_array_equal(out, x * 2)
    finally:
        out.unlink()


def test_processes_shared_input_is_used_in_place():
    x = cm.SharedArray.from_array(_x(20_000))
    out = cm.SharedArray.zeros(x.shape)
    try:
        got = cm.explain(x, dec2, run=True, backend="processes", workers=2, out=out)
        assert got.bytes_shared == 0
    finally:
        x.unlink()
        out.unlink()


def test_errors_are_the_same_while_recording():
    def bad(v):
        if v > 50.0:
            raise ValueError("too big")
        return v

    x = np.arange(100.0)
    with pytest.raises(ValueError, match="too big") as caught:
        cm.explain(x, bad, run=True, workers=2)
    assert "(51,)" in "".join(getattr(caught.value, "__notes__", ["(51,)"]))
    assert _insights.active() is None  # the recorder is gone after a failure too


def test_bad_input_raises_before_running():
    with pytest.raises(ValueError, match="schedule"):
        cm.explain(np.ones(3), wavy, run=True, schedule="nope")


def test_hook_is_a_no_op_outside_a_recorded_run():
    def task(job, caller):
        pass

    assert _insights.observed(task, object()) is task


def test_containers_are_run_and_rebuilt():
    pd = pytest.importorskip("pandas")
    da = pytest.importorskip("dask.array")
    s = pd.Series(_x(3000), name="s")
    got = cm.explain(s, wavy, run=True)
    pd.testing.assert_series_equal(got.result, cm.parallel_map(s, wavy))
    assert sum(w.elements for w in got.workers) == s.size
    lazy = da.from_array(_x(3000), chunks=1000)
    got = cm.explain(lazy, wavy, run=True)
    assert isinstance(got.result, np.ndarray) and got.calls == 3
    assert sum(w.elements for w in got.workers) == 3000
