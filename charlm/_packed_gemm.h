/* Matrix products against a right-hand side that is packed once and reused.
 *
 * A recurrence multiplies a small state (B x H, B ~ 16..64) by the same
 * weight matrix at every time step. BLAS's sgemm repacks that matrix into
 * its own panel layout on every call; for these shapes the repacking costs
 * about as much as the arithmetic (one core of a Zen 4: 53-80 GFLOP/s for
 * OpenBLAS on 16..32 x 128 @ 128 x 512, ~105 for this kernel; see
 * benchmarks/README.md). Here the kernels pack the weights once per chunk
 * and every time step is a sweep of one register-blocked micro-kernel over
 * the packed panels.
 *
 * Packed layout: the N columns of B are cut into panels of NR columns (the
 * last one zero-padded); a panel stores row k of its NR columns contiguously,
 * k = 0..K-1, so the micro-kernel reads it as one sequential stream.
 *
 * The micro-kernel holds an MR x NR block of C in registers (two vectors per
 * row; MR = 8 with AVX-512, else 6) and, for each k, broadcasts one element
 * of each of MR rows of A and multiplies it by the panel's row k: MR*2
 * fused multiply-adds per 2 loads.
 * It is written with GCC vector extensions, so the same source compiles to
 * AVX-512, AVX2+FMA or SSE2, whatever -march allows; the vector width is
 * that of the widest unit the build targets.
 *
 * Only the order of the additions over k differs from a plain dot product
 * (the sum over k is accumulated in k order, one FMA at a time), so results
 * match BLAS to rounding.
 */
#ifndef CHARLM_PACKED_GEMM_H
#define CHARLM_PACKED_GEMM_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* CHARLM_MR: rows of C per micro-kernel call. Its 2*MR accumulators, the 2
 * panel vectors and a broadcast must fit the vector registers: 32 with
 * AVX-512 (MR = 8: a batch share of 16 rows is two whole blocks, where
 * 6 + 6 + 4 rows ran 8% slower), 16 otherwise (MR = 6). */
#if defined(__AVX512F__)
#define CHARLM_VBYTES 64
#define CHARLM_MR 8
#else
#define CHARLM_VBYTES 32
#define CHARLM_MR 6
#endif

/* The micro-kernel for blocks of 7 and 8 rows exists only when MR allows it. */
/* One call of the micro-kernel inside the sweep, for a block of ROWS rows. */
#define CHARLM_MICRO(SUFFIX, ROWS) \
    charlm_micro_##SUFFIX(ROWS, width, K, a_m, lda_m, a_transposed, panel, accumulate, bias_n, c_m, ldc)

#if CHARLM_MR == 8
#define CHARLM_MICRO_CASES_7_8(SUFFIX) \
            case 8: CHARLM_MICRO(SUFFIX, 8); break; \
            case 7: CHARLM_MICRO(SUFFIX, 7); break;
#else
#define CHARLM_MICRO_CASES_7_8(SUFFIX)
#endif

/* From this many rows of A on (a whole chunk, not one time step), the sweep
 * takes row blocks in the outer loop (see charlm_sweep). */
#ifndef CHARLM_ROWS_OUTER_MIN
#define CHARLM_ROWS_OUTER_MIN 256
#endif

/* Row strides of A, in bytes, that are a multiple of this map the rows to so
 * few cache sets that reading A down its columns thrashes (see charlm_sweep). */
#define CHARLM_ALIASING_STRIDE 1024

/* 1: a micro-kernel that adds to C asks for C's rows before its k loop, so
 * they arrive while it multiplies. In the LSTM forward, C is a time step's
 * rows of gates, written by the input projection long before and no longer
 * in L1: lstm_forward over a 25-stream share (T = 50, H = 128) ran
 * faster (three runs: 2.0-4.2%) in one process alternating the builds. 0 turns
 * it off (for A/B). */
#ifndef CHARLM_PREFETCH_C
#define CHARLM_PREFETCH_C 1
#endif

/* Height of row block `block` when M rows are cut into `blocks` blocks of
 * nearly equal height (the first M % blocks are one row taller). */
static inline int charlm_block_rows(int M, int blocks, int block)
{
    return M / blocks + (block < M % blocks);
}

/* Vector types that may be loaded from any float-aligned address. */
typedef float charlm_vf __attribute__((vector_size(CHARLM_VBYTES), aligned(4), may_alias));
typedef double charlm_vd __attribute__((vector_size(CHARLM_VBYTES), aligned(8), may_alias));

