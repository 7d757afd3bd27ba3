"""Typing of the public API: ``mypy --strict`` on a user script, as a user would run it.

The script below touches every public name of ``coremap``; a second script makes
the mistakes the annotations exist to catch (a misspelt ``schedule`` or
``backend``) and must be rejected. Skipped where mypy is not installed (the
``test`` extra installs it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy")

USER_SCRIPT = '''
from __future__ import annotations

import multiprocessing

import numpy as np
import numpy.typing as npt

import coremap as cm
from coremap.kernels import Affine


def square(v: float) -> float:
    return v * v


def two(v: float) -> tuple[float, float]:
    return v, 2.0 * v


def main() -> None:
    x: npt.NDArray[np.float64] = np.linspace(0.0, 1.0, 1000)
    y: npt.NDArray[np.float64] = np.ones(1000)

    z: np.ndarray = cm.parallel_map(x, square)
    z = cm.parallel_map((x, y, 2.0), np.power, dtype=np.float32, schedule="dynamic",
                        backend="threads", workers=2, chunk_size=64, progress=False,
                        timeout=10.0, retries=0)
    z = cm.parallel_map(x, np.sin, vectorized=True, backend="serial", schedule="static")
    pair: tuple[np.ndarray, ...] = cm.parallel_map(x, two)
    q, r = cm.parallel_map((x, 3.0), np.divmod)
    both = cm.parallel_map(x, two, out=(np.empty(1000), np.empty(1000)))
    print(len(pair), q.shape, r.shape, len(both))

    out = cm.SharedArray.zeros((1000,))
    same: cm.SharedArray = cm.parallel_map(x, cm.kernels.affine(2.0, 1.0), out=out,
                                           backend="processes")
    kernel: Affine = cm.kernels.Affine(1.0, 0.5)
    plan: cm.Plan = cm.explain(x, kernel, schedule="guided", workers=2)
    insights: cm.Insights = cm.explain(x, square, run=True)
    print(plan, insights, same.name, z.shape)

    total = cm.parallel_reduce(x, square, "sum", backend="threads", schedule="static")
    rows: np.ndarray = cm.parallel_reduce(x.reshape(10, 100), op=np.maximum, axis=1,
                                          out=np.empty(10))
    print(float(total), rows.shape)

    with cm.config(workers=2, backend="auto"):
        cm.parallel_map(x, square)

    shared = cm.SharedArray.from_array(x)
    with shared.lock:
        shared[0] = 1.0
    lock: cm.SharedLock = shared.lock
    if lock.acquire(timeout=1.0):
        lock.release()
    shared.close()
    removed = cm.cleanup_stale()
    freed: int = cm.clear_cache()
    print(removed, freed)

    try:
        cm.parallel_map(x, square)
    except cm.WorkerCrashedError as exc:
        print(exc)
    except cm.RemoteError as exc:
        print(exc)
    print(cm.__version__, cm.CoremapWarning, multiprocessing.cpu_count())


if __name__ == "__main__":
    main()
'''

POOL_SCRIPT = '''
from __future__ import annotations

import coremap as cm


def square(v: float) -> float:
    return v * v


def add(a: int, b: int) -> int:
    return a + b


def main() -> None:
    with cm.Pool(2) as pool:
        squares: list[float] = pool.map(square, [1.0, 2.0, 3.0])
        sums: list[int] = pool.starmap(add, [(1, 2), (3, 4)])
        pending = pool.apply_async(add, (1, 2))
        three: int = pending.get(timeout=10)
        for item in pool.imap(square, [1.0, 2.0], chunksize=1):
            print(item + 1.0)
        for item in pool.imap_unordered(square, [1.0, 2.0]):
            print(item + 1.0)
        print(squares, sums, three, pool.map_async(square, [1.0]).get(10))

'''

MISTAKES = '''
import numpy as np
import coremap as cm

x = np.ones(10)
cm.parallel_map(x, np.sqrt, schedule="guidedd")
cm.parallel_map(x, np.sqrt, backend="thread")
cm.explain(x, np.sqrt, workers="2")
y: int = cm.parallel_map(x, np.sqrt)
cm.parallel_reduce(x, op="average")
def two(v: float) -> tuple[float, float]:
    return v, v
z: np.ndarray = cm.parallel_map(x, two)
'''


def _mypy(tmp_path, source: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(source))
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
           "--cache-dir", str(tmp_path / ".mypy_cache"), "--no-error-summary",
           "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}", str(script)]
    # run from tmp_path, so mypy finds the installed coremap, not a source tree
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=280,
                          env=env)


@pytest.mark.timeout(300)
def test_mypy_strict_accepts_a_user_script(tmp_path):
    res = _mypy(tmp_path, USER_SCRIPT)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_accepts_pool_usage(tmp_path):
    res = _mypy(tmp_path, POOL_SCRIPT)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_rejects_misspelt_options(tmp_path):
    res = _mypy(tmp_path, MISTAKES)
    lines = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert res.returncode == 1, res.stdout + res.stderr
    # one error on each wrong line (6..10, and 13: two outputs are a tuple), none elsewhere
    assert sorted({int(line.split(":")[1]) for line in lines}) == [6, 7, 8, 9, 10, 13], \
        res.stdout
