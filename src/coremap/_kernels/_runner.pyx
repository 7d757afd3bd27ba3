# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The GIL-free chunk runner and the native worker pool.

A :class:`Job` is one parallel call: ``n`` elements, a schedule, and either a
native kernel (a C function pointer, see ``_runner.pxd``) or nothing (the
Python engines claim chunks through :meth:`Job.claim`). Every participating
thread claims ``[lo, hi)`` ranges from one shared atomic counter, so uneven work
balances by itself; nobody hands out work.

    caller thread ─┐                      ┌─> kernel(ptrs, meta, lo, hi)
    pool worker 1 ─┼─> claim() ── next ───┼─> kernel(ptrs, meta, lo, hi)
    pool worker k ─┘   (atomic CAS)       └─> ... done += hi - lo

Native kernels run on the native pool (``_pool.h``): POSIX threads that never
touch the GIL. The caller posts its job (:meth:`Job.run_native` with
``helpers``), computes chunks itself, then unlinks the job and waits for the
helpers inside it, so when ``run_native`` returns or raises, no thread of the
call can still write into its arrays. The caller never waits for a helper to
*arrive*: a nested call, or a call while every worker serves other callers,
finishes in the caller alone.

``cancel`` is checked between pieces (below); ``done`` counts finished
elements and feeds the progress bar; ``active`` counts callers and Python
helpers inside the job (the process engine reads it to know when nobody can
still be writing after a cancel).

Chunks are timed. The measured cost per element does three things:

* it caps the chunk length so one chunk lasts about ``target_ns``, and the
  guided tail at ``floor_ns`` of work;
* inside a chunk, the native loop runs the kernel on *pieces* re-timed one
  after the other (the next piece lasts about ``target_ns / 4`` at the cost just
  measured, and is at most twice the last one), so Ctrl-C, cancel, progress and
  ``timeout=`` act within one piece even when the cost per element rises along
  the array (a chunk sized on cheap elements is cut before it reaches the
  costly ones). Python chunks (``complete``) grow at most 2x per chunk instead;
* while only the caller works, it decides whether helpers are worth waking: once
  the estimated remaining time exceeds ``escalate_ns`` (for the native pool:
  twice its measured wake-up time, see :func:`pool_wake_ns`), the helpers are
  posted. A small call is thus finished by the caller alone, with no thread
  woken, whatever its size in elements: the crossover is a time, not a count.
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


cdef extern from "_pool.h" nogil:
    ctypedef struct cm_job:
        void (*run)(cm_job *job) noexcept nogil
        int64_t seats
        int64_t inside
        int64_t posted_at
        int64_t linked
        cm_job *next
    void cm_pool_init()
    int64_t cm_pool_ensure(int64_t n)
    void cm_pool_post(cm_job *job, int64_t seats)
    void cm_pool_unlink(cm_job *job)
    bint cm_pool_wait_idle(cm_job *job, int64_t limit_ns)
    int64_t cm_pool_size()
    int64_t cm_pool_wake_ns()
    int64_t cm_pool_last_wake_ns()
    bint cm_pool_in_worker()
    int64_t cm_pool_worker_index()
    void cm_pool_shutdown()
    int CM_POOL_MAX


cdef extern from *:
    """
    /* > 0 while this thread runs kernels in the runner (see in_kernel) */
    static __thread int cm_kernel_depth = 0;
    static inline void cm_kernel_enter(void) { cm_kernel_depth++; }
    static inline void cm_kernel_leave(void) { cm_kernel_depth--; }
    static inline int cm_kernel_active(void) { return cm_kernel_depth > 0; }
    """
    void cm_kernel_enter() nogil
    void cm_kernel_leave() nogil
    bint cm_kernel_active() nogil


cnp.import_array()
cm_pool_init()

SCHEDULES = {"static": 0, "dynamic": 1, "guided": 2}
POOL_MAX = CM_POOL_MAX

