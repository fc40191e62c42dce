/* One stream's recurrence shared by a team of threads, step by step (the
 * sampler's team, in _kernels.pyx, runs on the same machinery).
 *
 * Scoring a text is a single stream (batch 1): each step multiplies h_{t-1}
 * by W_hh, one matrix-vector product, and the next step needs all of its
 * result. For a large layer (a 512-unit LSTM's W_hh is 4 MB) the step is
 * bound by reading W_hh, which no core's L2 holds. BLAS's GEMV splits each
 * product over its threads, with a hand-off per call, and streams the whole
 * matrix from the shared L3 at every step.
 *
 * Here each member of the team owns a share of the units, with all their
 * gates: its rows of W_hh, laid out once (by the member itself, so they
 * start in its own core's cache) for the strip GEMV of _gemv.h, and the
 * whole cell update of those units. A step: each member multiplies h_{t-1}
 * by its rows, updates its units and writes its share of h_t; then each
 * waits for the others to finish the step (one barrier per step: step t+1
 * reads all of h_t, and writes h_{t+1}, a different row). With two members
 * a 512-unit LSTM's share is 2 MB, more than a Zen 5 core's 1 MB L2; read
 * alternately forwards and backwards (charlm_gemv_dir), about half of it
 * comes from L2 at each step. C model of one layer (Zen 5): one thread 50 us
 * per step, two 26, two alternating 20.6; BLAS's GEMV on two threads ~35.
 *
 * Every output is summed in the same order as by charlm_gemv on one thread,
 * so the result does not depend on the number of members, to the last bit.
 *
 * The wait at the end of a step spins (a step lasts microseconds, less than
 * putting a thread to sleep and waking it), then yields the core once it
 * has waited long. On a busy machine a member's thread may be descheduled
 * for milliseconds; a barrier that waited for it at every step ran 5-6x
 * slower than one thread with two other processes busy on the 2 cores. So:
 * - the shares are claimed, not assigned: a member late to a step finds its
 *   share done by another and catches up (charlm_team_play); a member that
 *   was late has its share taken at once at the next steps, until it runs
 *   its own again;
 * - a member descheduled in the middle of its share still stalls the step:
 *   after a 3 ms wait the first member finishes the run alone, and teams
 *   play alone for the next 0.1 s;
 * - the threads beside the caller are helpers started once and parked
 *   between runs, awake for 2 ms after each (a new thread per run cost
 *   1-2 ms: it waits to be moved off its creator's core).
 * With two busy processes on the 2 cores (20,000 characters of a 2x512 LSTM
 * evaluated; 30,000 sampled from a 2x128 LSTM), the team ran at 0.9-1.1x
 * and 0.8x the speed of one thread. If a helper cannot be started, or
 * another team has them, the players take every share between them.
 */
#ifndef CHARLM_TEAM_H
#define CHARLM_TEAM_H

#include <stdlib.h>
#include <string.h>
#include "_fastmath.h"
#include "_gemv.h"
#include "_gru_units.h"
#include "_lstm_units.h"

#ifndef _WIN32
#include <pthread.h>
#include <sched.h>
#include <time.h>
#define CHARLM_HAS_THREADS 1
#else
#define CHARLM_HAS_THREADS 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CHARLM_SPIN_PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CHARLM_SPIN_PAUSE() __asm__ __volatile__("yield")
#else
#define CHARLM_SPIN_PAUSE() ((void)0)
#endif

#define CHARLM_TEAM_MAX 4
#define CHARLM_TEAM_SPINS 20000       /* ~0.1-1 ms of pauses, then yield */
#define CHARLM_TEAM_PATIENCE 256      /* pauses (~5 us) before taking a late share */
#define CHARLM_HELPER_SPINS 100000    /* pauses (~2 ms) a helper waits awake for a team */

/* The work of one share at step t (0 <= t < steps); t = -1: its preparation. */
typedef void (*charlm_team_task)(void* job, int share, int t);

/* A share's progress, alone on its cache line: passes started and finished
 * (pass 0 prepares, pass u >= 1 is step u - 1). */
