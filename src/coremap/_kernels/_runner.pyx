# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The GIL-free chunk runner.

A :class:`Job` is one parallel call: ``n`` elements, a schedule, and either a
native kernel (a C function pointer, see ``_runner.pxd``) or nothing (the
Python engines claim chunks through :meth:`Job.claim`). Every participating
thread claims ``[lo, hi)`` ranges from one shared atomic counter, so uneven work
balances by itself; nobody hands out work.

    caller thread ─┐                      ┌─> kernel(ptrs, meta, lo, hi)
    pool thread 1 ─┼─> claim() ── next ───┼─> kernel(ptrs, meta, lo, hi)
    pool thread k ─┘   (atomic CAS)       └─> ... done += hi - lo

``cancel`` is checked between chunks; ``done`` counts finished elements and
feeds the progress bar; ``active`` counts threads inside the job, so the caller
knows when nobody can still be writing to the output after a cancel.

Chunks are timed. The measured cost per element does two things:

* it caps the chunk length so one chunk lasts about ``target_ns``: Ctrl-C, a
  cancel after an error and the progress bar act within one chunk even for a
  function that takes milliseconds per element, and the tail balances;
* while only the caller works, it decides whether helpers are worth waking: once
  the estimated remaining time exceeds ``escalate_ns``, ``on_escalate()`` is
  called (once) and the engine posts the job to its workers. A small call is
  thus finished by the caller alone, with no thread woken, whatever its size in
  elements: the crossover is a time, not an element count.
