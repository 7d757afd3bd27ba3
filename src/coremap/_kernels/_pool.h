/* The native worker pool: POSIX threads that run native chunk kernels with no GIL.
 *
 *     caller: cm_pool_post(job, k) ── lock, push job, gen++, broadcast ──┐
 *     worker: spin on gen (bounded) ── park on the condition variable <──┘
 *             take a seat of the first posted job with seats left, run it
 *             (job->run claims chunks from the job's atomic counter), leave
 *     caller: cm_pool_retire(job) ── unlink, close the seats, wait until nobody is inside
 *
 * Written in C because the pool must live below the interpreter: its threads
 * never hold, wait for or touch the GIL, so a wake-up costs a condition-variable
 * broadcast rather than one GIL hand-off per thread. One generation counter
 * wakes every parked worker at once. A worker that just finished a job spins a
 * before parking (time-bounded, see cm_spin_ns), so a loop of calls finds it awake.
 *
 * Lifetime: a worker increments job->inside under the pool lock while the job
 * is linked; the caller unlinks it under the same lock and then waits for
 * inside == 0, so no worker can touch a job after cm_pool_retire returns.
 * The caller never waits for a worker to *arrive*: it computes the job itself,
 * so a job finishes even when every worker is busy elsewhere (nested calls,
 * concurrent callers) or none could be started.
 *
 * Fork: the child has none of the parent's threads. A pthread_atfork child
 * handler forgets them and re-initialises the lock (a pid check backs it up),
 * so a forked child builds a fresh pool on its first call.
 */
#ifndef COREMAP_POOL_H
#define COREMAP_POOL_H
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_atomics.h"

#define CM_POOL_MAX 1024

/* Spins of a caller waiting for its helpers to leave a job, before it sleeps:
 * each is one pause instruction plus a load, ~10-40 ns, so ~20-80 us in all. */
#define CM_SPINS 2000

typedef struct cm_job cm_job;
struct cm_job {
    void (*run)(cm_job *job);   /* a helper's entry: claim and run chunks until none */
    int64_t seats;              /* helpers that may still join (under the pool lock) */
    int64_t inside;             /* helpers inside run() (atomic) */
    int64_t posted_at;          /* monotonic ns of the post, for the wake-up estimate */
    int64_t posted_cpu;         /* the CPU the poster ran on (-1: unknown) */
    int64_t linked;             /* in the pool's list (under the pool lock) */
    cm_job *next;
};

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int64_t gen;                /* bumped by every post (atomic) */
    int64_t sleepers;           /* workers parked on `wake` (under lock) */
    int64_t nthreads;           /* started workers */
    int64_t stop;               /* ask workers to exit (atomic) */
    int64_t wake_ns;            /* moving estimate of post -> first helper inside */
    int64_t last_wake_ns;       /* the latest such sample */
    pid_t pid;                  /* process that started the threads */
    cm_job *head;
    pthread_t threads[CM_POOL_MAX];
} cm_pool_t;

static cm_pool_t cm_pool;

/* How long a worker that found no work spins before it parks: up to
 * CM_SPIN_MAX_NS each, and CM_SPIN_BUDGET_NS for all workers together, so idle
 * workers burn at most ~20 ms of CPU in all after a call (tests/test_native_pool.py
 * checks < 0.05 s over 2 s idle). A parked worker is slow to wake on a virtual
 * machine: W2 in a loop of 10^5-element calls on the 2-core VM ran at 0.46x
 * prange with a 50 us spin, 0.78-0.92x with 300 us and 0.92-0.93x with 2 ms
 * (prange's OpenMP workers spin ~7.7 ms after each region there). */
#define CM_SPIN_MAX_NS 2000000
#define CM_SPIN_BUDGET_NS 20000000

static inline int64_t cm_spin_ns(void) {
    int64_t n = cm_pool.nthreads > 0 ? cm_pool.nthreads : 1;
    int64_t each = CM_SPIN_BUDGET_NS / n;
    return each < CM_SPIN_MAX_NS ? each : CM_SPIN_MAX_NS;
}
static int cm_pool_ready = 0;
static __thread int cm_pool_thread = 0; /* 1 in a pool worker */
static __thread int64_t cm_pool_index = -1; /* a pool worker's index; -1 elsewhere */

static inline int64_t cm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cm_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void cm_pool_reset(void) {
    /* A fresh, empty pool: at import, and in a forked child (whose copy of the
     * lock may have been held by a thread that does not exist there). */
    pthread_mutex_init(&cm_pool.lock, NULL);
    pthread_cond_init(&cm_pool.wake, NULL);
    cm_pool.gen = 0;
    cm_pool.sleepers = 0;
    cm_pool.nthreads = 0;
    cm_pool.stop = 0;
    if (cm_pool.wake_ns <= 0)
        cm_pool.wake_ns = 50000; /* until measured: the thread dispatch cost in docs/benchmarks.rst, 35-60 us */
    cm_pool.pid = getpid();
    cm_pool.head = NULL;
}