typedef struct {
    int claimed, done;
    int late;                /* its member was late last time: take it at once */
    char pad[64 - 3 * sizeof(int)];
} __attribute__((aligned(64))) charlm_team_share;

typedef struct {
    charlm_team_share share[CHARLM_TEAM_MAX];
    int shares, steps;
    charlm_team_task task;
    void* job;
    int solo;                /* member 0 plays on alone: the others stop */
} charlm_team;

/* After a team that had to finish alone (see charlm_team_play), teams play
 * alone until then (seconds on charlm_team_now's clock, in microseconds). */
static long charlm_team_alone_until_us = 0;
static long charlm_team_solos = 0;     /* teams that went solo (for the tests) */
#define CHARLM_TEAM_ALONE_AFTER_SOLO 0.1   /* seconds */

#define CHARLM_TEAM_STALL 3e-3          /* seconds: a wait this long is a descheduled thread */

static inline double charlm_team_now(void)
{
#if CHARLM_HAS_THREADS
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec + 1e-9 * now.tv_nsec;
#else
    return 0;
#endif
}

static inline void charlm_team_spin(long* spins)
{
    if (++*spins < CHARLM_TEAM_SPINS)
        CHARLM_SPIN_PAUSE();
#if CHARLM_HAS_THREADS
    else
        sched_yield();
#endif
}

/* The first pass some share has not finished: passes before it are complete. */
static inline int charlm_team_front(charlm_team* team)
{
    int front = __atomic_load_n(&team->share[0].done, __ATOMIC_ACQUIRE);
    for (int s = 1; s < team->shares; s++) {
        int done = __atomic_load_n(&team->share[s].done, __ATOMIC_ACQUIRE);
        front = done < front ? done : front;
    }
    return front;
}

/* Member `member` runs share s's pass u unless someone has started it; a
 * load first, so that the usual answer (taken) costs no write to the line.
 * A share taken from its member marks that member late, until it runs its
 * own share again. */
static inline void charlm_team_try(charlm_team* team, int member, int s, int u)
{
    int expected = u;
    if (__atomic_load_n(&team->share[s].claimed, __ATOMIC_RELAXED) == u
        && __atomic_compare_exchange_n(&team->share[s].claimed, &expected, u + 1, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        if (__atomic_load_n(&team->share[s].late, __ATOMIC_RELAXED) != (s != member))
            __atomic_store_n(&team->share[s].late, s != member, __ATOMIC_RELAXED);
        team->task(team->job, s, u - 1);
        /* release: the share's writes are seen by whoever sees the count */
        __atomic_store_n(&team->share[s].done, u + 1, __ATOMIC_RELEASE);
    }
}

/* A member's loop. At each pass it runs its own share, then waits until
 * every share has finished the pass; if that takes long (the other member
 * is late: descheduled, on a busy machine), it runs any share no one has
 * started. A share is claimed by compare-and-swap, so exactly one member
 * runs it; in the steady state each member runs its own and keeps its
 * weights in its own core's cache, and touches the others' lines only to
 * see them finish. When a member's thread is held up the others do its
 * work, so the team runs at worst about as fast as one thread, and never
 * waits for the scheduler at every step. A member that comes back late
 * skips to the front. */
static void charlm_team_play(charlm_team* team, int member)
{
    const int passes = team->steps + 1;
    int u = 0;
    while (u < passes) {
        const int front = charlm_team_front(team);
        if (front > u) {
            u = front;
            continue;
        }
        if (member > 0 && __atomic_load_n(&team->solo, __ATOMIC_ACQUIRE))
            return;
        charlm_team_try(team, member, member, u);
        /* the shares of members late last time at once, then any after a while */
        for (int s = 0; s < team->shares; s++)
            if (__atomic_load_n(&team->share[s].late, __ATOMIC_RELAXED))
                charlm_team_try(team, member, s, u);
        long spins = 0;
        double waiting_since = 0;
        while (charlm_team_front(team) < u + 1) {
            if (spins % CHARLM_TEAM_PATIENCE == CHARLM_TEAM_PATIENCE - 1
                    || __atomic_load_n(&team->solo, __ATOMIC_RELAXED)) {
                for (int s = 0; s < team->shares; s++)
                    charlm_team_try(team, member, s, u);
                /* Waited so long that threads are being descheduled (more
                 * runnable threads than cores): a member holding a share it
                 * has started then stalls everyone until it runs again, at
                 * every step. The first member plays the rest alone. Not
                 * in the preparation (u = 0), which may take that long. */
                if (member == 0 && u > 0) {
                    if (waiting_since == 0)
                        waiting_since = charlm_team_now();
                    else if (charlm_team_now() - waiting_since > CHARLM_TEAM_STALL)
                        __atomic_store_n(&team->solo, 1, __ATOMIC_RELEASE);
                }
            }
            charlm_team_spin(&spins);
        }
        u++;
    }
}

/* A value one thread publishes and others wait for (the sampler's drawn id):
 * on a line of its own (charlm_alloc_lines), which only its writer writes. */
static inline void charlm_publish(int* flag, int value)
{
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
}

static inline void charlm_await(int* flag, int value)
{
    long spins = 0;
    while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < value)
        charlm_team_spin(&spins);
}