"""
cimport numpy as cnp
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport free, malloc
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from coremap._kernels._runner cimport kernel_t


cdef extern from "_atomics.h" nogil:
    int64_t cm_load(int64_t *p)
    void cm_store(int64_t *p, int64_t v)
    int64_t cm_fetch_add(int64_t *p, int64_t v)
    bint cm_cas(int64_t *p, int64_t *expected, int64_t desired)


cnp.import_array()

SCHEDULES = {"static": 0, "dynamic": 1, "guided": 2}


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef struct JobState:
    # Everything threads (or processes) share about a job. It lives in the Job
    # object, or, for the process engine, in a shared-memory control block.
    int64_t next
    int64_t done
    int64_t active
    int64_t cancel
    int64_t err_lo
    int64_t err_hi
    int64_t cap
    int64_t escalate_pending
    int64_t floor                        # smallest guided chunk, from the measured cost
    double ns_per_element


STATE_BYTES = sizeof(JobState)


cdef class Job:
    """Shared state of one parallel call (see the module docstring)."""

    cdef readonly int64_t n
    cdef readonly int64_t workers
    cdef readonly int schedule
    cdef readonly int64_t chunk          # static block / dynamic size / guided minimum
    cdef readonly int64_t max_chunk      # cap, so a chunk never runs for long
    cdef readonly int64_t target_ns      # aimed duration of one chunk (0: no timing cap)
    cdef readonly int64_t escalate_ns    # wake helpers once this much work remains
    cdef readonly int64_t floor_ns       # a guided chunk is worth at least this much work
    cdef public object on_escalate       # called once, in the caller, to wake helpers
    cdef JobState _own                   # the state, unless it lives in shared memory
    cdef JobState *st
    cdef int64_t *slot                   # this thread's [lo, hi) in flight, or NULL
    cdef object _state_owner
    cdef kernel_t _kernel
    cdef void **_ptrs
    cdef int64_t *_meta
    cdef object _keepalive
    cdef public object event             # set by the last thread to leave

    def __cinit__(self, int64_t n, int64_t workers, str schedule="guided",
                  int64_t chunk=1, int64_t max_chunk=1 << 62, int64_t target_ns=0,
                  int64_t first_chunk=0, int64_t escalate_ns=0, intptr_t state=0,
                  bint init=True, object state_owner=None, int64_t floor_ns=0):
        if n < 0 or workers < 1 or chunk < 1 or max_chunk < 1 or target_ns < 0:
            raise ValueError("invalid Job parameters")
        self.n = n
        self.workers = workers
        self.schedule = SCHEDULES[schedule]
        self.chunk = chunk
        self.max_chunk = max_chunk
        self.target_ns = target_ns
        self.escalate_ns = escalate_ns
        self.floor_ns = floor_ns
        self.on_escalate = None
        self.slot = NULL
        self._state_owner = state_owner  # keeps a shared mapping alive
        self.st = &self._own if state == 0 else <JobState *>state
        if init or state == 0:
            # Until a chunk has been timed the cost is unknown: start small.
            self.st.cap = (first_chunk if target_ns > 0 and 0 < first_chunk < max_chunk
                           else max_chunk)
            self.st.ns_per_element = 0.0
            self.st.escalate_pending = 0
            self.st.floor = chunk
            self.st.next = 0
            self.st.done = 0
            self.st.active = 0
            self.st.cancel = 0
            self.st.err_lo = -1
            self.st.err_hi = -1
        self._kernel = NULL
        self._ptrs = NULL
        self._meta = NULL
        self.event = None

    def __dealloc__(self):
        free(self._ptrs)
        free(self._meta)

    def set_kernel(self, intptr_t address, ptrs, meta, keepalive):
        """Attach a native kernel and its operands (addresses and strides)."""
        cdef Py_ssize_t i
        free(self._ptrs)
        free(self._meta)
        self._ptrs = <void **>malloc(len(ptrs) * sizeof(void *))
        self._meta = <int64_t *>malloc(len(meta) * sizeof(int64_t))
        if self._ptrs == NULL or self._meta == NULL:
            raise MemoryError()
        for i in range(len(ptrs)):
            self._ptrs[i] = <void *><intptr_t>ptrs[i]
        for i in range(len(meta)):
            self._meta[i] = meta[i]
        self._kernel = <kernel_t>address
        self._keepalive = keepalive

    cdef inline bint _claim(self, int64_t *lo, int64_t *hi) noexcept nogil:
        cdef int64_t start = cm_load(&self.st.next)
        cdef int64_t size, rem
        while True:
            rem = self.n - start
            if rem <= 0:
                return False
            if self.schedule == 2:
                size = (rem + 2 * self.workers - 1) // (2 * self.workers)
                if size < self.st.floor:
                    size = self.st.floor
            else:
                size = self.chunk
            if size > self.st.cap:
                size = self.st.cap
            if size > rem:
                size = rem
            if cm_cas(&self.st.next, &start, start + size):
                lo[0] = start
                hi[0] = start + size
                return True
            # start now holds the value another thread stored; retry

    cdef inline bint _observe(self, int64_t count, int64_t ns) noexcept nogil:
        """Learn the cost per element from a timed chunk; True if helpers are due."""
        cdef double per
        cdef int64_t cap
        if count <= 0:
            return False
        per = <double>ns / count
        self.st.ns_per_element = per
        if self.target_ns > 0:
            cap = self.max_chunk if per <= 0 else <int64_t>(self.target_ns / per)
            if cap < 1:
                cap = 1
            if cap > self.max_chunk:
                cap = self.max_chunk
            cm_store(&self.st.cap, cap)
            if self.floor_ns > 0 and per > 0:
                # The guided tail shrinks no further than floor_ns of work: short
                # enough to balance uneven work, long enough to keep a memory-bound
                # kernel streaming (benchmarks: W1 into out= lost ~25% to 1,024-element
                # tail chunks; W3 sorted needs a fine tail).
                cap = <int64_t>(self.floor_ns / per)
                if cap < self.chunk:
                    cap = self.chunk
                if cap > self.max_chunk:
                    cap = self.max_chunk
                cm_store(&self.st.floor, cap)
        if cm_load(&self.st.escalate_pending):
            if (self.n - cm_load(&self.st.next)) * per > self.escalate_ns:
                cm_store(&self.st.escalate_pending, 0)
                return True
        return False

    cdef inline void _record_failure(self, int64_t lo, int64_t hi) noexcept nogil:
        cdef int64_t expected = -1
        if cm_cas(&self.st.err_lo, &expected, lo):
            cm_store(&self.st.err_hi, hi)
        cm_store(&self.st.cancel, 1)

    # -- used by every engine -------------------------------------------------
    def enter(self):
        """Count the calling thread in; returns False if the job is over."""
        cm_fetch_add(&self.st.active, 1)
        if cm_load(&self.st.cancel) or cm_load(&self.st.next) >= self.n:
            self.leave()
            return False
        return True

    def leave(self):
        """Count the calling thread out; wake the waiter if the job is over."""
        cm_fetch_add(&self.st.active, -1)
        if self.finished and self.event is not None:
            self.event.set()

    def claim(self):
        """Claim the next chunk: ``(lo, hi)``, or ``None`` when there is none."""
        cdef int64_t lo, hi
        if cm_load(&self.st.cancel):
            return None
        if self._claim(&lo, &hi):
            if self.slot != NULL:
                cm_store(&self.slot[1], hi)
                cm_store(&self.slot[0], lo)
            return (lo, hi)
        return None

    def set_slot(self, intptr_t address):
        """Record each claimed ``[lo, hi)`` at ``address`` (two int64) until completed.

        The process engine points this into shared memory, so the parent can
        name the chunk a worker was computing when it died.
        """
        self.slot = <int64_t *>address

    def complete(self, int64_t lo, int64_t hi, int64_t ns=0):
        """Count ``[lo, hi)`` as done; ``ns``, its duration, tunes chunk sizes."""
        cm_fetch_add(&self.st.done, hi - lo)
        if self.slot != NULL:
            cm_store(&self.slot[0], -1)
        if ns > 0 and self._observe(hi - lo, ns):
            self.on_escalate()

    def arm_escalation(self, callback):
        """Call ``callback`` once, from the caller, when helpers are worth waking."""
        self.on_escalate = callback
        cm_store(&self.st.escalate_pending, 1 if callback is not None else 0)

    @property
    def ns_per_element(self):
        return self.st.ns_per_element

    def fail(self, int64_t lo, int64_t hi):
        self._record_failure(lo, hi)

    def cancel(self):
        cm_store(&self.st.cancel, 1)

    @property
    def done(self):
        return cm_load(&self.st.done)

    @property
    def cancelled(self):
        return cm_load(&self.st.cancel) != 0

    @property
    def active(self):
        return cm_load(&self.st.active)

    @property
    def finished(self):
        """All elements computed, or cancelled with nobody left inside."""
        return (cm_load(&self.st.done) == self.n
                or (cm_load(&self.st.cancel) != 0 and cm_load(&self.st.active) == 0))

    @property
    def failed_chunk(self):
        """``(lo, hi)`` of the first chunk whose kernel failed, or ``None``."""
        cdef int64_t lo = cm_load(&self.st.err_lo)
        if lo < 0:
            return None
        return (lo, cm_load(&self.st.err_hi))

    def run_native(self, bint check_signals=False):
        """Claim and run chunks with the native kernel, without the GIL.

        With ``check_signals`` (only in the main thread), pending signals are
        handled between chunks, so Ctrl-C stops the call after one chunk.
        """
        cdef int64_t lo, hi, t0
        cdef bint stop = False
        cdef bint wake
        cdef object pending = None
        if self._kernel == NULL:
            raise RuntimeError("Job has no native kernel")
        if not self.enter():
            return
        try:
            with nogil:
                while not stop and cm_load(&self.st.cancel) == 0:
                    if not self._claim(&lo, &hi):
                        break
                    t0 = now_ns()
                    if self.slot != NULL:
                        cm_store(&self.slot[1], hi)
                        cm_store(&self.slot[0], lo)
                    if self._kernel(self._ptrs, self._meta, lo, hi) == 0:
                        self._record_failure(lo, hi)
                        break
                    cm_fetch_add(&self.st.done, hi - lo)
                    if self.slot != NULL:
                        cm_store(&self.slot[0], -1)
                    wake = self._observe(hi - lo, now_ns() - t0)
                    if wake:
                        with gil:
                            try:
                                self.on_escalate()
                            except BaseException as exc:
                                pending = exc
                                stop = True
                                cm_store(&self.st.cancel, 1)
                    if check_signals:
                        with gil:
                            try:
                                PyErr_CheckSignals()
                            except BaseException as exc:
                                pending = exc
                                stop = True
                                cm_store(&self.st.cancel, 1)
        finally:
            self.leave()
        if pending is not None:
            raise pending


def run_inline(intptr_t address, ptrs, meta, int64_t lo, int64_t hi):
    """Run a native kernel on ``[lo, hi)`` in the calling thread (the fast path).

    Returns the kernel's status: 1 on success, 0 when the element function raised.
    """
    cdef void *p[16]
    cdef int64_t m[64]
    cdef Py_ssize_t i
    cdef int64_t rc
    if len(ptrs) > 16 or len(meta) > 64:
        raise ValueError("too many operands for the inline path")
    for i in range(len(ptrs)):
        p[i] = <void *><intptr_t>ptrs[i]
    for i in range(len(meta)):
        m[i] = meta[i]
    with nogil:
        rc = (<kernel_t>address)(p, m, lo, hi)
    return rc


def data_pointers(tuple arrays):
    """Data addresses of ndarrays, or ``None`` if one is unaligned (the fast path's check)."""
    cdef list ptrs = []
    cdef cnp.ndarray a
    cdef intptr_t p
    for obj in arrays:
        a = <cnp.ndarray>obj
        p = <intptr_t>cnp.PyArray_DATA(a)
        if p % cnp.PyArray_ITEMSIZE(a):
            return None
        ptrs.append(p)
    return ptrs


# -- a process-shared lock on one int64 word (SharedArray.lock) ---------------------------
#
# Written by hand: multiprocessing.Lock pickles only while a process is being
# spawned, so it cannot travel inside a pickled array through a queue or a pool.
# This lock is a word in the segment's header: any process that maps the
# segment can take it. Waiters spin briefly, then sleep with backoff.

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec *req, timespec *rem)


