"""coremap: element-wise work over NumPy arrays on every core.

>>> import numpy as np, coremap as cm
>>> y = cm.parallel_map(np.arange(4.0), lambda v: v * v)

See :func:`parallel_map`, :func:`explain` and :func:`config`.
"""
from coremap import kernels
from coremap._api import CoremapWarning, explain, parallel_map
from coremap._config import config
from coremap._errors import BackendUnavailableError, RemoteError, WorkerCrashedError
from coremap._plan import Plan
from coremap.pool import Pool
from coremap.shared import SharedArray, SharedLock, cleanup_stale

__version__ = "0.1.0"

__all__ = [
    "parallel_map",
    "explain",
    "config",
    "kernels",
    "Plan",
    "CoremapWarning",
    "BackendUnavailableError",
    "WorkerCrashedError",
    "RemoteError",
    "Pool",
    "SharedArray",
    "SharedLock",
    "cleanup_stale",
    "__version__",
]