/* The helpers: threads started once, on first use, and parked between teams
 * on a condition variable. A thread started for each team cost 1-2 ms per
 * team on these machines (a new thread waits to be moved off the busy
 * core of its creator), against 5 us of work per character when sampling. */
#if CHARLM_HAS_THREADS
#include <signal.h>
#include <stdint.h>

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;               /* helper threads running: members 1..started */
    int busy;                  /* a team has the helpers */
    unsigned long generation;  /* one per team */
    charlm_team* team;         /* the current one */
    int playing;               /* helpers not done with it yet */
    int fork_handler;
} charlm_helpers = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, 0, 0};

static void* charlm_helper(void* arg)
{
    const int member = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&charlm_helpers.lock);
    for (;;) {
        while (__atomic_load_n(&charlm_helpers.generation, __ATOMIC_ACQUIRE) == seen)
            pthread_cond_wait(&charlm_helpers.wake, &charlm_helpers.lock);
        seen = charlm_helpers.generation;
        charlm_team* team = charlm_helpers.team;
        pthread_mutex_unlock(&charlm_helpers.lock);
        if (member < team->shares)
            charlm_team_play(team, member);
        /* release: done with the team, which lives on its caller's stack */
        __atomic_sub_fetch(&charlm_helpers.playing, 1, __ATOMIC_RELEASE);
        /* The next team often follows at once (the sampler's next block):
         * stay awake a while, on this core, rather than be woken later,
         * perhaps onto the caller's core. */
        for (long spins = 0; spins < CHARLM_HELPER_SPINS
                 && __atomic_load_n(&charlm_helpers.generation, __ATOMIC_ACQUIRE) == seen;
             spins++)
            CHARLM_SPIN_PAUSE();
        pthread_mutex_lock(&charlm_helpers.lock);
    }
    return NULL;
}

/* In a child process the helpers do not exist: start again from none. */
static void charlm_helpers_after_fork(void)
{
    pthread_mutex_init(&charlm_helpers.lock, NULL);
    pthread_cond_init(&charlm_helpers.wake, NULL);
    charlm_helpers.started = 0;
    charlm_helpers.busy = 0;
    charlm_helpers.playing = 0;
}

/* With the lock held: start helpers up to `wanted`; returns how many run.
 * They start with every signal blocked, so that signals go to the threads
 * that handle them (Python's main thread). */
static int charlm_helpers_start(int wanted)
{
    sigset_t all, previous;
    if (!charlm_helpers.fork_handler)
        charlm_helpers.fork_handler = pthread_atfork(NULL, NULL, charlm_helpers_after_fork) == 0;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    while (charlm_helpers.started < wanted) {
        pthread_t thread;
        intptr_t member = charlm_helpers.started + 1;
        if (pthread_create(&thread, NULL, charlm_helper, (void*)member) != 0)
            break;
        pthread_detach(thread);
        charlm_helpers.started++;
    }
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    return charlm_helpers.started;
}
#endif

