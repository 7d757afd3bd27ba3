"""Every program in examples/ runs and prints what the tutorial shows."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "process_subclass.py": ["I'm the process with id: 0", "I'm the process with id: 1",
                            "Written by the children: [0, 10]"],
    "pool_map.py": ["Input: [0, 1, 2, 3, 4]", "Output: [0, 1, 4, 9, 16]"],
    "pool_map_async.py": ["Output: [0, 1, 4, 9, 16]"],
    "pool_apply_async.py": ["Output: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"],
    "parallel_map.py": ["Output: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"],
    "ipyparallel_cluster.py": ["engines: [0, 1]", "pull a: [1, 1]", "after push, pull a: [2, 2]",
                               "map: [0, 1, 4, 9, 16]", "apply: 1024",
                               "parallel_map on the cluster: [1.0, 2.0, 2.414"],
    "monte_carlo_pi.py": ["points inside: 3142616 of 4000000", "pi is about 3.143",
                          "same count on 1, 2 and 3 workers: True"],
    "black_scholes.py": ["put-call parity holds: True", "matches the sum of the prices: True",
                         "same put prices as the single-output function: True"],
    "dask_cluster.py": ["parallel_map on dask: [1.0, 2.0, 2.414", "engine   : dask.distributed"],
}
CLUSTER = {"ipyparallel_cluster.py": "ipyparallel", "dask_cluster.py": "distributed"}


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name):
    if name in CLUSTER:
        pytest.importorskip(CLUSTER[name])
    res = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                         timeout=100, cwd=EXAMPLES)
    assert res.returncode == 0, res.stderr
    for line in EXPECTED[name]:
        assert line in res.stdout
    assert "Traceback" not in res.stderr