static void cm_pool_atfork_child(void) { cm_pool_reset(); }

static void cm_pool_init(void) {
    if (cm_pool_ready)
        return;
    cm_pool.wake_ns = 0;
    cm_pool_reset();
    pthread_atfork(NULL, NULL, cm_pool_atfork_child);
    cm_pool_ready = 1;
}

/* Under the lock: the first linked job with a free seat, seat taken. */
static inline int64_t cm_current_cpu(void) {
#ifdef __linux__
    return sched_getcpu();
#else
    return -1;
#endif
}

/* Move the calling worker off `cpu`, where the thread that posted its job runs.
 *
 * The poster computes the job too, so a worker woken onto the poster's CPU only
 * time-shares it: on the 2-core VM a woken worker often landed there (the
 * guest's wake-up placement), and W2 calls of 3*10^4 elements in a loop ran at
 * the speed of one thread for whole blocks of calls until the load balancer
 * moved it. Excluding the CPU from the worker's mask makes the kernel migrate it
 * at once; the old mask is restored, and the worker stays where it was moved.
 * Nothing happens when the worker may run only there. */
static void cm_leave_cpu(int64_t cpu) {
#ifdef __linux__
    cpu_set_t mask, without;
    if (cpu < 0 || pthread_getaffinity_np(pthread_self(), sizeof mask, &mask) != 0)
        return;
    if (!CPU_ISSET((int)cpu, &mask) || CPU_COUNT(&mask) < 2)
        return;
    without = mask;
    CPU_CLR((int)cpu, &without);
    if (pthread_setaffinity_np(pthread_self(), sizeof without, &without) == 0)
        pthread_setaffinity_np(pthread_self(), sizeof mask, &mask);
#else
    (void)cpu;
#endif
}

static cm_job *cm_pool_take(void) {
    cm_job *j;
    for (j = cm_pool.head; j != NULL; j = j->next) {
        if (j->seats > 0) {
            j->seats--;
            if (cm_fetch_add(&j->inside, 1) == 0 && j->posted_at > 0) {
                int64_t w = cm_now_ns() - j->posted_at;
                cm_pool.last_wake_ns = w;
                /* One stall (a descheduled worker on a busy machine) must not
                 * dominate the estimate: a sample counts for at most 4x it. */
                if (w > 4 * cm_pool.wake_ns + 1000)
                    w = 4 * cm_pool.wake_ns + 1000;
                cm_pool.wake_ns = (7 * cm_pool.wake_ns + w) / 8;
                j->posted_at = 0;
            }
            return j;
        }
    }
    return NULL;
}

static void *cm_pool_worker(void *arg) {
    cm_pool_thread = 1;
    cm_pool_index = (int64_t)(intptr_t)arg;
    for (;;) {
        int64_t seen = cm_load(&cm_pool.gen);
        cm_job *job;
        pthread_mutex_lock(&cm_pool.lock);
        if (cm_load(&cm_pool.stop)) {
            pthread_mutex_unlock(&cm_pool.lock);
            return NULL;
        }
        job = cm_pool_take();
        pthread_mutex_unlock(&cm_pool.lock);
        if (job != NULL) {
            if (job->posted_cpu >= 0 && cm_current_cpu() == job->posted_cpu)
                cm_leave_cpu(job->posted_cpu);
            job->run(job);
            cm_fetch_add(&job->inside, -1); /* the last touch: the caller may free it now */
            continue;
        }
        {
            int64_t spin_until = cm_now_ns() + cm_spin_ns();
            for (int i = 0; cm_load(&cm_pool.gen) == seen && !cm_load(&cm_pool.stop); i++) {
                cm_relax();
                if ((i & 63) == 63 && cm_now_ns() >= spin_until)
                    break;
            }
        }
        if (cm_load(&cm_pool.gen) != seen)
            continue;
        pthread_mutex_lock(&cm_pool.lock);
        while (cm_load(&cm_pool.gen) == seen && !cm_load(&cm_pool.stop)) {
            cm_pool.sleepers++;
            pthread_cond_wait(&cm_pool.wake, &cm_pool.lock);
            cm_pool.sleepers--;
        }
        pthread_mutex_unlock(&cm_pool.lock);
    }
}

static inline void cm_pool_check_pid(void) {
    if (cm_pool.pid != getpid())
        cm_pool_reset(); /* forked without the atfork handler having run */
}

/* Start workers until there are n (at most CM_POOL_MAX); returns how many there are.
 * Workers block every signal: signals are the interpreter's business, in its threads. */
