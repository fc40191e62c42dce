/* One row times a matrix: y[0:N] += x[0:K] @ Bt[0:K, 0:N], Bt row-major.
 *
 * Sampling at batch 1 multiplies one state row by every weight matrix once
 * per character, so a step is bound by reading the weights (a 2x128 LSTM
 * reads 0.8 MB per character, from L2). Through BLAS's GEMV each product
 * also paid a call through the Fortran interface and OpenBLAS's hand-off to
 * its second thread, and its kernel read the weights at about 80 GB/s on a
 * Zen 4 core; this loop reads them at about 100.
 *
 * The weights are stored transposed (K rows of N), so that each x[k] scales
 * a contiguous row that is added to y: a block of up to 8 vectors of y stays
 * in registers for the whole sum over k (8 independent FMA chains, enough to
 * hide their latency), and Bt is read once, row by row. No horizontal sums:
 * every output is accumulated in k order, one FMA at a time, so results
 * match a plain dot product to rounding and do not depend on the width.
 * Written with GCC vector extensions, like _packed_gemm.h.
 */
#ifndef CHARLM_GEMV_H
#define CHARLM_GEMV_H

#include <stddef.h>
#include "_packed_gemm.h"      /* CHARLM_VBYTES and the unaligned vector types */

#define CHARLM_GEMV_VECS 8     /* vectors of y held in registers per block */

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

#endif
