"""``coremap demo`` times NumPy as it times coremap, and names each row's baseline."""
from __future__ import annotations

import io
import time

from coremap import _demo, _workloads


def test_numpy_is_the_median_of_warm_runs_even_when_slow(monkeypatch):
    """A slow first NumPy call (cold pages) must not be the figure the demo reports."""
    calls = {"w2": 0, "w3": 0}

    def counted(name, reference):
        def run(x):
            calls[name] += 1
            if calls[name] == 1:
                time.sleep(1.05)  # the cold first call: slower than the old one-run cut-off
            return reference(x)
        return run

    monkeypatch.setattr(_workloads, "w2_numpy", counted("w2", _workloads.w2_numpy))
    monkeypatch.setattr(_workloads, "w3_numpy", counted("w3", _workloads.w3_numpy))
    out = io.StringIO()
    rows = _demo.run(n_w2=20_000, n_w3=2_000, repeat=3, file=out)
    assert calls == {"w2": 4, "w3": 4}  # one untimed call, then three timed ones
    for row in rows:
        assert row["ok"]
        assert row["numpy"] < 1.0, row  # the median of warm runs, not the 1.05 s cold one
    text = out.getvalue()
    assert "median of 3 warm calls" in text
    assert "W2: the same formula as NumPy array expressions" in text
    assert "W3: a different algorithm" in text
