"""Where shared memory starts to beat the pipe for coremap.Pool arguments and results.

Pool.map of ``a * 2.0`` over 16 arrays of each size, with the shared-memory
threshold forced to 0 (every array through a segment) and to infinity (every
array pickled through the pipe), timed interleaved, medians. coremap.pool's
SHARE_BYTES is set where the segment path starts to win.

Run: python benchmarks/bench_pool_threshold.py
"""
import numpy as np

import coremap as cm
from coremap import pool as cm_pool
from coremap._bench import median_time


def double(a):
    return a * 2.0


def with_threshold(p, arrays, threshold):
    def run():
        old = cm_pool.SHARE_BYTES
        cm_pool.SHARE_BYTES = threshold
        try:
            return p.map(double, arrays, chunksize=1)
        finally:
            cm_pool.SHARE_BYTES = old

    return run


if __name__ == "__main__":
    print(f"{'array size':>12} {'pipe':>10} {'shared':>10}  shared/pipe")
    with cm.Pool(2) as p:
        for kib in (16, 64, 128, 256, 512, 1024, 4096):
            arrays = [np.random.default_rng(i).random(kib * 128) for i in range(16)]
            pipe = with_threshold(p, arrays, 1 << 62)
            shared = with_threshold(p, arrays, 0)
            pipe()
            shared()
            t_pipe, t_shared = [], []
            for _ in range(5):
                t_pipe.append(median_time(pipe, 3))
                t_shared.append(median_time(shared, 3))
            a, b = np.median(t_pipe), np.median(t_shared)
            print(f"{kib:>9} KiB {a * 1e3:>8.2f}ms {b * 1e3:>8.2f}ms  {b / a:.2f}")
