"""The tutorial's IPython parallel section, done for real, then the same work with coremap.

`coremap.cluster.local(2)` does what `ipcluster start -n 2` does and stops the
controller and engines on exit. Needs: pip install "coremap[cluster]".
"""
import math

import numpy as np

import coremap as cm


def f(v):  # a function from this script: it travels by value, math comes along
    return math.sqrt(v) + 1.0


if __name__ == "__main__":
    with cm.cluster.local(2) as rc:
        print(f"engines: {rc.ids}")

        # the direct interface: commands and data to each engine
        dview = rc.direct_view("all")
        dview.execute("a = 1").get(timeout=60)
        print(f"pull a: {dview.pull('a').get(timeout=60)}")
        dview.push({"a": 2}).get(timeout=60)
        print(f"after push, pull a: {dview.pull('a').get(timeout=60)}")

        # the task interface: load balanced, resubmits failed tasks
        tview = rc.load_balanced_view()
        print(f"map: {tview.map_sync(lambda x: x * x, range(5))}")
        print(f"apply: {tview.apply_sync(pow, 2, 10)}")

        # the same element-wise work as one call: chunks balanced across the engines
        x = np.arange(10.0)
        y = cm.parallel_map(x, f, backend=rc)
        print(f"parallel_map on the cluster: {y.round(3).tolist()}")
        assert np.array_equal(y, cm.parallel_map(x, f))  # the same as on this machine
