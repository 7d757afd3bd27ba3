"""Public exceptions. Each subclasses a stdlib type so existing ``except`` clauses work."""


class BackendUnavailableError(RuntimeError):
    """The requested backend is not available in this installation or version."""


class WorkerCrashedError(RuntimeError):
    """A worker process died while computing a chunk (SIGKILL, segfault, OOM)."""
