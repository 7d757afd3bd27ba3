"""Clusters: start a local ipyparallel cluster, or pass any cluster client to ``parallel_map``.

>>> import numpy as np, coremap as cm
>>> with cm.cluster.local(2) as rc:                       # doctest: +SKIP
...     y = cm.parallel_map(np.arange(10.0), np.sqrt, backend=rc)

``parallel_map(..., backend=client)`` accepts an ``ipyparallel.Client``, a
``DirectView`` or ``LoadBalancedView``, or a ``dask.distributed.Client``
(see ``coremap/engines/_cluster.py``). Install them with
``pip install "coremap[cluster]"``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from coremap.engines import CLUSTER_INSTALL as INSTALL

__all__ = ["local"]


@contextlib.contextmanager
def local(n: int = 2, timeout: float = 120.0) -> Iterator[object]:
    """Start a local ipyparallel cluster of ``n`` engines and yield a connected Client.

    What ``ipcluster start -n N`` does, as a context manager: the controller and
    the engines are stopped on exit, also when the body raises, and no process
    is left behind.

    Parameters
    ----------
    n : int
        Number of engines.
    timeout : float
        Seconds to wait for the engines to register.

    Yields
    ------
    ipyparallel.Client
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    try:
        import ipyparallel as ipp
    except ImportError as exc:
        raise ImportError(f"coremap.cluster.local needs ipyparallel: {INSTALL}") from exc
    cluster = ipp.Cluster(n=n, log_level=40)
    client = None
    try:
        client = cluster.start_and_connect_sync()
        client.wait_for_engines(n, timeout=timeout)
        yield client
    finally:
        if client is not None:
            client.close()
        cluster.stop_cluster_sync()
