"""The same work on dask.distributed: pass the Client as the backend.

Needs: pip install "coremap[cluster]".
"""
import math

import numpy as np
from distributed import Client, LocalCluster

import coremap as cm


def f(v):
    return math.sqrt(v) + 1.0


if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        x = np.arange(10.0)
        y = cm.parallel_map(x, f, backend=client)
        print(f"parallel_map on dask: {y.round(3).tolist()}")
        print(cm.explain(x, f, backend=client))