def lock_acquire(intptr_t address, int64_t token, double timeout=-1.0, bint check_signals=False):
    """Take the lock word at ``address`` for ``token``; False on timeout."""
    cdef int64_t *word = <int64_t *>address
    cdef int64_t expected
    cdef int64_t deadline = -1
    cdef int64_t sleep_ns = 10_000
    cdef int spins = 0
    cdef timespec ts
    cdef bint got = False
    if timeout >= 0:
        deadline = now_ns() + <int64_t>(timeout * 1e9)
    while True:
        with nogil:
            while True:
                expected = 0
                if cm_cas(word, &expected, token):
                    got = True
                    break
                if deadline >= 0 and now_ns() >= deadline:
                    break
                spins += 1
                if spins < 200:
                    continue
                ts.tv_sec = 0
                ts.tv_nsec = sleep_ns
                nanosleep(&ts, NULL)
                if sleep_ns < 1_000_000:
                    sleep_ns *= 2
                if check_signals and spins % 16 == 0:
                    break  # back to Python to let a pending Ctrl-C through
        if got:
            return True
        if deadline >= 0 and now_ns() >= deadline:
            return False
        PyErr_CheckSignals()


def lock_release(intptr_t address, int64_t token):
    """Release the lock word at ``address``; ValueError if it is not held."""
    cdef int64_t *word = <int64_t *>address
    if cm_load(word) == 0:
        raise ValueError("release of an unlocked SharedArray lock")
    cm_store(word, 0)


def lock_holder(intptr_t address):
    """The token holding the lock word, or 0."""
    return cm_load(<int64_t *>address)
