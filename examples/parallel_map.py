"""The same work as one call: coremap.parallel_map compiles square and uses every core."""
import numpy as np

import coremap as cm


def square(x):
    return x * x


if __name__ == "__main__":
    inputs = np.arange(10)
    outputs = cm.parallel_map(inputs, square)
    print(f"Output: {outputs.tolist()}")
    print(cm.explain(inputs, square))
