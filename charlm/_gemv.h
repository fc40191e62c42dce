/* One row times a matrix: y[0:N] += x[0:K] @ Bt[0:K, 0:N].
 *
 * Sampling at batch 1 multiplies one state row by every weight matrix once
 * per character, so a step is bound by reading the weights (a 2x128 LSTM
 * reads 0.8 MB per character, from L2). Through BLAS's GEMV each product
 * also paid a call through the Fortran interface and OpenBLAS's hand-off to
 * its second thread, and its kernel read the weights at about 80 GB/s on a
 * Zen 4 core; this loop reads them at about 100.
 *
 * Each x[k] scales row k of Bt, which is added to y: a block of vectors of
 * y (a strip of Bt's columns) stays in registers for the whole sum over k.
 * The matrix is laid out once (charlm_gemv_layout) strip by strip, each
 * strip's K rows contiguous, so the loop reads one sequential stream: on a
 * Zen 5 core, a 2x128 GRU's matrices (620 KB, in L2) went through at 215
 * GB/s laid out so, against 116 as one transposed matrix, whose strips are
 * rows apart (a C model of one sampling step). No horizontal sums: every
 * output is accumulated in k order, one FMA at a time, so results match a
 * plain dot product to rounding and do not depend on the width.
 *
 * Strips are 8 vectors wide: 8 independent FMA chains per k hide the FMA's
 * latency (4 cycles, 2 per cycle). A strip of fewer vectors is bound by that
 * latency, not by the FMA units: it costs as much per k as a whole strip.
 * So the columns left over after the whole strips (N is rarely a multiple of
 * 8 vectors: a team member's 3 x 64 GRU gates, the 65 outputs of a vocabulary)
 * do not form a strip of their own but widen the last one (up to
 * CHARLM_GEMV_MAX_VECS vectors, a register each), and the last columns that
 * do not fill a vector ride in one more vector, whose lanes past the matrix's
 * width are computed and thrown away. One core of an Intel Xeon, K = 128,
 * ns per product (C harness): a 2x128 GRU team member's 3 x 64 gate rows
 * (8 vectors + 4) 1123 -> 1039; the 65 outputs of a vocabulary (4 vectors
 * + 1 column) 273 -> 264; whole strips (256, 512) unchanged. (Matrices of
 * that size come from L2: the whole strips run at ~90 GB/s, bound by it.)
 * Written with GCC vector extensions, like _packed_gemm.h.
 */
#ifndef CHARLM_GEMV_H
#define CHARLM_GEMV_H

#include <stddef.h>
#include <string.h>
#include "_packed_gemm.h"      /* CHARLM_VBYTES and the unaligned vector types */

#define CHARLM_GEMV_VECS 8     /* vectors of y per whole strip */
/* The orders charlm_gemv_dir reads a matrix in. */
#define CHARLM_GEMV_FORWARDS 0
#define CHARLM_GEMV_STRIPS_BACKWARDS 1
#define CHARLM_GEMV_REVERSED 2
#define CHARLM_GEMV_STRIP_F (CHARLM_GEMV_VECS * CHARLM_VBYTES / 4)   /* columns per strip */
#define CHARLM_GEMV_STRIP_D (CHARLM_GEMV_VECS * CHARLM_VBYTES / 8)
/* Accumulators a widened last strip may hold, its partial vector included,
 * with one register left for x[k]: 32 vector registers with AVX-512, 16
 * with AVX2 or SSE. */
#if CHARLM_VBYTES == 64
#define CHARLM_GEMV_MAX_VECS 16
#else
#define CHARLM_GEMV_MAX_VECS 14
#endif

/* The strips of a K x N matrix with `strip` columns per whole strip: the
 * width of the one starting at column n0 (0 past the end). The last whole
 * strip takes the leftover columns when the sum still fits the registers. */
static inline int charlm_gemv_strip_width(int N, int n0, int strip, int lanes)
{
    const int left = N - n0;
    if (left <= 0)
        return 0;
    if (left < 2 * strip && (left + lanes - 1) / lanes <= CHARLM_GEMV_MAX_VECS)
        return left;
    return left < strip ? left : strip;
}

/* The first column of the last strip: all before it are whole strips, and
 * it is less than two strips wide, so it starts at the last multiple of
 * `strip` before N or at the one before that. */
static inline int charlm_gemv_last_strip(int N, int strip, int lanes)
{
    int n0 = N > strip ? ((N - 1) / strip - 1) * strip : 0;
    if (n0 + charlm_gemv_strip_width(N, n0, strip, lanes) < N)
        n0 += strip;
    return n0;
}

#define CHARLM_DEFINE_GEMV(SUFFIX, REAL, VEC)                                     \
                                                                                  \