# Aimed duration of one piece of a chunk when the job is untimed (the static
# schedule): a responsiveness choice (Ctrl-C within ~5 ms of work), not a
# measurement; the kernel call and clock read it adds cost ~50 ns per piece.
DEF UNTIMED_PIECE_NS = 5_000_000
# First piece of a chunk whose cost is unknown: small, then doubling, so even a
# function taking a second per element answers Ctrl-C within a few elements.
DEF FIRST_PIECE = 8
DEF NEVER = 1 << 62
# Below this much work left, no helper is posted even if the pool wakes fast: a
# post costs a lock and a broadcast (a few us) and the tail waits for the helper.
DEF MIN_ESCALATE_NS = 10_000
# Home blocks' counters are this many int64 apart: one 64-byte cache line each,
# so threads claiming from their own blocks do not share a line.
DEF BLOCK_STRIDE = 8
# A thread adds its finished elements to the job's ``done`` at most this often
# (and when it stops): ``done`` feeds the progress bar, which needs no more, and
# every add takes the counter's cache line from the other threads (a choice, not
# a measurement: its effect alone was not timed).
DEF COUNT_EVERY_NS = 1_000_000


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef struct JobState:
    # Everything threads (or processes) share about a job. It lives in the Job
    # object, or, for the process engine, in a shared-memory control block.
    # ``next`` (written by every claim) and ``done`` (by every finished chunk)
    # are each 64 bytes from anything else, so writing one does not take the
    # read-mostly rest (cancel, cap, floor) from the other threads' caches.
    int64_t next
    int64_t _line0[7]
    int64_t done
    int64_t _line1[7]
    int64_t active
    int64_t cancel
    int64_t err_lo
    int64_t err_hi
    int64_t cap
    int64_t escalate_pending
    int64_t floor                        # smallest guided chunk, from the measured cost
    double ns_per_element


STATE_BYTES = sizeof(JobState)


cdef struct Ctx:
    # What a native pool worker needs, without the GIL. ``hdr`` comes first:
    # the pool hands back the cm_job pointer, which is the Ctx pointer.
    cm_job hdr
    JobState *st
    int64_t n
    int64_t workers
    int schedule
    int64_t chunk
    int64_t max_chunk
    int64_t target_ns
    int64_t piece_ns
    int64_t escalate_ns
    int64_t floor_ns
    int64_t helpers                      # pool seats to post (0: no pool)
    int64_t helped                       # elements computed by pool workers (atomic)
    kernel_t kernel
    void **ptrs
    int64_t *meta
    int64_t *slot
    int64_t nblocks                      # home blocks (1: one counter; see ctx_claim)
    int64_t *block_next                  # block b's next element at [BLOCK_STRIDE * b]


cdef inline int64_t ctx_chunk(Ctx *c, int64_t rem) noexcept nogil:
    """The next chunk's length with ``rem`` elements of the job unclaimed."""
    cdef int64_t size
    if c.schedule == 2:
        size = (rem + 2 * c.workers - 1) // (2 * c.workers)
        if size < c.st.floor:
            size = c.st.floor
    else:
        size = c.chunk
    if size > c.st.cap:
        size = c.st.cap
    return size if size < rem else rem


cdef inline int64_t ctx_home_chunk(Ctx *c, int64_t rem) noexcept nogil:
    """The next chunk's length in a home block with ``rem`` elements unclaimed.

    Half of them, down to a quarter of the guided floor (so ~2.5 us of work for
    native kernels), for the block's owner and for a thread that finished its
    own block alike: the owner's last chunk leaves the others waiting no
    longer than that. With the guided length (a quarter of
    the job's remaining work, floor 10 us), W1 into ``out=`` at 10^6 elements
    on 2 workers ran at 0.86-0.89x prange (the thread left idle waited up to
    10 us); with this, at 0.95-1.00x (the job alone, 2-core VM).
    """
    cdef int64_t size = (rem + 1) // 2
    cdef int64_t floor = c.st.floor // 4
    if size < floor:
        size = floor
    if size < c.chunk:
        size = c.chunk
    if size > c.st.cap:
        size = c.st.cap
    return size if size < rem else rem