#define CHARLM_NR_F (2 * CHARLM_VBYTES / 4)    /* columns per panel, float */
#define CHARLM_NR_D (2 * CHARLM_VBYTES / 8)    /* columns per panel, double */

/* One definition per precision: SUFFIX f/d, REAL float/double, VEC the
 * vector type, NR the panel width. */
#define CHARLM_DEFINE_PACKED_GEMM(SUFFIX, REAL, VEC, NR)                          \
                                                                                  \
/* Number of REALs a packed K x N matrix takes. */                                \
static inline size_t charlm_packed_size_##SUFFIX(int K, int N)                    \
{                                                                                 \
    return (size_t)((N + NR - 1) / NR) * NR * (size_t)K;                          \
}                                                                                 \
                                                                                  \
/* Pack the K x N matrix whose element (k, n) is b[k*stride_k + n*stride_n].      \
 * (stride_k, stride_n) = (ldb, 1) packs B itself; (1, ldb) packs the            \
 * transpose of a row-major N x K matrix, e.g. W_hh.T. */                         \
static inline void charlm_pack_##SUFFIX(int K, int N, const REAL* b,             \
                                        ptrdiff_t stride_k, ptrdiff_t stride_n,   \
                                        REAL* packed)                             \
{                                                                                 \
    int n0, k, j;                                                                 \
    for (n0 = 0; n0 < N; n0 += NR) {                                              \
        int width = N - n0 < NR ? N - n0 : NR;                                    \
        for (k = 0; k < K; k++) {                                                 \
            const REAL* src = b + k * stride_k + n0 * stride_n;                   \
            for (j = 0; j < width; j++)                                           \
                packed[j] = src[j * stride_n];                                    \
            for (; j < NR; j++)                                                   \
                packed[j] = 0;                                                    \
            packed += NR;                                                         \
        }                                                                         \
    }                                                                             \
}                                                                                 \
                                                                                  \
/* C[rows, 0:width] (+)= A[rows, 0:K] @ panel, for a compile-time `rows`         \
 * (the function is always inlined into a switch on the row count, so the       \
 * loops over rows unroll and acc stays in registers). Element (r, k) of A is    \
 * a[r*lda + k], or a[k*lda + r] when a_transposed (a compile-time constant     \
 * too). */                                                                      \
static inline __attribute__((always_inline)) void                                \
charlm_micro_##SUFFIX(const int rows, int width, int K, const REAL* a, int lda,  \
                      const int a_transposed, const REAL* panel, int accumulate,  \
                      const REAL* bias, REAL* c, int ldc)                         \
{                                                                                 \
    const int half = NR / 2;                                                      \
    VEC acc0[CHARLM_MR], acc1[CHARLM_MR];                                         \
    VEC bias0 = (VEC){0}, bias1 = (VEC){0};                                       \
    int r, k, j;                                                                  \
    if (bias != NULL) {                         /* padded to NR by the caller */  \
        bias0 = *(const VEC*)bias;                                                \
        bias1 = *(const VEC*)(bias + half);                                       \
    }                                                                             \
    for (r = 0; r < rows; r++) {                                                  \
        acc0[r] = bias0;                                                          \
        acc1[r] = bias1;                                                          \
        if (accumulate && CHARLM_PREFETCH_C) {                                    \
            __builtin_prefetch(c + (size_t)r * ldc, 1);                           \
            __builtin_prefetch(c + (size_t)r * ldc + half, 1);                    \
        }                                                                         \
    }                                                                             \
    for (k = 0; k < K; k++) {                                                     \
        VEC b0 = *(const VEC*)(panel + (size_t)k * NR);                           \
        VEC b1 = *(const VEC*)(panel + (size_t)k * NR + half);                    \
        for (r = 0; r < rows; r++) {                                              \
            REAL a_rk = a_transposed ? a[(size_t)k * lda + r]                     \
                                     : a[(size_t)r * lda + k];                    \
            acc0[r] += a_rk * b0;                                                 \
            acc1[r] += a_rk * b1;                                                 \
        }                                                                         \
    }                                                                             \
    for (r = 0; r < rows; r++) {                                                  \
        REAL* c_r = c + (size_t)r * ldc;                                          \
        if (width == NR) {                                                        \
            if (accumulate) {                                                     \
                acc0[r] += *(VEC*)c_r;                                            \
                acc1[r] += *(VEC*)(c_r + half);                                   \
            }                                                                     \
            *(VEC*)c_r = acc0[r];                                                 \
            *(VEC*)(c_r + half) = acc1[r];                                        \
        } else {                                /* the last, partial panel */     \
            REAL block[NR];                                                       \
            memcpy(block, &acc0[r], sizeof acc0[r]);                              \
            memcpy(block + half, &acc1[r], sizeof acc1[r]);                       \
            for (j = 0; j < width; j++)                                           \
                c_r[j] = accumulate ? c_r[j] + block[j] : block[j];               \
        }                                                                         \
    }                                                                             \
}                                                                                 \
                                                                                  \