/* Run `steps` steps of `task` over `shares` shares: the caller and up to
 * shares - 1 helpers play. Helpers that cannot be started, or that another
 * team has (two Python threads at once), are no matter: the players take
 * every share between them. */
static void charlm_team_run(int shares, int steps, charlm_team_task task, void* job)
{
    charlm_team team;
    memset(&team, 0, sizeof team);
    team.shares = shares;
    team.steps = steps;
    team.task = task;
    team.job = job;
#if CHARLM_HAS_THREADS
    int helpers = 0;
    if (shares > 1 && charlm_team_now() * 1e6
                          >= __atomic_load_n(&charlm_team_alone_until_us, __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&charlm_helpers.lock);
        if (!charlm_helpers.busy && charlm_helpers_start(shares - 1) > 0) {
            charlm_helpers.busy = 1;
            helpers = charlm_helpers.started;
            charlm_helpers.team = &team;
            __atomic_store_n(&charlm_helpers.playing, helpers, __ATOMIC_RELAXED);
            __atomic_add_fetch(&charlm_helpers.generation, 1, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&charlm_helpers.wake);
        }
        pthread_mutex_unlock(&charlm_helpers.lock);
    }
    charlm_team_play(&team, 0);
    if (helpers > 0) {
        long spins = 0;
        while (__atomic_load_n(&charlm_helpers.playing, __ATOMIC_ACQUIRE) > 0)
            charlm_team_spin(&spins);
        pthread_mutex_lock(&charlm_helpers.lock);
        charlm_helpers.busy = 0;
        pthread_mutex_unlock(&charlm_helpers.lock);
        if (team.solo) {        /* the machine is oversubscribed: not again soon */
            __atomic_store_n(&charlm_team_alone_until_us,
                             (long)((charlm_team_now() + CHARLM_TEAM_ALONE_AFTER_SOLO) * 1e6),
                             __ATOMIC_RELAXED);
            __atomic_add_fetch(&charlm_team_solos, 1, __ATOMIC_RELAXED);
        }
    }
#else
    charlm_team_play(&team, 0);
#endif
}


/* Units [0, H) split into `shares` consecutive shares [u0[m], u0[m] + n[m]),
 * each but the last a whole number of cache lines of a state row (items of
 * `itemsize` bytes), so that no two members write the same line of h.
 * Returns -1 if a share would be empty. */
static int charlm_team_split(int H, int shares, int itemsize, int* u0, int* n)
{
    const int line = 64 / itemsize;
    int start = 0;
    for (int m = 0; m < shares; m++) {
        int end = m + 1 == shares ? H : (int)((long)H * (m + 1) / shares / line * line);
        if (end <= start)
            return -1;
        u0[m] = start;
        n[m] = end - start;
        start = end;
    }
    return 0;
}


/* The recurrences. Cells as _kernels.pyx numbers them. */
enum { CHARLM_LSTM = 0, CHARLM_GRU = 1, CHARLM_RNN_TANH = 2, CHARLM_RNN_RELU = 3 };

#define CHARLM_DEFINE_ONE_STREAM(SUFFIX, REAL, TANH)                             \
                                                                                  \
/* A member's share: units [u0, u0 + n), blocks gate blocks of n each. */         \
typedef struct {                                                                  \
    int u0, n;                                                                    \
    int* rows;            /* (blocks*n): its rows of W_hh, gate block by block */\
    REAL* laid_out;       /* (H, blocks*n): W_hh[rows].T laid out for gemv */    \
    REAL* pre;            /* (blocks*n): its gates, pre-activation, activated */ \
    REAL* hh;             /* GRU (3n): W_hh h_{t-1} + b_hh for its units */      \
    REAL* peep;           /* LSTM with peepholes (3n), else NULL */              \
} charlm_share_##SUFFIX;                                                         \
                                                                                  \
