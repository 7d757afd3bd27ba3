"""The command line: demo, info, bench (tiny sizes), python -m coremap."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coremap import _cli


def test_demo_small(capsys):
    assert _cli.main(["demo", "--n-w2", "200000", "--n-w3", "20000", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "W2" in out and "W3" in out
    assert out.count("ok (") == 2


def test_info(capsys):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("usable cores", "compiled extension", "numba", "/dev/shm", "engines"):
        assert key in out
    assert "loaded" in out


def test_bench_one_workload(capsys, tmp_path):
    path = tmp_path / "rows.json"
    assert _cli.main(["bench", "--quick", "--workload", "W5", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "W5" in out and "coremap" in out
    rows = json.loads(path.read_text())["rows"]
    assert {r["contender"] for r in rows} >= {"numpy", "coremap"}


def test_bench_rejects_unknown_workload(capsys):
    assert _cli.main(["bench", "--workload", "W99"]) == 2


@pytest.mark.timeout(120)
def test_python_m_coremap():
    res = subprocess.run([sys.executable, "-m", "coremap", "info"], capture_output=True,
                         text=True, timeout=100)
    assert res.returncode == 0 and "usable cores" in res.stdout
    res = subprocess.run([sys.executable, "-m", "coremap"], capture_output=True, text=True,
                         timeout=100)
    assert res.returncode == 2 and "usage" in res.stderr


@pytest.mark.timeout(120)
def test_import_is_light():
    """import coremap imports neither Numba nor a cluster engine."""
    code = ("import sys, coremap; "
            "print(sorted(m for m in ('numba', 'ipyparallel', 'dask', 'distributed', 'tqdm') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
