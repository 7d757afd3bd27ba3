"""Compiled kernels cached on disk: hits across processes, misses whenever anything changed.

Each case runs a script in fresh interpreters sharing one cache directory (a
temporary one) and counts Numba's compile events during the first call: a hit
compiles nothing, a miss compiles. Results are always checked against NumPy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import coremap as cm
from coremap import _config
from coremap._kernels import _diskcache

pytestmark = pytest.mark.timeout(300)

RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import coremap as cm
    from numba.core import event
    {prelude}
    import fmod
    x = np.linspace(0.0, 2.0, 5000).astype(sys.argv[1])
    mode = sys.argv[2]
    with event.install_recorder("numba:compile") as rec:
        if mode == "map":
            y = cm.parallel_map(x, fmod.f)
        elif mode == "reduce":
            y = cm.parallel_reduce(x.reshape(50, 100), fmod.f, "max", axis=1)
        elif mode == "reduce-inputs":
            y = cm.parallel_reduce(x.reshape(50, 100), None, "sum", axis=1)
        else:  # several outputs
            y = np.concatenate(cm.parallel_map(x, fmod.g))
    compiles = sum(1 for _, ev in rec.buffer if ev.is_start)
    print(json.dumps({{"compiles": compiles, "y": np.asarray(y).astype(float).tolist()}}))
""")


def _module(path, body):
    path.joinpath("fmod.py").write_text(textwrap.dedent(body))