/* The last row of a strip with a tail: its whole vectors into acc, its tail     \
 * column by column into y_tail (a vector load would run past the matrix). */    \
static inline __attribute__((always_inline)) void                                 \
charlm_gemv_last_row_##SUFFIX(const int vecs, int tail, const REAL x_k,            \
                              const REAL* row, VEC* acc, REAL* y_tail)            \
{                                                                                 \
    const int lanes = (int)(sizeof(VEC) / sizeof(REAL));                          \
    for (int v = 0; v < vecs; v++)                                                \
        acc[v] += x_k * *(const VEC*)(row + v * lanes);                           \
    for (int j = 0; j < tail; j++)                                                \
        y_tail[j] += x_k * row[vecs * lanes + j];                                 \
}                                                                                 \
                                                                                  \
/* y[0:width] += x @ Bt[:, 0:width], width = vecs*lanes + tail, Bt row-major      \
 * with rows `width` apart (a strip of the layout). `vecs` and                    \
 * `has_tail` are compile-time constants in every call (always inlined into a     \
 * switch), so the accumulators stay in registers. The tail (0 < tail < lanes     \
 * columns) is one more vector whose load runs into the next row; at the last     \
 * row it would run past the matrix, so that row's tail is added column by        \
 * column. Every column still gets one FMA per k, in k order, or from the last    \
 * k to the first when `reversed` (the rows read last to first). */               \
static inline __attribute__((always_inline)) void                                 \
charlm_gemv_block_##SUFFIX(const int vecs, const int has_tail, int tail, int K,   \
                           const REAL* x, const REAL* bt, REAL* y,                \
                           const int reversed)                                    \
{                                                                                 \
    const int lanes = (int)(sizeof(VEC) / sizeof(REAL));                          \
    const int ldb = vecs * lanes + tail;  /* a constant without a tail */         \
    VEC acc[CHARLM_GEMV_MAX_VECS];                                                \
    VEC acc_tail = {0};                                                           \
    REAL y_tail[sizeof(VEC) / sizeof(REAL)] = {0};                                \
    const int k_vector = has_tail && K > 0 ? K - 1 : K;  /* rows whole vectors */ \
    int v, k;                                                                     \
    for (v = 0; v < vecs; v++)                                                    \
        acc[v] = *(const VEC*)(y + v * lanes);                                    \
    if (has_tail) {                                                               \
        memcpy(y_tail, y + vecs * lanes, tail * sizeof(REAL));                    \
        acc_tail = *(const VEC*)y_tail;                                           \
    }                                                                             \
    if (has_tail && reversed && k_vector < K) {  /* the last row first */         \
        charlm_gemv_last_row_##SUFFIX(vecs, tail, x[k_vector],                    \
                                      bt + (size_t)k_vector * ldb, acc, y_tail);  \
        acc_tail = *(const VEC*)y_tail;                                           \
    }                                                                             \
    for (k = 0; k < k_vector; k++) {                                              \
        const REAL x_k = x[reversed ? k_vector - 1 - k : k];                      \
        const REAL* row = bt + (size_t)(reversed ? k_vector - 1 - k : k) * ldb;   \
        for (v = 0; v < vecs; v++)                                                \
            acc[v] += x_k * *(const VEC*)(row + v * lanes);                       \
        if (has_tail)                                                             \
            acc_tail += x_k * *(const VEC*)(row + vecs * lanes);                  \
    }                                                                             \
    if (has_tail) {                                                               \
        memcpy(y_tail, &acc_tail, sizeof y_tail);                                 \
        if (!reversed && k_vector < K)  /* the last row */                        \
            charlm_gemv_last_row_##SUFFIX(vecs, tail, x[k_vector],                \
                                          bt + (size_t)k_vector * ldb, acc, y_tail);\
        memcpy(y + vecs * lanes, y_tail, tail * sizeof(REAL));                    \
    }                                                                             \
    for (v = 0; v < vecs; v++)                                                    \
        *(VEC*)(y + v * lanes) = acc[v];                                          \
}                                                                                 \
                                                                                  \
/* y[0:width] += x @ Bt[:, 0:width] for one strip of any width up to              \
 * CHARLM_GEMV_MAX_VECS vectors (the partial one included), the rows read         \
 * last to first when `reversed` (a constant wherever this is inlined). */        \
static inline __attribute__((always_inline)) void                                 \
charlm_gemv_any_strip_##SUFFIX(int K, int width, const REAL* x, const REAL* bt,   \
                               REAL* y, const int reversed)                       \
{                                                                                 \
    const int lanes = (int)(sizeof(VEC) / sizeof(REAL));                          \
    const int vecs = width / lanes, tail = width % lanes;                         \
    switch (2 * vecs + (tail > 0)) {                                              \
    CHARLM_GEMV_CASES(SUFFIX)                                                     \
    default: break;             /* wider than the layout ever makes */            \
    }                                                                             \
}                                                                                 \
                                                                                  \
