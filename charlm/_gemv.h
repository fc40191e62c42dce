/* One row times a matrix: y[0:N] += x[0:K] @ Bt[0:K, 0:N].
 *
 * Sampling at batch 1 multiplies one state row by every weight matrix once
 * per character, so a step is bound by reading the weights (a 2x128 LSTM
 * reads 0.8 MB per character, from L2). Through BLAS's GEMV each product
 * also paid a call through the Fortran interface and OpenBLAS's hand-off to
 * its second thread, and its kernel read the weights at about 80 GB/s on a
 * Zen 4 core; this loop reads them at about 100.
 *
 * Each x[k] scales row k of Bt, which is added to y: a block of up to 8
 * vectors of y (a strip of Bt's columns) stays in registers for the whole sum
 * over k (8 independent FMA chains, enough to hide their latency). The
 * matrix is laid out once (charlm_gemv_layout) strip by strip, each strip's
 * K rows contiguous, so the loop reads one sequential stream: on a Zen 5
 * core, a 2x128 GRU's matrices (620 KB, in L2) went through at 215 GB/s
 * laid out so, against 116 as one transposed matrix, whose strips are rows
 * apart (a C model of one sampling step). No horizontal sums:
 * every output is accumulated in k order, one FMA at a time, so results
 * match a plain dot product to rounding and do not depend on the width.
 * Written with GCC vector extensions, like _packed_gemm.h.
 */
#ifndef CHARLM_GEMV_H
#define CHARLM_GEMV_H

#include <stddef.h>
#include "_packed_gemm.h"      /* CHARLM_VBYTES and the unaligned vector types */

#define CHARLM_GEMV_VECS 8     /* vectors of y held in registers per block */
#define CHARLM_GEMV_STRIP_F (CHARLM_GEMV_VECS * CHARLM_VBYTES / 4)   /* columns per strip */
#define CHARLM_GEMV_STRIP_D (CHARLM_GEMV_VECS * CHARLM_VBYTES / 8)

#define CHARLM_DEFINE_GEMV(SUFFIX, REAL, VEC)                                    \
                                                                                  \
/* y[0 : vecs*lanes] += x @ Bt[:, 0 : vecs*lanes], for a compile-time `vecs`     \
 * (always inlined into a switch, so acc stays in registers). */                 \
static inline __attribute__((always_inline)) void                                \
charlm_gemv_block_##SUFFIX(const int vecs, int K, const REAL* x,                 \
                           const REAL* bt, int ldb, REAL* y)                      \
{                                                                                 \
    const int lanes = (int)(sizeof(VEC) / sizeof(REAL));                          \
    VEC acc[CHARLM_GEMV_VECS];                                                    \
    int v, k;                                                                     \
    for (v = 0; v < vecs; v++)                                                    \
        acc[v] = *(const VEC*)(y + v * lanes);                                    \
    for (k = 0; k < K; k++) {                                                     \
        const REAL x_k = x[k];                                                    \
        const REAL* row = bt + (size_t)k * ldb;                                   \
        for (v = 0; v < vecs; v++)                                                \
            acc[v] += x_k * *(const VEC*)(row + v * lanes);                       \
    }                                                                             \
    for (v = 0; v < vecs; v++)                                                    \
        *(VEC*)(y + v * lanes) = acc[v];                                          \
}                                                                                 \
                                                                                  \
static inline void charlm_gemv_t_##SUFFIX(int K, int N, const REAL* x,           \
                                          const REAL* bt, int ldb, REAL* y)       \
{                                                                                 \
    const int lanes = (int)(sizeof(VEC) / sizeof(REAL));                          \
    int n0 = 0, k;                                                                \
    for (; n0 + CHARLM_GEMV_VECS * lanes <= N; n0 += CHARLM_GEMV_VECS * lanes)    \
        charlm_gemv_block_##SUFFIX(CHARLM_GEMV_VECS, K, x, bt + n0, ldb, y + n0); \
    switch ((N - n0) / lanes) {                 /* the whole vectors left */      \
    case 7: charlm_gemv_block_##SUFFIX(7, K, x, bt + n0, ldb, y + n0); break;     \
    case 6: charlm_gemv_block_##SUFFIX(6, K, x, bt + n0, ldb, y + n0); break;     \
    case 5: charlm_gemv_block_##SUFFIX(5, K, x, bt + n0, ldb, y + n0); break;     \
    case 4: charlm_gemv_block_##SUFFIX(4, K, x, bt + n0, ldb, y + n0); break;     \
    case 3: charlm_gemv_block_##SUFFIX(3, K, x, bt + n0, ldb, y + n0); break;     \
    case 2: charlm_gemv_block_##SUFFIX(2, K, x, bt + n0, ldb, y + n0); break;     \
    case 1: charlm_gemv_block_##SUFFIX(1, K, x, bt + n0, ldb, y + n0); break;     \
    default: break;                                                               \
    }                                                                             \
    n0 += (N - n0) / lanes * lanes;                                               \
    for (; n0 < N; n0++) {                      /* the last columns, one by one */\
        REAL sum = y[n0];                                                         \
        for (k = 0; k < K; k++)                                                   \
            sum += x[k] * bt[(size_t)k * ldb + n0];                               \
        y[n0] = sum;                                                              \
    }                                                                             \
}

