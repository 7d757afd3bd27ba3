"""First call of W2 in a fresh process: empty kernel cache, warm cache, and Numba's own.

Each row starts new interpreters (interleaved, ``--repeat`` times, medians) and
times the first ``parallel_map(x, w2)`` on 10^6 float64 elements after
``import numba`` (so Numba's import, paid by any Numba user, is not counted):

* cold:  an empty cache directory (compile, then save);
* warm:  the directory the previous run filled (load the machine code);
* numba: a bare ``@numba.njit(cache=True)`` W2 on one element, warm, for scale:
  what is left of a warm call is mostly Numba's own start-up.

The cache lives in a temporary directory, never in the user's.

Run: python benchmarks/bench_kernel_cache.py [--repeat 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

COREMAP = textwrap.dedent("""
    import json, time
    import numpy as np, numba, coremap as cm
    from coremap._workloads import w2
    x = np.random.default_rng(0).random(10**6)
    t = time.perf_counter()
    cm.parallel_map(x, w2)
    print(json.dumps(time.perf_counter() - t))
""")

NUMBA = textwrap.dedent("""
    import json, time
    import numpy as np, numba
    import nbw2
    t = time.perf_counter()
    nbw2.w2(0.5)
    print(json.dumps(time.perf_counter() - t))
""")

NBW2 = textwrap.dedent("""
    import numpy as np, numba

    @numba.njit(cache=True, nogil=True)
    def w2(v):
        return np.sin(v) * np.exp(-v * v) + np.sqrt(v)
""")


def _time(code, env):
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = {"cold": [], "warm": [], "numba": []}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "nbw2.py"), "w") as f:
            f.write(NBW2)
        nb_env = dict(os.environ, PYTHONPATH=tmp, NUMBA_CACHE_DIR=os.path.join(tmp, "nb"))
        _time(NUMBA, nb_env)  # fill Numba's own cache
        for k in range(args.repeat):
            env = dict(os.environ, COREMAP_CACHE_DIR=os.path.join(tmp, f"c{k}"))
            rows["cold"].append(_time(COREMAP, env))
            rows["warm"].append(_time(COREMAP, env))
            rows["numba"].append(_time(NUMBA, nb_env))
    for name, times in rows.items():
        print(f"{name:>5}: median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)})")


if __name__ == "__main__":
    main()