static inline void charlm_gemv_strip_##SUFFIX(int K, int width, const REAL* x,    \
                                              const REAL* bt, REAL* y)            \
{                                                                                 \
    charlm_gemv_any_strip_##SUFFIX(K, width, x, bt, y, 0);                        \
}                                                                                 \
                                                                                  \
/* The same, the rows read last to first. Out of line: only large matrices        \
 * (whose reading order matters) take it, and small ones keep their code          \
 * compact. */                                                                    \
static __attribute__((noinline)) void                                             \
charlm_gemv_strip_reversed_##SUFFIX(int K, int width, const REAL* x,              \
                                    const REAL* bt, REAL* y)                      \
{                                                                                 \
    charlm_gemv_any_strip_##SUFFIX(K, width, x, bt, y, 1);                        \
}

/* The cases of charlm_gemv_any_strip's switch, which name its arguments. */
#define CHARLM_GEMV_CASE(SUFFIX, V)                                               \
    case 2 * V: charlm_gemv_block_##SUFFIX(V, 0, 0, K, x, bt, y, reversed); break;\
    case 2 * V + 1: charlm_gemv_block_##SUFFIX(V, 1, tail, K, x, bt, y, reversed); break;

#if CHARLM_GEMV_MAX_VECS == 16
#define CHARLM_GEMV_CASES_ABOVE_13(SUFFIX)                                        \
    CHARLM_GEMV_CASE(SUFFIX, 14) CHARLM_GEMV_CASE(SUFFIX, 15)                     \
    case 2 * 16: charlm_gemv_block_##SUFFIX(16, 0, 0, K, x, bt, y, reversed); break;
#else
#define CHARLM_GEMV_CASES_ABOVE_13(SUFFIX)                                        \
    case 2 * 14: charlm_gemv_block_##SUFFIX(14, 0, 0, K, x, bt, y, reversed); break;
#endif
/* Every (vectors, tail) a strip can have: up to CHARLM_GEMV_MAX_VECS
 * registers, the partial vector counted. */
#define CHARLM_GEMV_CASES(SUFFIX)                                                 \
    case 1: charlm_gemv_block_##SUFFIX(0, 1, tail, K, x, bt, y, reversed); break; \
    CHARLM_GEMV_CASE(SUFFIX, 1) CHARLM_GEMV_CASE(SUFFIX, 2)                       \
    CHARLM_GEMV_CASE(SUFFIX, 3) CHARLM_GEMV_CASE(SUFFIX, 4)                       \
    CHARLM_GEMV_CASE(SUFFIX, 5) CHARLM_GEMV_CASE(SUFFIX, 6)                       \
    CHARLM_GEMV_CASE(SUFFIX, 7) CHARLM_GEMV_CASE(SUFFIX, 8)                       \
    CHARLM_GEMV_CASE(SUFFIX, 9) CHARLM_GEMV_CASE(SUFFIX, 10)                      \
    CHARLM_GEMV_CASE(SUFFIX, 11) CHARLM_GEMV_CASE(SUFFIX, 12)                     \
    CHARLM_GEMV_CASE(SUFFIX, 13)                                                  \
    CHARLM_GEMV_CASES_ABOVE_13(SUFFIX)

CHARLM_DEFINE_GEMV(f, float, charlm_vf)
CHARLM_DEFINE_GEMV(d, double, charlm_vd)

/* The strip layout. Bt (K x N) is cut into strips (charlm_gemv_strip_width),
 * and each strip is stored as its own row-major K x width block, one after
 * the other: K*N values in all. */
#define CHARLM_DEFINE_GEMV_LAYOUT(SUFFIX, REAL, STRIP)                            \
                                                                                  \
/* Lay out the K x N matrix Bt whose element (k, n) is                            \
 * b[k*stride_k + r*stride_n], r = rows[n], or n when rows is NULL: (1, K)        \
 * takes a row-major (N, K) weight matrix W as Bt = W.T, and `rows` picks some    \
 * of W's rows (a team member's share, _team.h). */                               \