typedef struct {                                                                  \
    int cell, H, blocks;                                                          \
    const REAL* W_hh;     /* (blocks*H, H) */                                    \
    REAL* gates;          /* (T, blocks*H), as the single-thread kernels take */ \
    REAL* h;              /* (T+1, H) */                                         \
    REAL* c;              /* LSTM (T+1, H) */                                    \
    REAL* tanh_c;         /* LSTM (T, H) */                                      \
    const REAL* peep;     /* LSTM (3H) or NULL */                                \
    const REAL* b_hh;     /* GRU (3H) */                                         \
    REAL* hn;             /* GRU (T, H) */                                       \
    charlm_share_##SUFFIX share[CHARLM_TEAM_MAX];                                 \
} charlm_one_stream_##SUFFIX;                                                    \
                                                                                  \
/* n values from each of `blocks` blocks, dst[q*dst_stride + j] =            \
 * src[q*src_stride + j]: a share's slice of each gate block (stride H)        \
 * gathered together (stride n), or scattered back. */                         \
static inline void charlm_copy_blocks_##SUFFIX(REAL* dst, size_t dst_stride,    \
                                               const REAL* src,                   \
                                               size_t src_stride,                 \
                                               int blocks, int n)                 \
{                                                                                 \
    for (int q = 0; q < blocks; q++)                                              \
        memcpy(dst + q * dst_stride, src + q * src_stride, n * sizeof(REAL));     \
}                                                                                 \
                                                                                  \
static void charlm_one_stream_task_##SUFFIX(void* arg, int share, int t)         \
{                                                                                 \
    charlm_one_stream_##SUFFIX* job = (charlm_one_stream_##SUFFIX*)arg;          \
    charlm_share_##SUFFIX* s = &job->share[share];                                \
    const int H = job->H, n = s->n, u0 = s->u0, width = job->blocks * n;          \
    if (t < 0) {                                                                  \
        charlm_gemv_layout_rows_##SUFFIX(H, width, job->W_hh, 1, H, s->rows,      \
                                         s->laid_out);                            \
        return;                                                                   \
    }                                                                             \
    REAL* gate = job->gates + (size_t)t * job->blocks * H + u0;                   \
    const REAL* h_prev = job->h + (size_t)t * H;  /* all of h_{t-1} */            \
    REAL* h = job->h + (size_t)(t + 1) * H + u0;  /* this share of h_t */         \
    /* alternate steps mirror the strips' order (the same sums) */               \
    const int order = t & 1 ? CHARLM_GEMV_STRIPS_BACKWARDS : CHARLM_GEMV_FORWARDS;\
    switch (job->cell) {                                                          \
    case CHARLM_LSTM:                                                             \
        /* pre = a + W_hh h_{t-1}   (4n) */                                       \
        charlm_copy_blocks_##SUFFIX(s->pre, n, gate, H, 4, n);                    \
        charlm_gemv_dir_##SUFFIX(H, width, h_prev, s->laid_out, s->pre, order);    \
        charlm_lstm_forward_units_##SUFFIX(                                       \
            n, s->pre, job->c + (size_t)t * H + u0, job->c + (size_t)(t + 1) * H + u0,\
            job->tanh_c + (size_t)t * H + u0, h, s->peep);                        \
        charlm_copy_blocks_##SUFFIX(gate, H, s->pre, n, 4, n);                    \
        break;                                                                    \
    case CHARLM_GRU:                                                              \
        /* hh = W_hh h_{t-1} + b_hh   (3n) */                                     \
        charlm_copy_blocks_##SUFFIX(s->hh, n, job->b_hh + u0, H, 3, n);           \
        charlm_gemv_dir_##SUFFIX(H, width, h_prev, s->laid_out, s->hh, order);     \
        charlm_copy_blocks_##SUFFIX(s->pre, n, gate, H, 3, n);                    \
        charlm_gru_forward_units_##SUFFIX(n, s->pre, s->hh, h_prev + u0, h);      \
        charlm_copy_blocks_##SUFFIX(gate, H, s->pre, n, 3, n);                    \
        memcpy(job->hn + (size_t)t * H + u0, s->hh + 2 * (size_t)n,               \
               n * sizeof(REAL));                                                 \
        break;                                                                    \
    default:                                                                      \
        /* the pre-activations in place: one gate block */                        \
        charlm_gemv_dir_##SUFFIX(H, n, h_prev, s->laid_out, gate, order);         \
        for (int j = 0; j < n; j++)                                               \
            h[j] = job->cell == CHARLM_RNN_RELU ? (gate[j] > 0 ? gate[j] : 0)     \
                                                : TANH(gate[j]);                  \
    }                                                                             \
}                                                                                 \
                                                                                  \