/* strip (K x width, row-major) = columns 0..width-1 of a (K rows, lda).         \
 * width is at most 2*MR; the common full width is a fixed-size copy. */          \
static inline void charlm_copy_strip_##SUFFIX(int K, const REAL* a, int lda,     \
                                              int width, REAL* strip)            \
{                                                                                 \
    int k, j;                                                                     \
    if (width == 2 * CHARLM_MR) {                                                 \
        for (k = 0; k < K; k++, strip += 2 * CHARLM_MR)                           \
            for (j = 0; j < 2 * CHARLM_MR; j++)                                   \
                strip[j] = a[(size_t)k * lda + j];                                \
    } else {                                                                      \
        for (k = 0; k < K; k++, strip += width)                                   \
            for (j = 0; j < width; j++)                                           \
                strip[j] = a[(size_t)k * lda + j];                                \
    }                                                                             \
}                                                                                 \
                                                                                  \
/* The sweep of the micro-kernel over the row blocks and the panels.          \
 * bias (NULL for none): N values added to every row of C. */                    \
static inline __attribute__((always_inline)) void                                \
charlm_sweep_##SUFFIX(int M, int N, int K, const REAL* a, int lda,               \
                      const int a_transposed, const REAL* packed, int accumulate, \
                      const REAL* bias, REAL* c, int ldc)                         \
{                                                                                 \
    /* The M rows are cut into as few blocks as MR allows, of nearly equal    \
     * heights (25 = 7+6+6+6, not 8+8+8+1): a block of one or two rows         \
     * cannot keep the FMA units busy (too few independent accumulators),     \
     * which cost 4-5% on 25 rows. */                                          \
    int blocks = (M + CHARLM_MR - 1) / CHARLM_MR;                                 \
    int panels = (N + NR - 1) / NR;                                               \
    /* Which loop is outer. Panels outer for a recurrent step's few rows: a   \
     * panel stays in L1 while every row block passes it. Row blocks outer     \
     * when A is all rows of a chunk: read in place transposed (all of         \
     * dgates), each of its blocks serves every panel while in cache and A is   \
     * read from memory once; not transposed, a block's rows of C are finished \
     * while in L1 instead of being revisited once per panel. */               \
    const int rows_outer = a_transposed || M >= CHARLM_ROWS_OUTER_MIN;            \
    REAL bias_tail[NR];                         /* the last panel's, padded */    \
    int n0, m0, block, rows, step;                                                \
    /* A read transposed (dgates, all rows of a chunk) is copied a strip of     \
     * two row blocks at a time: in place, the MR values a step reads sit one   \
     * row of A apart, a power-of-two stride for the usual widths (2 KB for a  \
     * 128-unit LSTM), so the strip's K cache lines fell into a few sets of L1  \
     * and L2 and came from L3 again for every panel: 512x1250 @ 1250x128 ran   \
     * at 70-77 GFLOP/s, 384x1250 at 93. Copied, 79-84. Other strides do not    \
     * alias so badly, and there the copy cost 3-5%. */                         \
    const int aliasing = (size_t)lda * sizeof(REAL) % CHARLM_ALIASING_STRIDE == 0; \
    REAL* strip = a_transposed && aliasing                                        \
        ? (REAL*)malloc((size_t)K * 2 * CHARLM_MR * sizeof(REAL)) : NULL;         \
    int strip_m0 = 0, strip_width = 0;                                            \
    if (bias != NULL && N % NR != 0) {                                            \
        for (n0 = 0; n0 < NR; n0++)                                               \
            bias_tail[n0] = (panels - 1) * NR + n0 < N ? bias[(panels - 1) * NR + n0] : 0; \
    }                                                                             \
    for (step = 0; step < blocks * panels; step++) {                              \
        int panel_index = rows_outer ? step % panels : step / blocks;             \
        block = rows_outer ? step / panels : step % blocks;                       \
        n0 = panel_index * NR;                                                    \
        m0 = block * (M / blocks) + (block < M % blocks ? block : M % blocks);    \
        rows = charlm_block_rows(M, blocks, block);                               \
        {                                                                         \
            const REAL* panel = packed + (size_t)panel_index * NR * K;            \
            int width = N - n0 < NR ? N - n0 : NR;                                \
            const REAL* bias_n = bias == NULL ? NULL                              \
                                 : width == NR ? bias + n0 : bias_tail;           \
            const REAL* a_m = a + (a_transposed ? (size_t)m0 : (size_t)m0 * lda); \
            int lda_m = lda;                                                      \
            if (strip != NULL) {                                                  \
                if (panel_index == 0 && block % 2 == 0) {                         \
                    strip_m0 = m0;                                                \
                    strip_width = rows + (block + 1 < blocks                      \
                        ? charlm_block_rows(M, blocks, block + 1) : 0);           \
                    charlm_copy_strip_##SUFFIX(K, a + m0, lda, strip_width, strip); \
                }                                                                 \
                a_m = strip + (m0 - strip_m0);                                    \
                lda_m = strip_width;                                              \
            }                                                                     \
            REAL* c_m = c + (size_t)m0 * ldc + n0;                                \
            switch (rows) {                                                       \
            CHARLM_MICRO_CASES_7_8(SUFFIX)                                        \
            case 6: CHARLM_MICRO(SUFFIX, 6); break;                               \
            case 5: CHARLM_MICRO(SUFFIX, 5); break;                               \
            case 4: CHARLM_MICRO(SUFFIX, 4); break;                               \
            case 3: CHARLM_MICRO(SUFFIX, 3); break;                               \
            case 2: CHARLM_MICRO(SUFFIX, 2); break;                               \
            default: CHARLM_MICRO(SUFFIX, 1); break;                              \
            }                                                                     \
        }                                                                         \
    }                                                                             \
    free(strip);                                                                  \
}                                                                                 \
                                                                                  \