static inline void charlm_gemv_layout_rows_##SUFFIX(int K, int N, const REAL* b,  \
                                                    ptrdiff_t stride_k,           \
                                                    ptrdiff_t stride_n,           \
                                                    const int* rows, REAL* out)   \
{                                                                                 \
    const int lanes = (int)(sizeof(charlm_v##SUFFIX) / sizeof(REAL));             \
    int n0, k, j, width;                                                          \
    for (n0 = 0; (width = charlm_gemv_strip_width(N, n0, STRIP, lanes)) > 0;      \
         n0 += width)                                                             \
        for (k = 0; k < K; k++)                                                   \
            for (j = 0; j < width; j++)                                           \
                *out++ = b[k * stride_k                                           \
                           + (ptrdiff_t)(rows ? rows[n0 + j] : n0 + j) * stride_n]; \
}                                                                                 \
                                                                                  \
static inline void charlm_gemv_layout_##SUFFIX(int K, int N, const REAL* b,       \
                                               ptrdiff_t stride_k,                \
                                               ptrdiff_t stride_n, REAL* out)     \
{                                                                                 \
    charlm_gemv_layout_rows_##SUFFIX(K, N, b, stride_k, stride_n, NULL, out);     \
}                                                                                 \
                                                                                  \
/* y[0:N] += x[0:K] @ Bt, Bt laid out by charlm_gemv_layout, read in one of       \
 * three orders (a CHARLM_GEMV_* order):                                          \
 * - FORWARDS: strip by strip, each strip's rows first to last;                   \
 * - STRIPS_BACKWARDS: the strips last to first, each still row by row from the   \
 *   first: each output's sum the same as forwards, to the last bit;              \
 * - REVERSED: every row of the layout last to first, the exact reverse of        \
 *   FORWARDS: each output summed from its last k to its first (round-off).       \
 * The order matters for a matrix larger than the cache that is read at every     \
 * step: read alternately forwards and backwards, each pass starts with the       \
 * strips the last one read, still in cache, where a pass always in the same      \
 * order finds none of them there (the cache evicts the least recently used       \
 * lines: exactly the next ones wanted). With STRIPS_BACKWARDS the strip that     \
 * was only partly in cache is lost all the same (its first rows, read first,     \
 * evict its last ones, the oldest there): REVERSED keeps all of it. */           \
static inline void charlm_gemv_dir_##SUFFIX(int K, int N, const REAL* x,          \
                                            const REAL* laid_out, REAL* y,        \
                                            int order)                            \
{                                                                                 \
    const int lanes = (int)(sizeof(charlm_v##SUFFIX) / sizeof(REAL));             \
    const int n_last = charlm_gemv_last_strip(N, STRIP, lanes);                   \
    /* the whole strips, the last one too when it is one */                       \
    const int whole = N - n_last == STRIP ? n_last / STRIP + 1 : n_last / STRIP;  \
    const int n_rest = whole * STRIP;   /* a widened or narrower last strip */    \
    const int backwards = order != CHARLM_GEMV_FORWARDS;                          \
    int s;                                                                        \
    if (order == CHARLM_GEMV_REVERSED) {                                          \
        if (n_rest < N)                                                           \
            charlm_gemv_strip_reversed_##SUFFIX(K, N - n_rest, x,                 \
                                                laid_out + (size_t)n_rest * K,    \
                                                y + n_rest);                      \
        for (s = whole - 1; s >= 0; s--)                                          \
            charlm_gemv_strip_reversed_##SUFFIX(K, STRIP, x,                      \
                                                laid_out + (size_t)s * STRIP * K, \
                                                y + s * STRIP);                   \
        return;                                                                   \
    }                                                                             \
    if (backwards && n_rest < N)                                                  \
        charlm_gemv_strip_##SUFFIX(K, N - n_rest, x, laid_out + (size_t)n_rest * K, \
                                   y + n_rest);                                   \
    for (s = 0; s < whole; s++) {                                                 \
        const int n0 = (backwards ? whole - 1 - s : s) * STRIP;                   \
        charlm_gemv_block_##SUFFIX(CHARLM_GEMV_VECS, 0, 0, K, x,                  \
                                   laid_out + (size_t)n0 * K, y + n0, 0);         \
    }                                                                             \
    if (!backwards && n_rest < N)                                                 \
        charlm_gemv_strip_##SUFFIX(K, N - n_rest, x, laid_out + (size_t)n_rest * K, \
                                   y + n_rest);                                   \
}                                                                                 \
                                                                                  \
/* y[0:N] += x[0:K] @ Bt, Bt laid out by charlm_gemv_layout. */                   \
static inline void charlm_gemv_##SUFFIX(int K, int N, const REAL* x,              \
                                        const REAL* laid_out, REAL* y)            \
{                                                                                 \
    charlm_gemv_dir_##SUFFIX(K, N, x, laid_out, y, CHARLM_GEMV_FORWARDS);         \
}

CHARLM_DEFINE_GEMV_LAYOUT(f, float, CHARLM_GEMV_STRIP_F)
CHARLM_DEFINE_GEMV_LAYOUT(d, double, CHARLM_GEMV_STRIP_D)

#endif