static void charlm_one_stream_free_##SUFFIX(charlm_one_stream_##SUFFIX* job)     \
{                                                                                 \
    for (int m = 0; m < CHARLM_TEAM_MAX; m++) {                                   \
        free(job->share[m].rows);                                                 \
        charlm_free_lines(job->share[m].laid_out);                                \
    }                                                                             \
}                                                                                 \
                                                                                  \
/* The members' shares of units (charlm_team_split), each with its buffers. */   \
static int charlm_one_stream_shares_##SUFFIX(charlm_one_stream_##SUFFIX* job,    \
                                             int members)                         \
{                                                                                 \
    const int H = job->H, blocks = job->blocks;                                   \
    int u0[CHARLM_TEAM_MAX], n[CHARLM_TEAM_MAX];                                  \
    if (charlm_team_split(H, members, (int)sizeof(REAL), u0, n) != 0)             \
        return -1;                                                                \
    for (int m = 0; m < members; m++) {                                           \
        charlm_share_##SUFFIX* s = &job->share[m];                                \
        s->u0 = u0[m];                                                            \
        s->n = n[m];                                                              \
        size_t width = (size_t)blocks * s->n;                                     \
        s->rows = (int*)malloc(width * sizeof(int));                              \
        /* laid_out, pre, hh, peep in one block */                                \
        s->laid_out = (REAL*)charlm_alloc_lines((H * width + width              \
                                                 + 6 * (size_t)s->n) * sizeof(REAL));\
        if (s->rows == NULL || s->laid_out == NULL)                               \
            return -1;                                                            \
        s->pre = s->laid_out + H * width;                                         \
        s->hh = s->pre + width;                                                   \
        s->peep = NULL;                                                           \
        for (int q = 0; q < blocks; q++)                                          \
            for (int j = 0; j < s->n; j++)                                        \
                s->rows[q * s->n + j] = q * H + s->u0 + j;                        \
        if (job->peep != NULL) {                                                  \
            s->peep = s->hh + 3 * (size_t)s->n;                                   \
            charlm_copy_blocks_##SUFFIX(s->peep, s->n, job->peep + s->u0, H, 3, s->n); \
        }                                                                         \
    }                                                                             \
    return 0;                                                                     \
}                                                                                 \
                                                                                  \
/* Run a single stream's recurrence over T steps on `members` threads; the      \
 * arrays as the single-thread kernels take them with B = 1 (unused ones NULL). \
 * Returns 0, or -1 when out of memory or H too small to share (nothing is      \
 * written then: the caller runs it the usual way). */                           \
