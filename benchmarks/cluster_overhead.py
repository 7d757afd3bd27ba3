"""W2 at 10^7 on local threads, a 2-engine ipyparallel cluster and a 2-worker dask
cluster, in one run: the values must be identical, and the cluster overhead shows.

Run: pip install ".[cluster]" && python benchmarks/cluster_overhead.py
"""
from distributed import Client, LocalCluster

import coremap as cm
from coremap import _workloads as w
from coremap._bench import median_time

if __name__ == "__main__":
    x = w.data(10**7)
    local = cm.parallel_map(x, w.w2)
    with cm.cluster.local(2) as rc, \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc, \
            Client(lc) as c:
        a = cm.parallel_map(x, w.w2, backend=rc)
        b = cm.parallel_map(x, w.w2, backend=c)
        print("identical: ipyparallel", a.tobytes() == local.tobytes(),
              "dask", b.tobytes() == local.tobytes())
        t_local = median_time(lambda: cm.parallel_map(x, w.w2))
        t_ipp = median_time(lambda: cm.parallel_map(x, w.w2, backend=rc))
        t_dask = median_time(lambda: cm.parallel_map(x, w.w2, backend=c))
        print(f"W2 1e7: local threads {t_local * 1e3:.0f} ms, "
              f"ipyparallel 2 engines {t_ipp * 1e3:.0f} ms ({t_ipp / t_local:.2f}x), "
              f"dask 2 workers {t_dask * 1e3:.0f} ms ({t_dask / t_local:.2f}x)")