def _run(tmp_path, dtype="float64", prelude="", mode="map"):
    env = dict(os.environ, COREMAP_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(prelude=prelude))
    proc = subprocess.run([sys.executable, str(script), dtype, mode], capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["compiles"], np.array(out["y"])


def _x(dtype="float64"):
    return np.linspace(0.0, 2.0, 5000).astype(dtype)


POLY = """
    SCALE = 2.0

    def helper(v):
        return v * v

    def f(v):
        return SCALE * helper(v) + 1.0

    def g(v):
        return f(v), v
"""


def test_hit_in_a_fresh_process(tmp_path):
    _module(tmp_path, POLY)
    cold, y1 = _run(tmp_path)
    warm, y2 = _run(tmp_path)
    assert cold > 0 and warm == 0
    np.testing.assert_array_equal(y1, 2.0 * _x() ** 2 + 1.0)
    np.testing.assert_array_equal(y2, y1)


@pytest.mark.parametrize("mode", ["reduce", "reduce-inputs", "several"])
def test_reduction_and_several_output_kernels_hit_too(tmp_path, mode):
    _module(tmp_path, POLY)
    cold, y1 = _run(tmp_path, mode=mode)
    warm, y2 = _run(tmp_path, mode=mode)
    assert cold > 0 and warm == 0
    m = _x().reshape(50, 100)
    want = {"reduce": (2.0 * m**2 + 1.0).max(axis=1), "reduce-inputs": m.sum(axis=1),
            "several": np.concatenate([2.0 * _x() ** 2 + 1.0, _x()])}[mode]
    np.testing.assert_allclose(y1, want, rtol=1e-13)
    np.testing.assert_array_equal(y2, y1)


def test_changed_function_misses(tmp_path):
    _module(tmp_path, POLY)
    _run(tmp_path)
    _module(tmp_path, POLY.replace("v * v", "v * v * v"))
    compiles, y = _run(tmp_path)
    assert compiles > 0
    np.testing.assert_allclose(y, 2.0 * _x() ** 3 + 1.0)


def test_changed_global_misses(tmp_path):
    _module(tmp_path, POLY)
    _run(tmp_path)
    _module(tmp_path, POLY.replace("SCALE = 2.0", "SCALE = 3.0"))
    compiles, y = _run(tmp_path)
    assert compiles > 0
    np.testing.assert_array_equal(y, 3.0 * _x() ** 2 + 1.0)
    assert _run(tmp_path)[0] == 0  # and the new value is cached in turn


def test_other_dtype_misses_then_hits(tmp_path):
    _module(tmp_path, POLY)
    _run(tmp_path, "float64")
    compiles, y = _run(tmp_path, "float32")
    assert compiles > 0
    np.testing.assert_allclose(y, 2.0 * _x("float32").astype(float) ** 2 + 1.0, rtol=1e-6)
    assert _run(tmp_path, "float32")[0] == 0 and _run(tmp_path, "float64")[0] == 0


@pytest.mark.parametrize("prelude", [
    "import importlib.metadata as m; real = m.version; "
    "m.version = lambda d: '99.0' if d == 'coremap' else real(d)",
    "import numba; numba.__version__ = '0.0.1'",
], ids=["coremap", "numba"])
def test_other_version_misses(tmp_path, prelude):
    _module(tmp_path, POLY)
    _run(tmp_path)
    compiles, y = _run(tmp_path, prelude=prelude)
    assert compiles > 0
    np.testing.assert_array_equal(y, 2.0 * _x() ** 2 + 1.0)


def test_notebook_cell_rerun_hits(tmp_path):
    # A notebook compiles each run of a cell under a new file name.
    cell = "def f(v):\n    return v * 0.5 + 2.0\n"
    _module(tmp_path, f"""
        import sys
        ns = {{"__name__": "__main__"}}
        exec(compile({cell!r}, "<ipython-input-" + str(id(ns)) + ">", "exec"), ns)
        f = ns["f"]
    """)
    cold, y = _run(tmp_path)
    warm, _ = _run(tmp_path)
    assert cold > 0 and warm == 0
    np.testing.assert_array_equal(y, _x() * 0.5 + 2.0)


def test_global_array_is_never_cached(tmp_path):
    # The compiled code holds the array's address: such kernels stay in memory.
    body = """
        import numpy as np
        TABLE = np.array([{v}, 1.0])

        def f(v):
            return v + TABLE[0]
    """
    _module(tmp_path, body.format(v=5.0))
    first, y1 = _run(tmp_path)
    _module(tmp_path, body.format(v=7.0))
    second, y2 = _run(tmp_path)
    assert first > 0 and second > 0
    np.testing.assert_array_equal(y1, _x() + 5.0)
    np.testing.assert_array_equal(y2, _x() + 7.0)


def test_corrupt_cache_files_are_misses(tmp_path):
    _module(tmp_path, POLY)
    _run(tmp_path)
    for entry in (tmp_path / "cache" / "kernels").iterdir():
        entry.write_bytes(b"not a cache file")
    compiles, y = _run(tmp_path)
    assert compiles > 0
    np.testing.assert_array_equal(y, 2.0 * _x() ** 2 + 1.0)


def test_unwritable_cache_dir_still_computes(tmp_path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    _module(tmp_path, POLY)
    compiles, y = _run(tmp_path)
    assert compiles > 0
    np.testing.assert_array_equal(y, 2.0 * _x() ** 2 + 1.0)


# -- in this process: keys, directory, info, clearing -----------------------------------------

def test_keys_follow_code_globals_and_versions(monkeypatch):
    ns: dict = {"K": 2.0}
    exec("def f(v):\n    return v * K\n", ns)
    key = _diskcache.key_of_function(ns["f"])
    assert key is not None and key == _diskcache.key_of_function(ns["f"])
    ns["K"] = 3.0
    assert _diskcache.key_of_function(ns["f"]) != key
    ns["K"] = 2.0
    assert _diskcache.key_of_function(ns["f"]) == key
    ns["K"] = np.ones(3)  # an array: compiled by address, never keyed
    assert _diskcache.key_of_function(ns["f"]) is None
    ns["K"] = 2.0
    import numba

    _diskcache._base.cache_clear()
    monkeypatch.setattr(numba, "__version__", "0.0.1")
    try:
        assert _diskcache.key_of_function(ns["f"]) != key
    finally:
        monkeypatch.undo()
        _diskcache._base.cache_clear()
    assert _diskcache.key_of_function(ns["f"]) == key


def test_cache_dir_follows_platform_and_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("COREMAP_CACHE_DIR")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _config.cache_dir() == str(tmp_path / "xdg" / "coremap")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _config.cache_dir() == os.path.expanduser("~/.cache/coremap")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _config.cache_dir() == os.path.expanduser("~/Library/Caches/coremap")
    monkeypatch.setenv("COREMAP_CACHE_DIR", str(tmp_path / "mine"))
    assert _config.cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("COREMAP_CACHE_DIR", "off")
    assert _config.cache_dir() is None and _diskcache.directory() is None


def test_off_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("COREMAP_CACHE_DIR", "off")
    ns: dict = {}
    exec("def g(v):\n    return v * 7.0 - 1.0\n", ns)
    np.testing.assert_array_equal(cm.parallel_map(_x(), ns["g"]), _x() * 7.0 - 1.0)
    assert "off" in _diskcache.describe()


def test_info_shows_and_clear_cache_empties(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("COREMAP_CACHE_DIR", str(tmp_path))
    ns: dict = {}
    exec("def h(v):\n    return v * 9.0 + 4.0\n", ns)
    cm.parallel_map(_x(), ns["h"])
    path, files, size = _diskcache.usage()
    assert path == str(tmp_path / "kernels") and files >= 2 and size > 0
    from coremap import _info

    assert _info.collect()["kernel cache"].startswith(str(tmp_path / "kernels"))
    from coremap._cli import main

    assert main(["cache"]) == 0 and str(tmp_path) in capsys.readouterr().out
    assert cm.clear_cache() == size
    assert _diskcache.usage()[1:] == (0, 0)