static int charlm_one_stream_forward_##SUFFIX(                                   \
    int cell, int members, int T, int H, REAL* gates, const REAL* W_hh,          \
    REAL* h, REAL* c, REAL* tanh_c, const REAL* peep, const REAL* b_hh,          \
    REAL* hn)                                                                     \
{                                                                                 \
    charlm_one_stream_##SUFFIX job;                                               \
    memset(&job, 0, sizeof job);                                                  \
    job.cell = cell;                                                              \
    job.H = H;                                                                    \
    job.blocks = cell == CHARLM_LSTM ? 4 : cell == CHARLM_GRU ? 3 : 1;            \
    job.W_hh = W_hh;                                                              \
    job.gates = gates;                                                            \
    job.h = h;                                                                    \
    job.c = c;                                                                    \
    job.tanh_c = tanh_c;                                                          \
    job.peep = peep;                                                              \
    job.b_hh = b_hh;                                                              \
    job.hn = hn;                                                                  \
    if (members < 1 || members > CHARLM_TEAM_MAX                                  \
            || charlm_one_stream_shares_##SUFFIX(&job, members) != 0) {           \
        charlm_one_stream_free_##SUFFIX(&job);                                    \
        return -1;                                                                \
    }                                                                             \
    charlm_team_run(members, T, charlm_one_stream_task_##SUFFIX, &job);           \
    charlm_one_stream_free_##SUFFIX(&job);                                        \
    return 0;                                                                     \
}

CHARLM_DEFINE_ONE_STREAM(f, float, charlm_tanhf)
CHARLM_DEFINE_ONE_STREAM(d, double, tanh)


/* A product over a whole chunk (an upper layer's input projection, in a
 * single-stream evaluation) with its rows shared out to the team: c (M, N)
 * (+)= a (M, K) @ packed (+ bias), rows [r0, r1) by share s. The team's other
 * thread would otherwise wait while the calling thread runs it: 14% of the
 * time of a 2x512 LSTM's evaluation (Intel Xeon). Each row is summed as by
 * one thread (the micro-kernel's sum over k does not depend on the row
 * blocks, and every share has at least CHARLM_ROWS_OUTER_MIN rows, so the
 * sweep's loop order is the same), so the result does not depend on the
 * number of threads, to the last bit. All of it is done in pass 0, where a
 * late member's share waits for it rather than being finished alone. */
#define CHARLM_DEFINE_TEAM_ROWS_GEMM(SUFFIX, REAL)                               \
typedef struct {                                                                  \
    int M, N, K, lda, ldc, accumulate, shares;                                    \
    const REAL* a;                                                                \
    const REAL* packed;                                                           \
    const REAL* bias;                                                             \
    REAL* c;                                                                      \
} charlm_rows_job_##SUFFIX;                                                       \
                                                                                  \
static void charlm_rows_task_##SUFFIX(void* job_, int s, int t)                  \
{                                                                                 \
    const charlm_rows_job_##SUFFIX* job = (const charlm_rows_job_##SUFFIX*)job_;  \
    const int r0 = (int)((long)job->M * s / job->shares);                         \
    const int r1 = (int)((long)job->M * (s + 1) / job->shares);                   \
    const REAL* a = job->a + (size_t)r0 * job->lda;                               \
    REAL* c = job->c + (size_t)r0 * job->ldc;                                     \
    if (t != -1)                                /* all in pass 0 */               \
        return;                                                                   \
    if (job->bias != NULL)                                                        \
        charlm_packed_gemm_bias_##SUFFIX(r1 - r0, job->N, job->K, a, job->lda,    \
                                         job->packed, job->bias, c, job->ldc);    \
    else                                                                          \
        charlm_packed_gemm_##SUFFIX(r1 - r0, job->N, job->K, a, job->lda,         \
                                    job->packed, job->accumulate, c, job->ldc);   \
}                                                                                 \
                                                                                  \
/* Returns 0 if run on the team, -1 if the rows are too few to share. */         \
static int charlm_team_rows_gemm_##SUFFIX(int members, int M, int N, int K,       \
                                          const REAL* a, int lda,                 \
                                          const REAL* packed, const REAL* bias,   \
                                          int accumulate, REAL* c, int ldc)       \
{                                                                                 \
    charlm_rows_job_##SUFFIX job;                                                 \
    if (members > CHARLM_TEAM_MAX)                                                \
        members = CHARLM_TEAM_MAX;                                                \
    while (members > 1 && M / members < CHARLM_ROWS_OUTER_MIN)                    \
        members--;                                                                \
    if (members < 2)                                                              \
        return -1;                                                                \
    job.M = M; job.N = N; job.K = K; job.lda = lda; job.ldc = ldc;                \
    job.accumulate = accumulate; job.shares = members;                            \
    job.a = a; job.packed = packed; job.bias = bias; job.c = c;                   \
    charlm_team_run(members, 0, charlm_rows_task_##SUFFIX, &job);                 \
    return 0;                                                                     \
}

CHARLM_DEFINE_TEAM_ROWS_GEMM(f, float)
CHARLM_DEFINE_TEAM_ROWS_GEMM(d, double)

#endif
