"""parallel_map on real local clusters: ipyparallel (2 engines) and dask.distributed (2 workers)."""
from __future__ import annotations

import os
import signal
import time
import types
import warnings

import numpy as np
import pytest

import coremap as cm
from coremap import _workloads

ipp = pytest.importorskip("ipyparallel")
distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(180)


def _gone(pids, seconds=15.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def rc():
    with cm.cluster.local(2) as client:
        pids = client[:].apply_sync(os.getpid)
        yield client
    assert _gone(pids), "an ipyparallel engine outlived the cluster"


@pytest.fixture(scope="module")
def dask_client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as lc, \
            distributed.Client(lc) as client:
        pids = list(client.run(os.getpid).values())
        yield client
    assert _gone(pids), "a dask worker outlived the cluster"


@pytest.fixture(scope="module", autouse=True)
def clusters(rc, dask_client):
    """Both clusters start before any test's leak check takes its snapshot."""
    yield


@pytest.fixture(params=["ipp-client", "ipp-direct", "ipp-balanced", "dask"])
def backend(request):
    if request.param == "dask":
        return request.getfixturevalue("dask_client")
    client = request.getfixturevalue("rc")
    return {"ipp-client": client, "ipp-direct": client[:],
            "ipp-balanced": client.load_balanced_view()}[request.param]


def test_w2_matches_local_engines(backend):
    x = _workloads.data(200_000)
    want = cm.parallel_map(x, _workloads.w2)
    got = cm.parallel_map(x, _workloads.w2, backend=backend)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def local_helper(v):
    """Defined in a test module: travels by value (engines cannot import tests)."""
    return v * 3.0 + 1.0


def test_kernel_kinds_and_layouts(backend):
    x = np.asfortranarray(_workloads.data(6000).reshape(60, 100))
    np.testing.assert_array_equal(cm.parallel_map(x, local_helper, backend=backend),
                                  x * 3.0 + 1.0)
    np.testing.assert_array_equal(cm.parallel_map((x, 2.0), np.power, backend=backend),
                                  x ** 2.0)
    np.testing.assert_array_equal(
        cm.parallel_map(x[::2], lambda c: c + 1, vectorized=True, backend=backend), x[::2] + 1)
    np.testing.assert_array_equal(
        cm.parallel_map(x, cm.kernels.affine(2.0, 1.0), backend=backend), 2.0 * x + 1.0)
    table = {0: 1.5}
    np.testing.assert_array_equal(
        cm.parallel_map(x[:3], lambda v: table[0] + float(str(v)[:1]), backend=backend),
        np.full((3, 100), 1.5))
    out = np.empty((60, 100))
    assert cm.parallel_map(x, local_helper, out=out, backend=backend) is out


def fails(c):
    raise KeyError("remote failure")


def test_exception_type(backend):
    with pytest.raises(KeyError, match="remote failure"):
        cm.parallel_map(np.arange(100.0), fails, vectorized=True, backend=backend)


def fail_once(c, marker_dir):
    marker = os.path.join(marker_dir, f"chunk-{int(c[0])}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    return c * 2


@pytest.mark.parametrize("which", ["ipp", "dask"])
def test_retries(which, tmp_path, request):
    client = request.getfixturevalue("rc" if which == "ipp" else "dask_client")
    x = np.arange(1000.0)
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    os.mkdir(first)
    os.mkdir(second)
    with pytest.raises(RuntimeError, match="first attempt"):
        cm.parallel_map(x, lambda c: fail_once(c, first), vectorized=True, backend=client)
    got = cm.parallel_map(x, lambda c: fail_once(c, second), vectorized=True,
                          backend=client, retries=1)
    np.testing.assert_array_equal(got, x * 2)


def slow_chunk(c):
    time.sleep(0.5)
    return c


def test_dask_worker_killed_midcall(dask_client):
    pids = list(dask_client.run(os.getpid).values())
    x = np.arange(4000.0)

    def kill_later():
        time.sleep(0.3)
        os.kill(pids[0], signal.SIGKILL)

    import threading

    threading.Thread(target=kill_later).start()
    t = time.perf_counter()
    try:
        got = cm.parallel_map(x, slow_chunk, vectorized=True, backend=dask_client)
    except cm.WorkerCrashedError:
        pass  # reported, not hung
    else:
        np.testing.assert_array_equal(got, x)  # re-run elsewhere
    assert time.perf_counter() - t < 10.0 + 4 * 0.5
    dask_client.wait_for_workers(2, timeout=30)


def test_rejects_other_objects():
    with pytest.raises(TypeError, match='pip install "coremap\\[cluster\\]"'):
        cm.parallel_map(np.arange(3.0), np.sqrt, backend=object())
    with pytest.raises(ValueError, match="retries"):
        cm.parallel_map(np.arange(3.0), np.sqrt, retries=1)
    with pytest.raises(ValueError, match="retries must be"):
        cm.parallel_map(np.arange(3.0), np.sqrt, retries=-1)


def test_insecure_dask_address_warns():
    from coremap.engines import _cluster

    fake = types.SimpleNamespace(scheduler=types.SimpleNamespace(address="tcp://10.1.2.3:8786"))
    with pytest.warns(cm.CoremapWarning, match="neither on loopback nor TLS"):
        _cluster._check_dask_security(fake)
    for address in ("tcp://127.0.0.1:8786", "tls://10.1.2.3:8786", "tcp://localhost:1"):
        fake.scheduler.address = address
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _cluster._check_dask_security(fake)


def test_connection_files_stay_private(rc):
    """ipyparallel's defaults are kept: connection files 0600 in a 0700 directory."""
    import glob

    security = glob.glob(os.path.join(os.path.expanduser("~"), ".ipython", "profile_*",
                                      "security"))
    files = [f for d in security for f in glob.glob(os.path.join(d, "ipcontroller-*.json"))]
    assert files, "no connection file found"
    for d in security:
        assert os.stat(d).st_mode & 0o077 == 0, d
    for f in files:
        assert os.stat(f).st_mode & 0o077 == 0, f


def _kill_soon(pid):
    import threading

    threading.Thread(target=lambda: (time.sleep(0.3), os.kill(pid, signal.SIGKILL))).start()


def test_ipp_engine_killed_midcall_is_rerun():
    with cm.cluster.local(2) as client:  # its own cluster: this test kills an engine
        pids = client[:].apply_sync(os.getpid)
        x = np.arange(4000.0)
        _kill_soon(pids[0])
        t = time.perf_counter()
        got = cm.parallel_map(x, slow_chunk, vectorized=True, backend=client, retries=1)
        np.testing.assert_array_equal(got, x)  # re-run on the other engine
        assert time.perf_counter() - t < 10.0 + 4 * 0.5
        _kill_soon(pids[1])  # the last engine: an error, not a hang
        with pytest.raises(cm.WorkerCrashedError):
            cm.parallel_map(x, slow_chunk, vectorized=True, backend=client, retries=1)
    assert _gone(pids)


def pair_helper(v):
    return v * 2.0, v - 1.0


def test_parallel_reduce_and_several_outputs(backend):
    # per-slab partials folded in the parent: the same bits as the local engines
    x = _workloads.data(300_000).reshape(3, 100_000)
    for op, axis in (("sum", None), ("max", 1), ("argmin", 1)):
        want = cm.parallel_reduce(x, local_helper, op=op, axis=axis)
        got = cm.parallel_reduce(x, local_helper, op=op, axis=axis, backend=backend)
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    a, b = cm.parallel_map(x, pair_helper, backend=backend)
    np.testing.assert_array_equal(a, x * 2.0)
    np.testing.assert_array_equal(b, x - 1.0)
