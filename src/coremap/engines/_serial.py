"""The serial engine: every chunk in the calling thread."""
from __future__ import annotations

import threading


class SerialEngine:
    name = "serial"

    def run(self, job, task, workers: int = 1, on_progress=None, timeout=None) -> None:
        """Run ``task`` in the calling thread until the job is finished."""
        job.event = threading.Event()
        task(job, True)
        if on_progress is not None:
            on_progress(job.done)
