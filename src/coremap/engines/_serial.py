"""The serial engine: every chunk in the calling thread.

    engine.execute(call) (_base.py: operands, job, task) ──> SerialEngine.run
      └─ task(job, caller=True) until no chunk is left

Progress is reported by the task between chunks (``job.monitor``), as on threads.
"""
from __future__ import annotations

import threading
import time

from coremap.engines._base import POLL_S, InProcessEngine


class SerialEngine(InProcessEngine):
    name = "serial"

    def run(self, job, task, workers: int = 1, on_progress=None, timeout=None,
            poll: float = POLL_S) -> None:
        """Run ``task`` in the calling thread until the job is finished."""
        job.event = threading.Event()
        if on_progress is not None:
            last = [time.monotonic()]

            def monitor():
                now = time.monotonic()
                if now - last[0] >= poll:
                    last[0] = now
                    on_progress(job.done)

            job.monitor = monitor
        task(job, True)
        if on_progress is not None:
            on_progress(job.done)