/* C (+)= A @ B for row-major A (M x K, leading dimension lda) and C (M x N,     \
 * ldc), B packed by charlm_pack_*. accumulate = 0 overwrites C. */              \
static inline void charlm_packed_gemm_##SUFFIX(int M, int N, int K,               \
                                               const REAL* a, int lda,            \
                                               const REAL* packed,                \
                                               int accumulate, REAL* c, int ldc)  \
{                                                                                 \
    charlm_sweep_##SUFFIX(M, N, K, a, lda, 0, packed, accumulate, NULL, c, ldc);  \
}                                                                                 \
                                                                                  \
/* C = A @ B + bias (N values, added to every row): an input projection with     \
 * its bias added as each block of C is stored, not written first and read     \
 * back. */                                                                      \
static inline void charlm_packed_gemm_bias_##SUFFIX(int M, int N, int K,          \
                                                    const REAL* a, int lda,       \
                                                    const REAL* packed,           \
                                                    const REAL* bias, REAL* c,    \
                                                    int ldc)                      \
{                                                                                 \
    charlm_sweep_##SUFFIX(M, N, K, a, lda, 0, packed, 0, bias, c, ldc);           \
}                                                                                 \
                                                                                  \
/* The same with A stored transposed, C (+)= A.T @ B for a row-major K x M A:   \
 * the weight gradients dW = dgates.T @ x. The MR elements of A that one k      \
 * needs are adjacent, so A is read where it is, without a transposing copy. */  \
static inline void charlm_packed_gemm_at_##SUFFIX(int M, int N, int K,            \
                                                  const REAL* a, int lda,         \
                                                  const REAL* packed,             \
                                                  int accumulate, REAL* c,        \
                                                  int ldc)                        \
{                                                                                 \
    charlm_sweep_##SUFFIX(M, N, K, a, lda, 1, packed, accumulate, NULL, c, ldc);  \
}

CHARLM_DEFINE_PACKED_GEMM(f, float, charlm_vf, CHARLM_NR_F)
CHARLM_DEFINE_PACKED_GEMM(d, double, charlm_vd, CHARLM_NR_D)

#endif