static int64_t cm_pool_ensure(int64_t n) {
    sigset_t all, old;
    int64_t have;
    cm_pool_init();
    cm_pool_check_pid();
    if (n > CM_POOL_MAX)
        n = CM_POOL_MAX;
    pthread_mutex_lock(&cm_pool.lock);
    if (cm_load(&cm_pool.stop)) {
        pthread_mutex_unlock(&cm_pool.lock);
        return 0;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (cm_pool.nthreads < n) {
        pthread_attr_t attr;
        int rc;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20); /* kernels use little stack */
        rc = pthread_create(&cm_pool.threads[cm_pool.nthreads], &attr, cm_pool_worker,
                            (void *)(intptr_t)cm_pool.nthreads);
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break; /* fewer helpers: the callers still finish their jobs alone */
        cm_pool.nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    have = cm_pool.nthreads;
    pthread_mutex_unlock(&cm_pool.lock);
    return have;
}

/* Offer `seats` helper seats of `job` to the workers and wake them all. */
static void cm_pool_post(cm_job *job, int64_t seats) {
    if (!cm_pool_ready || seats <= 0)
        return;
    cm_pool_check_pid();
    pthread_mutex_lock(&cm_pool.lock);
    if (!job->linked && cm_pool.nthreads > 0) {
        job->seats = seats;
        job->posted_at = cm_now_ns();
        job->posted_cpu = cm_current_cpu();
        job->next = cm_pool.head;
        cm_pool.head = job;
        job->linked = 1;
        cm_fetch_add(&cm_pool.gen, 1);
        if (cm_pool.sleepers > 0)
            pthread_cond_broadcast(&cm_pool.wake);
    }
    pthread_mutex_unlock(&cm_pool.lock);
}

/* Unlink `job`: no helper joins it any more. */
static void cm_pool_unlink(cm_job *job) {
    cm_job **p;
    if (!cm_pool_ready)
        return;
    pthread_mutex_lock(&cm_pool.lock);
    if (job->linked) {
        for (p = &cm_pool.head; *p != NULL; p = &(*p)->next) {
            if (*p == job) {
                *p = job->next;
                break;
            }
        }
        job->linked = 0;
    }
    job->seats = 0;
    pthread_mutex_unlock(&cm_pool.lock);
}

/* After cm_pool_unlink: is a helper still inside? */
static inline int cm_pool_busy(cm_job *job) { return cm_load(&job->inside) != 0; }

/* Wait (spin, then sleep with backoff) until no helper is inside `job`, at most
 * `limit_ns`; returns 1 when none is. Helpers leave within one piece of a chunk. */
static int cm_pool_wait_idle(cm_job *job, int64_t limit_ns) {
    int64_t start = 0, sleep = 1000;
    int spins = 0;
    while (cm_load(&job->inside) != 0) {
        if (spins < CM_SPINS) {
            spins++;
            cm_relax();
            continue;
        }
        if (start == 0)
            start = cm_now_ns();
        else if (cm_now_ns() - start >= limit_ns)
            return 0;
        struct timespec ts = {0, sleep};
        nanosleep(&ts, NULL);
        if (sleep < 200000)
            sleep *= 2;
    }
    return 1;
}

static inline int64_t cm_pool_size(void) {
    if (!cm_pool_ready || cm_pool.pid != getpid())
        return 0;
    return cm_pool.nthreads;
}

static inline int cm_pool_in_worker(void) { return cm_pool_thread; }

/* The calling pool worker's index (0, 1, ...: the order they were started), or -1. */
static inline int64_t cm_pool_worker_index(void) { return cm_pool_index; }

static inline int64_t cm_pool_wake_ns(void) { return cm_pool_ready ? cm_pool.wake_ns : 0; }
static inline int64_t cm_pool_last_wake_ns(void) { return cm_pool_ready ? cm_pool.last_wake_ns : 0; }

/* Stop and join every worker (they are started again on the next call). Called
 * with no job posted by this thread; jobs of other callers finish without help. */
static void cm_pool_shutdown(void) {
    int64_t n, i;
    if (!cm_pool_ready || cm_pool.pid != getpid())
        return;
    pthread_mutex_lock(&cm_pool.lock);
    cm_store(&cm_pool.stop, 1);
    pthread_cond_broadcast(&cm_pool.wake);
    n = cm_pool.nthreads;
    pthread_mutex_unlock(&cm_pool.lock);
    for (i = 0; i < n; i++)
        pthread_join(cm_pool.threads[i], NULL);
    pthread_mutex_lock(&cm_pool.lock);
    cm_pool.nthreads = 0;
    cm_store(&cm_pool.stop, 0);
    pthread_mutex_unlock(&cm_pool.lock);
}

#endif