CHARLM_DEFINE_GEMV(f, float, charlm_vf)
CHARLM_DEFINE_GEMV(d, double, charlm_vd)

/* The strip layout. Bt (K x N) is cut into strips of STRIP columns (the last
 * one narrower, if N is not a multiple), and each strip is stored as its own
 * row-major K x width block, one after the other: K*N values in all. */
#define CHARLM_DEFINE_GEMV_LAYOUT(SUFFIX, REAL, STRIP)                           \
                                                                                  \
/* Lay out the K x N matrix Bt whose element (k, n) is                            \
 * b[k*stride_k + r*stride_n], r = rows[n], or n when rows is NULL: (1, K)       \
 * takes a row-major (N, K) weight matrix W as Bt = W.T, and `rows` picks some  \
 * of W's rows (a team member's share, _team.h). */                              \
static inline void charlm_gemv_layout_rows_##SUFFIX(int K, int N, const REAL* b, \
                                                    ptrdiff_t stride_k,           \
                                                    ptrdiff_t stride_n,           \
                                                    const int* rows, REAL* out)   \
{                                                                                 \
    int n0, k, j;                                                                 \
    for (n0 = 0; n0 < N; n0 += STRIP) {                                           \
        int width = N - n0 < STRIP ? N - n0 : STRIP;                              \
        for (k = 0; k < K; k++)                                                   \
            for (j = 0; j < width; j++)                                           \
                *out++ = b[k * stride_k                                           \
                           + (ptrdiff_t)(rows ? rows[n0 + j] : n0 + j) * stride_n];\
    }                                                                             \
}                                                                                 \
                                                                                  \
static inline void charlm_gemv_layout_##SUFFIX(int K, int N, const REAL* b,      \
                                               ptrdiff_t stride_k,                \
                                               ptrdiff_t stride_n, REAL* out)     \
{                                                                                 \
    charlm_gemv_layout_rows_##SUFFIX(K, N, b, stride_k, stride_n, NULL, out);     \
}                                                                                 \
                                                                                  \
/* y[0:N] += x[0:K] @ Bt, Bt laid out by charlm_gemv_layout, the strips taken    \
 * first to last, or last to first when `backwards`. Each output's sum is the    \
 * same either way; the order matters for a matrix larger than the cache that    \
 * is read at every step: taken alternately forwards and backwards, each pass    \
 * starts with the strips the last one read, still in cache, where a pass        \
 * always in the same order finds none of them there (the cache evicts the       \
 * least recently used strips: exactly the next ones wanted). */                 \
static inline void charlm_gemv_dir_##SUFFIX(int K, int N, const REAL* x,         \
                                            const REAL* laid_out, REAL* y,        \
                                            int backwards)                        \
{                                                                                 \
    const int full = N / STRIP;                 /* whole strips */                \
    const int n_last = full * STRIP;            /* the narrower last strip */     \
    int s;                                                                        \
    if (backwards && n_last < N)                                                  \
        charlm_gemv_t_##SUFFIX(K, N - n_last, x, laid_out + (size_t)n_last * K,   \
                               N - n_last, y + n_last);                           \
    for (s = 0; s < full; s++) {                                                  \
        const int n0 = (backwards ? full - 1 - s : s) * STRIP;                    \
        charlm_gemv_block_##SUFFIX(CHARLM_GEMV_VECS, K, x,                        \
                                   laid_out + (size_t)n0 * K, STRIP, y + n0);     \
    }                                                                             \
    if (!backwards && n_last < N)                                                 \
        charlm_gemv_t_##SUFFIX(K, N - n_last, x, laid_out + (size_t)n_last * K,   \
                               N - n_last, y + n_last);                           \
}                                                                                 \
                                                                                  \
/* y[0:N] += x[0:K] @ Bt, Bt laid out by charlm_gemv_layout. */                  \
static inline void charlm_gemv_##SUFFIX(int K, int N, const REAL* x,             \
                                        const REAL* laid_out, REAL* y)            \
{                                                                                 \
    charlm_gemv_dir_##SUFFIX(K, N, x, laid_out, y, 0);                            \
}

CHARLM_DEFINE_GEMV_LAYOUT(f, float, CHARLM_GEMV_STRIP_F)
CHARLM_DEFINE_GEMV_LAYOUT(d, double, CHARLM_GEMV_STRIP_D)

#endif
