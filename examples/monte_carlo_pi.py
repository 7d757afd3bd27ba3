"""Monte-Carlo pi with parallel_reduce: count the random points inside the unit circle.

The test inside the circle is fused into the sum: no array of booleans is made,
and the count is the same on any number of workers.
"""
import numpy as np

import coremap as cm


def inside(x, y):
    return x * x + y * y <= 1.0


if __name__ == "__main__":
    n = 4_000_000
    rng = np.random.default_rng(42)
    x, y = rng.random(n), rng.random(n)
    hits = cm.parallel_reduce((x, y), inside, op="sum")  # bools sum as int64, as np.sum
    print(f"points inside: {hits} of {n}")
    print(f"pi is about {4.0 * hits / n:.3f}")
    same = all(cm.parallel_reduce((x, y), inside, workers=w) == hits for w in (1, 2, 3))
    print(f"same count on 1, 2 and 3 workers: {same}")