cdef inline int64_t block_start(Ctx *c, int64_t b) noexcept nogil:
    return b * (c.n // c.nblocks) + (b if b < c.n % c.nblocks else c.n % c.nblocks)


cdef inline bint ctx_claim(Ctx *c, int64_t *block, int64_t *lo, int64_t *hi) noexcept nogil:
    """Claim the next chunk; with home blocks, from ``block`` first, and set ``block``
    to the block it came from.

    One counter (``st.next``) hands out ``[0, n)`` in order. With home blocks
    (``nblocks`` > 1, see ``Job._home_blocks``) ``[0, n)`` is cut into one block
    per thread, each with its own counter: a thread claims from its own block,
    then from the others in turn (``ctx_home_chunk`` sizes those chunks), and
    ``st.next`` counts the elements claimed.
    """
    cdef int64_t start, end, size, b, k
    if c.nblocks <= 1:
        start = cm_load(&c.st.next)
        while True:
            if start >= c.n:
                return False
            size = ctx_chunk(c, c.n - start)
            if cm_cas(&c.st.next, &start, start + size):
                lo[0] = start
                hi[0] = start + size
                return True
            # start now holds the value another thread stored; retry
    for k in range(c.nblocks):
        b = (block[0] + k) % c.nblocks
        end = block_start(c, b + 1)
        start = cm_load(&c.block_next[BLOCK_STRIDE * b])
        while start < end:
            size = ctx_home_chunk(c, end - start)
            if cm_cas(&c.block_next[BLOCK_STRIDE * b], &start, start + size):
                cm_fetch_add(&c.st.next, size)
                block[0] = b
                lo[0] = start
                hi[0] = start + size
                return True
    return False


cdef inline bint ctx_observe(Ctx *c, int64_t count, int64_t ns, int64_t grow) noexcept nogil:
    """Learn the cost per element from a timed run; True if helpers are due.

    ``grow`` > 0 caps the next chunks at ``grow`` elements (twice the chunk just
    timed): a cost that rises along the array cannot make one chunk run for long.
    """
    cdef double per
    cdef int64_t cap
    if count <= 0:
        return False
    per = <double>ns / count
    # Every thread observes every piece: store only a change of over 1/8, so
    # threads do not keep taking the shared state's cache line from each other.
    if not (0.875 * c.st.ns_per_element <= per <= 1.125 * c.st.ns_per_element):
        c.st.ns_per_element = per
    if c.target_ns > 0:
        cap = c.max_chunk if per <= 0 else <int64_t>(c.target_ns / per)
        if grow > 0 and cap > grow:
            cap = grow
        if cap < 1:
            cap = 1
        if cap > c.max_chunk:
            cap = c.max_chunk
        if cap != cm_load(&c.st.cap):
            cm_store(&c.st.cap, cap)
        if c.floor_ns > 0 and per > 0:
            # The guided tail shrinks no further than floor_ns of work: short
            # enough to balance uneven work, long enough to keep a memory-bound
            # kernel streaming (benchmarks: W1 into out= lost ~25% to 1,024-element
            # tail chunks; W3 sorted needs a fine tail).
            cap = <int64_t>(c.floor_ns / per)
            if cap < c.chunk:
                cap = c.chunk
            if cap > c.max_chunk:
                cap = c.max_chunk
            if not (cap - cap // 8 <= cm_load(&c.st.floor) <= cap + cap // 8):
                cm_store(&c.st.floor, cap)
    if cm_load(&c.st.escalate_pending):
        if (c.n - cm_load(&c.st.next)) * per > c.escalate_ns:
            cm_store(&c.st.escalate_pending, 0)
            return True
    return False


cdef inline void ctx_fail(Ctx *c, int64_t lo, int64_t hi) noexcept nogil:
    cdef int64_t expected = -1
    if cm_cas(&c.st.err_lo, &expected, lo):
        cm_store(&c.st.err_hi, hi)
    cm_store(&c.st.cancel, 1)


cdef struct Ramp:
    # One thread's piece sizing (ctx_pieces), carried from chunk to chunk.
    double per                           # cost per element, from its last timed piece
    int64_t last                         # the last whole piece's length: the next <= 2x
    int64_t final                        # the length of the piece that ended the last run
    int64_t end                          # where that run ended (-1: none yet)


cdef inline void ramp_start(Ramp *r, double per) noexcept nogil:
    r.per = per
    r.last = 0
    r.final = 0
    r.end = -1


cdef int64_t ctx_pieces(Ctx *c, int64_t pos, int64_t hi, int64_t until, Ramp *r,
                        bint caller) noexcept nogil:
    """Run ``[pos, hi)`` in re-timed pieces until done, cancelled, or ``until`` passes.

    Returns the position reached, or -1 if the kernel failed (recorded). The
    elements computed are added to ``done`` every ``COUNT_EVERY_NS`` and before
    it returns. ``r`` carries this thread's cost estimate and piece lengths.

    A run that goes on where this thread's last one ended (the next chunk of a
    home block, or the same chunk after the caller's poll) continues its ramp.
    One that starts elsewhere goes on from the last piece run, however short
    the chunk's end made it: the elements in between were other threads', and
    may cost more. (Continuing from a piece cut short by the chunk's end instead
    restarted each chunk's ramp: W1 into out= at 10^6 elements ran 88-104 pieces
    a thread; now the caller runs ~35 and a pool worker ~23.)
    """
    cdef int64_t size, t0, t1, done = 0, counted = now_ns()
    cdef bint whole
    if pos != r.end:
        r.last = r.final
    while pos < hi and cm_load(&c.st.cancel) == 0:
        if r.per > 0:
            size = <int64_t>(c.piece_ns / r.per)
            if size > 2 * r.last and size > FIRST_PIECE:  # grow at most 2x a piece
                size = FIRST_PIECE if 2 * r.last < FIRST_PIECE else 2 * r.last
        else:
            size = FIRST_PIECE if r.last == 0 else 2 * r.last
        if size < 1:
            size = 1
        whole = size <= hi - pos
        if not whole:
            size = hi - pos
        t0 = now_ns()
        if c.kernel(c.ptrs, c.meta, pos, pos + size) == 0:
            cm_fetch_add(&c.st.done, done)
            ctx_fail(c, pos, pos + size)
            return -1
        t1 = now_ns()
        done += size
        pos += size
        if t1 - counted >= COUNT_EVERY_NS:
            cm_fetch_add(&c.st.done, done)
            done = 0
            counted = t1
        if t1 > t0:
            r.per = <double>(t1 - t0) / size
        r.final = size
        if whole:
            r.last = size
        if ctx_observe(c, size, t1 - t0, 0) and caller and c.helpers > 0:
            # workers are started only when first worth waking (a small call starts none)
            cm_pool_post(&c.hdr, min(c.helpers, cm_pool_ensure(c.helpers)))
        if t1 >= until:
            break
    r.end = pos
    cm_fetch_add(&c.st.done, done)
    return pos


cdef void ctx_helper(cm_job *job) noexcept nogil:
    """A pool worker's share of a job: claim and run chunks until none are left."""
    cdef Ctx *c = <Ctx *>job
    cdef int64_t lo, hi
    cdef Ramp ramp
    cdef int64_t block = 0, current
    if c.nblocks > 1:  # the same worker takes the same block call after call
        block = 1 + cm_pool_worker_index() % (c.nblocks - 1)
    current = block
    ramp_start(&ramp, c.st.ns_per_element)
    while cm_load(&c.st.cancel) == 0 and ctx_claim(c, &block, &lo, &hi):
        if block != current:
            ramp.final = 0  # another block: its cost is unknown, pieces start small
            current = block
        if ctx_pieces(c, lo, hi, NEVER, &ramp, False) < 0:
            return
        cm_fetch_add(&c.helped, hi - lo)


# Jobs whose helpers could not be waited for (a second interrupt while
# draining): kept alive forever, so no worker can touch freed memory.
_abandoned = []


cdef class Job:
    """Shared state of one parallel call (see the module docstring)."""

    cdef Ctx c
    cdef JobState _own                   # the state, unless it lives in shared memory
    cdef object _state_owner
    cdef object _keepalive
    cdef bint _meta_borrowed             # c.meta belongs to a Prepared (kept in _keepalive)
    cdef public object on_escalate       # called once, in the caller, to wake Python helpers
    cdef public object event             # set by the last thread to leave
    cdef public object monitor           # called in the caller between chunks (progress, timeout)

    def __cinit__(self, int64_t n, int64_t workers, str schedule="guided",
                  int64_t chunk=1, int64_t max_chunk=1 << 62, int64_t target_ns=0,
                  int64_t first_chunk=0, int64_t escalate_ns=0, intptr_t state=0,
                  bint init=True, object state_owner=None, int64_t floor_ns=0):
        if n < 0 or workers < 1 or chunk < 1 or max_chunk < 1 or target_ns < 0:
            raise ValueError("invalid Job parameters")
        self.c.n = n
        self.c.workers = workers
        self.c.schedule = SCHEDULES[schedule]
        self.c.chunk = chunk
        self.c.max_chunk = max_chunk
        self.c.target_ns = target_ns
        self.c.piece_ns = target_ns // 4 if target_ns > 0 else UNTIMED_PIECE_NS
        self.c.escalate_ns = escalate_ns
        self.c.floor_ns = floor_ns
        self.c.helpers = 0
        self.c.helped = 0
        self.c.hdr.run = ctx_helper
        self.c.hdr.seats = 0
        self.c.hdr.inside = 0
        self.c.hdr.linked = 0
        self.c.hdr.posted_at = 0
        self.c.hdr.next = NULL
        self.c.slot = NULL
        self.c.nblocks = 1
        self.c.block_next = NULL
        self.c.kernel = NULL
        self.c.ptrs = NULL
        self.c.meta = NULL
        self.on_escalate = None
        self.monitor = None
        self._state_owner = state_owner  # keeps a shared mapping alive
        self.c.st = &self._own if state == 0 else <JobState *>state
        if init or state == 0:
            # Until a chunk has been timed the cost is unknown: start small.
            self.c.st.cap = (first_chunk if target_ns > 0 and 0 < first_chunk < max_chunk
                             else max_chunk)
            self.c.st.ns_per_element = 0.0
            self.c.st.escalate_pending = 0
            self.c.st.floor = chunk
            self.c.st.next = 0
            self.c.st.done = 0
            self.c.st.active = 0
            self.c.st.cancel = 0
            self.c.st.err_lo = -1
            self.c.st.err_hi = -1
        self.event = None

    def __dealloc__(self):
        free(self.c.ptrs)
        free(self.c.block_next)
        if not self._meta_borrowed:
            free(self.c.meta)

    @property
    def n(self):
        return self.c.n

    @property
    def workers(self):
        return self.c.workers

    @property
    def schedule(self):
        return self.c.schedule

    @property
    def chunk(self):
        return self.c.chunk

    @property
    def max_chunk(self):
        return self.c.max_chunk

    @property
    def target_ns(self):
        return self.c.target_ns

    @property
    def escalate_ns(self):
        return self.c.escalate_ns

    @property
    def floor_ns(self):
        return self.c.floor_ns

    def set_kernel(self, intptr_t address, ptrs, meta, keepalive):
        """Attach a native kernel and its operands (addresses and strides)."""
        cdef Py_ssize_t i
        free(self.c.ptrs)
        if not self._meta_borrowed:
            free(self.c.meta)
        self._meta_borrowed = False
        self.c.ptrs = <void **>malloc(len(ptrs) * sizeof(void *))
        self.c.meta = <int64_t *>malloc(len(meta) * sizeof(int64_t))
        if self.c.ptrs == NULL or self.c.meta == NULL:
            raise MemoryError()
        for i in range(len(ptrs)):
            self.c.ptrs[i] = <void *><intptr_t>ptrs[i]
        for i in range(len(meta)):
            self.c.meta[i] = meta[i]
        self.c.kernel = <kernel_t>address
        self._keepalive = keepalive

    # -- used by every engine -------------------------------------------------
    def enter(self):
        """Count the calling thread in; returns False if the job is over."""
        cm_fetch_add(&self.c.st.active, 1)
        if cm_load(&self.c.st.cancel) or cm_load(&self.c.st.next) >= self.c.n:
            self.leave()
            return False
        return True

    def leave(self):
        """Count the calling thread out; wake the waiter if the job is over."""
        cm_fetch_add(&self.c.st.active, -1)
        if self.finished and self.event is not None:
            self.event.set()

    def claim(self):
        """Claim the next chunk: ``(lo, hi)``, or ``None`` when there is none."""
        cdef int64_t lo, hi, block = 0
        if cm_load(&self.c.st.cancel):
            return None
        if ctx_claim(&self.c, &block, &lo, &hi):
            if self.c.slot != NULL:
                cm_store(&self.c.slot[1], hi)
                cm_store(&self.c.slot[0], lo)
            return (lo, hi)
        return None

    def set_slot(self, intptr_t address):
        """Record each claimed ``[lo, hi)`` at ``address`` (two int64) until completed.

        The process engine points this into shared memory, so the parent can
        name the chunk a worker was computing when it died.
        """
        self.c.slot = <int64_t *>address

    def complete(self, int64_t lo, int64_t hi, int64_t ns=0):
        """Count ``[lo, hi)`` as done; ``ns``, its duration, tunes chunk sizes.

        The next chunks are at most twice as long as this one, so a cost that
        rises along the array cannot stretch one chunk far beyond ``target_ns``.
        """
        cm_fetch_add(&self.c.st.done, hi - lo)
        if self.c.slot != NULL:
            cm_store(&self.c.slot[0], -1)
        if ns > 0 and ctx_observe(&self.c, hi - lo, ns, 2 * (hi - lo)):
            if self.on_escalate is not None:
                self.on_escalate()

    def arm_escalation(self, callback):
        """Call ``callback`` once, from the caller, when helpers are worth waking."""
        self.on_escalate = callback
        cm_store(&self.c.st.escalate_pending, 1 if callback is not None else 0)

    @property
    def helped(self):
        """Elements computed by native pool workers (the rest: by the caller)."""
        return cm_load(&self.c.helped)

    @property
    def ns_per_element(self):
        return self.c.st.ns_per_element

    def fail(self, int64_t lo, int64_t hi):
        ctx_fail(&self.c, lo, hi)

    def cancel(self):
        cm_store(&self.c.st.cancel, 1)

    @property
    def done(self):
        return cm_load(&self.c.st.done)

    @property
    def cancelled(self):
        return cm_load(&self.c.st.cancel) != 0

    @property
    def active(self):
        return cm_load(&self.c.st.active)

    @property
    def finished(self):
        """All elements computed, or cancelled with nobody left inside."""
        return (cm_load(&self.c.st.done) == self.c.n
                or (cm_load(&self.c.st.cancel) != 0 and cm_load(&self.c.st.active) == 0))

    @property
    def failed_chunk(self):
        """``(lo, hi)`` of the first chunk whose kernel failed, or ``None``."""
        cdef int64_t lo = cm_load(&self.c.st.err_lo)
        if lo < 0:
            return None
        return (lo, cm_load(&self.c.st.err_hi))

    cdef object _attend(self, bint check_signals):
        """With the GIL, between pieces: pending signals, then the monitor.

        Returns the exception that stops the call (the job is cancelled), or None.
        """
        try:
            if check_signals:
                PyErr_CheckSignals()
            if self.monitor is not None:
                self.monitor()
        except BaseException as exc:
            cm_store(&self.c.st.cancel, 1)
            return exc
        return None

    def run_native(self, bint check_signals=False, int64_t helpers=0, int64_t poll_ns=100_000_000,
                   bint home_blocks=False):
        """Claim and run chunks with the native kernel, without the GIL.

        With ``helpers`` > 0, up to that many native pool workers join: at once
        for an untimed job, else once the remaining work is worth waking them.
        ``home_blocks`` gives each thread a block to start in (``_home_blocks``),
        for a call known to be short.
        Before returning or raising, the caller waits until none of them is
        inside the job. Every ``poll_ns``, between pieces, the caller handles
        pending signals (with ``check_signals``: only in the main thread) and
        calls ``monitor``; an exception from either cancels the job and is
        raised once the helpers have left.
        """
        cdef int64_t lo, hi, pos, until, block = 0, current = 0
        cdef Ramp ramp
        cdef bint attend = check_signals or self.monitor is not None
        cdef object pending = None
        cdef object extra
        if self.c.kernel == NULL:
            raise RuntimeError("Job has no native kernel")
        if not self.enter():
            return
        self.c.helpers = helpers
        if helpers > 0:
            if home_blocks:
                self._home_blocks(helpers + 1)
            if self.c.target_ns == 0:  # untimed: every worker from the start
                with nogil:
                    cm_pool_post(&self.c.hdr, min(helpers, cm_pool_ensure(helpers)))
            else:
                # Worth waking helpers once the work left exceeds twice their
                # measured wake-up time, never later than the Python pool would.
                self.c.escalate_ns = min(self.c.escalate_ns, escalate_threshold_ns())
                cm_store(&self.c.st.escalate_pending, 1)
        until = now_ns() + poll_ns if attend else NEVER
        ramp_start(&ramp, self.c.st.ns_per_element)
        cm_kernel_enter()
        try:
            with nogil:
                while pending is None and cm_load(&self.c.st.cancel) == 0:
                    if not ctx_claim(&self.c, &block, &lo, &hi):
                        break
                    if block != current:
                        ramp.final = 0  # another block: its cost is unknown, pieces start small
                        current = block
                    if self.c.slot != NULL:
                        cm_store(&self.c.slot[1], hi)
                        cm_store(&self.c.slot[0], lo)
                    pos = lo
                    while pos < hi and pending is None:
                        pos = ctx_pieces(&self.c, pos, hi, until, &ramp, True)
                        if pos < 0 or cm_load(&self.c.st.cancel):
                            break
                        if now_ns() >= until:
                            with gil:
                                pending = self._attend(check_signals)
                            until = now_ns() + poll_ns
                    if pos < 0:
                        break
                    if self.c.slot != NULL:
                        cm_store(&self.c.slot[0], -1)
        finally:
            cm_kernel_leave()
            extra = self._retire(check_signals, poll_ns)
            self.leave()
        if pending is None:
            pending = extra
        if pending is not None:
            raise pending

    cdef _home_blocks(self, int64_t threads):
        """Give each of ``threads`` a block of its own to claim from first (ctx_claim).

        The caller's is the first block and each pool worker's the same one call
        after call, so a loop of calls over the same arrays finds each block in
        the caches of the CPU that computed it last time (a dynamic schedule
        with one counter mixes them): W1 into ``out=`` at 10^6 elements (16 MB)
        computed its elements in 96-99 us with one block per thread and in
        106-107 us with one counter (2 workers, 2-core VM). Only for a job of
        this process that has not started, with the guided or dynamic schedule:
        the static one already gives each thread one block in turn, and a
        process engine's job shares its state with other processes.

        Only for a call known to be short (the caller says so): a helper starts
        in the middle of the array, so a cost that rises along the array (see
        ``ctx_pieces``) meets it on its first piece, with no cheaper elements
        before to warn it; in a short call no element is costly.
        """
        cdef int64_t b
        if (threads < 2 or self.c.schedule == 0 or self.c.n < threads
                or self.c.st != &self._own or self.c.nblocks > 1
                or cm_load(&self.c.st.next) != 0):
            return
        self.c.block_next = <int64_t *>malloc(threads * BLOCK_STRIDE * sizeof(int64_t))
        if self.c.block_next == NULL:
            return  # one counter then: the same results
        self.c.nblocks = threads
        for b in range(threads):
            self.c.block_next[BLOCK_STRIDE * b] = block_start(&self.c, b)

    cdef object _retire(self, bint check_signals, int64_t poll_ns):
        """Unlink the job from the pool and wait until no helper is inside."""
        cdef object pending = None
        cdef object exc
        cdef bint idle = False
        if self.c.helpers == 0:
            return None
        cm_pool_unlink(&self.c.hdr)
        while True:
            with nogil:
                idle = cm_pool_wait_idle(&self.c.hdr, poll_ns)
            if idle:
                return pending
            try:
                exc = self._attend(check_signals)
            except BaseException as e:
                exc = e
            if exc is not None:
                if pending is not None:
                    # A second interrupt while helpers finish their piece: give up
                    # waiting, and keep the job (and its buffers) alive for them.
                    _abandoned.append(self)
                    return exc
                pending = exc


cdef class Prepared:
    """A native kernel's job, prepared once and run by many calls (the fast path).

    ``Prepared(template, address, meta, operands, dtype, shape)`` keeps the
    settings of ``template`` (a Job that has not run), the kernel with its
    ``meta``, and the output's dtype and shape. Each call checks its arrays and
    ``out`` and runs in C: ``run_inline`` as one kernel call, ``run`` as a job
    built here and run as ``Job.run_native`` does. What it saves is Python:
    the checks of ``out``, ``Job(...)``, ``set_kernel`` and the engine's
    ``run``, which cost W1 into ``out=`` at 10^6 elements 18-20 us a call once
    the call before had flushed the caches (172 -> 152 and 148 -> 130 us, the
    two paths alternated in one process on the 2-core VM).
    """

    cdef Ctx proto
    cdef JobState state
    cdef int64_t *meta
    cdef Py_ssize_t operands
    cdef cnp.dtype dtype
    cdef tuple shape

    def __cinit__(self, Job template, intptr_t address, meta, Py_ssize_t operands,
                  cnp.dtype dtype, tuple shape):
        cdef Py_ssize_t i
        if template.c.kernel != NULL or cm_load(&template.c.st.next) != 0 or operands < 1:
            raise ValueError("Prepared needs a fresh Job without a kernel")
        self.meta = <int64_t *>malloc(len(meta) * sizeof(int64_t))
        if self.meta == NULL:
            raise MemoryError()
        for i in range(len(meta)):
            self.meta[i] = meta[i]
        self.proto = template.c
        self.state = template.c.st[0]
        self.proto.st = NULL
        self.proto.ptrs = NULL
        self.proto.meta = self.meta
        self.proto.kernel = <kernel_t>address
        self.operands = operands
        self.dtype = dtype
        self.shape = shape

    def __dealloc__(self):
        free(self.meta)

    cdef bint _pointers(self, tuple arrays, object out, void **ptrs) except -1:
        """Fill ``ptrs`` (the arrays', then out's data); False if the kernel cannot
        write straight into ``out`` or an array is unaligned (the full path's case).

        ``out`` must be an ndarray of the prepared shape and dtype, C-contiguous,
        aligned and writeable, and share no memory with an array unless it is that
        very array (element i is read, then written). The arrays are C-contiguous
        (the fast path's key says so), so a bounds test is ``np.may_share_memory``.
        """
        cdef cnp.ndarray a, o
        cdef char *lo
        cdef char *hi
        cdef char *olo
        cdef char *ohi
        cdef Py_ssize_t i
        if len(arrays) + 1 != self.operands:
            raise ValueError(f"expected {self.operands - 1} arrays, got {len(arrays)}")
        if not cnp.PyArray_CheckExact(out):
            return False
        o = <cnp.ndarray>out
        if not (cnp.PyArray_ISCARRAY(o) and cnp.PyArray_NDIM(o) == len(self.shape)
                and cnp.PyArray_EquivTypes(<cnp.dtype>cnp.PyArray_DESCR(o), self.dtype)):
            return False
        for i in range(len(self.shape)):
            if cnp.PyArray_DIM(o, i) != <cnp.npy_intp>self.shape[i]:
                return False
        olo = <char *>cnp.PyArray_DATA(o)
        ohi = olo + cnp.PyArray_NBYTES(o)
        for i in range(self.operands - 1):
            a = <cnp.ndarray?>arrays[i]
            lo = <char *>cnp.PyArray_DATA(a)
            hi = lo + cnp.PyArray_NBYTES(a)
            if lo < ohi and olo < hi and not (
                    lo == olo and cnp.PyArray_ITEMSIZE(a) == cnp.PyArray_ITEMSIZE(o)):
                return False
            if <intptr_t>lo % cnp.PyArray_ITEMSIZE(a):
                return False
            ptrs[i] = lo
        if <intptr_t>olo % cnp.PyArray_ITEMSIZE(o):
            return False
        ptrs[self.operands - 1] = olo
        return True

    def run_inline(self, tuple arrays, out):
        """One kernel call over all elements in the calling thread: 1 on success,
        0 when the element function raised, None (nothing run) as ``run`` or
        with more than 16 operands."""
        cdef void *ptrs[16]
        cdef int64_t rc
        if self.operands > 16:
            return None  # (the full path runs it)
        if not self._pointers(arrays, out, ptrs):
            return None
        cm_kernel_enter()
        with nogil:
            rc = self.proto.kernel(ptrs, self.meta, 0, self.proto.n)
        cm_kernel_leave()
        return rc

    def run(self, tuple arrays, out, bint check_signals=False, int64_t helpers=0,
            int64_t poll_ns=100_000_000, bint home_blocks=False):
        """Run the kernel over ``arrays`` into ``out`` as ``Job.run_native`` with
        the other arguments. Returns the finished Job (``done``,
        ``ns_per_element``, ``failed_chunk``), or None, with nothing run, if
        ``out`` or an array does not fit (see ``_pointers``).
        """
        cdef Job job
        cdef void **ptrs = <void **>malloc(self.operands * sizeof(void *))
        if ptrs == NULL:
            raise MemoryError()
        try:
            ok = self._pointers(arrays, out, ptrs)
        except BaseException:
            free(ptrs)
            raise
        if not ok:
            free(ptrs)
            return None
        try:
            job = Job.__new__(Job, self.proto.n, self.proto.workers)
        except BaseException:
            free(ptrs)
            raise
        job.c = self.proto
        job._own = self.state
        job.c.st = &job._own
        job.c.ptrs = ptrs
        job._meta_borrowed = True
        job._keepalive = (self, arrays, out)
        job.run_native(check_signals, helpers, poll_ns, home_blocks)
        return job


def pool_size():
    """Native pool workers started in this process."""
    return cm_pool_size()


def pool_wake_ns(bint last=False):
    """Time from a post to the first helper inside the job (ns): a moving estimate,
    or with ``last`` the latest sample (``coremap bench`` reports it)."""
    return cm_pool_last_wake_ns() if last else cm_pool_wake_ns()


cpdef int64_t escalate_threshold_ns() noexcept:
    """Work left (ns) above which a job posts its pool helpers: twice the pool's
    measured wake-up time (``pool_wake_ns``), at least ``MIN_ESCALATE_NS``."""
    return max(2 * cm_pool_wake_ns(), MIN_ESCALATE_NS)


def in_kernel():
    """True while this thread runs a kernel through the runner (``run_native``, an
    inline run) or is a native pool worker: a Numba kernel's failure reported
    here is coremap's to raise with its element (``_numba``'s unraisable hook)."""
    return cm_kernel_active() or cm_pool_in_worker()


def pool_ensure(int64_t n):
    """Start native pool workers until there are ``n``; returns how many there are."""
    with nogil:
        n = cm_pool_ensure(n)
    return n


def pool_shutdown():
    """Stop and join the native pool workers (started again on the next call)."""
    with nogil:
        cm_pool_shutdown()


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
    cm_kernel_enter()
    with nogil:
        rc = (<kernel_t>address)(p, m, lo, hi)
    cm_kernel_leave()
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
