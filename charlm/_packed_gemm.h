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
 * row; MR = 13 with AVX-512, else 6) and, for each k, broadcasts one element
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
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>                     /* sysconf, for the cache sizes */
#endif

/* CHARLM_MR: rows of C per micro-kernel call. Its 2*MR accumulators, the 2
 * panel vectors and a broadcast must fit the vector registers: 32 with
 * AVX-512, 16 otherwise (MR = 6). With AVX-512, MR = 13 (29 registers): a
 * worker's share of 25 rows (batch 50 on two workers) is two blocks, 13 + 12,
 * where MR = 8 made it four (7+6+6+6), each reading the panel again for a
 * third fewer FMAs per load. One core of an Intel Xeon, GFLOP/s, MR = 8 ->
 * 13 (C harness): 25x512 @ 512x2048 (a 2x512 LSTM's step) 134 -> 157-158,
 * 25x2048 @ 2048x512 (its backward step) 133 -> 156-159, 25x128 @ 128x512
 * 157 -> 167, 1250x512 @ 512x2048 156 -> 162, the transposed weight
 * gradients 139 -> 152 and 132 -> 140; 16 rows (8 + 8) unchanged. MR = 14
 * ran the same. (Earlier MR = 8 against 6 on a Zen 4: a share of 16 rows as
 * 6 + 6 + 4 ran 8% slower than 8 + 8.) */
#if defined(__AVX512F__)
#define CHARLM_VBYTES 64
#define CHARLM_MR 13
#else
#define CHARLM_VBYTES 32
#define CHARLM_MR 6
#endif

/* The micro-kernel for blocks of 7 to 13 rows exists only when MR allows it. */
/* One call of the micro-kernel inside the sweep, for a block of ROWS rows. */
#define CHARLM_MICRO(SUFFIX, ROWS) \
    charlm_micro_##SUFFIX(ROWS, width, k1 - k0, a_k, lda_m, a_transposed, panel_k, \
                          accumulate || k0 > 0, k0 == 0 ? bias_n : NULL, c_m, ldc)

#if CHARLM_MR == 13
#define CHARLM_MICRO_CASES_ABOVE_6(SUFFIX) \
            case 13: CHARLM_MICRO(SUFFIX, 13); break; \
            case 12: CHARLM_MICRO(SUFFIX, 12); break; \
            case 11: CHARLM_MICRO(SUFFIX, 11); break; \
            case 10: CHARLM_MICRO(SUFFIX, 10); break; \
            case 9: CHARLM_MICRO(SUFFIX, 9); break; \
            case 8: CHARLM_MICRO(SUFFIX, 8); break; \
            case 7: CHARLM_MICRO(SUFFIX, 7); break;
#else
#define CHARLM_MICRO_CASES_ABOVE_6(SUFFIX)
#endif

/* From this many rows of A on (a whole chunk, not one time step), the sweep
 * passes the panels in groups that stay in L2 (see charlm_sweep). */
#ifndef CHARLM_ROWS_OUTER_MIN
#define CHARLM_ROWS_OUTER_MIN 256
#endif

/* The blocking of charlm_sweep follows the caches of the core it runs on:
 * - a superblock of A, read transposed and copied, takes half of L2;
 * - a group of panels that a whole chunk's rows pass takes a quarter of L2;
 * - a recurrent step's panel is taken in slices of k of 2/3 of L1.
 * Measured on one core of an Intel Xeon (2 MB L2, 48 KB L1), GFLOP/s against
 * the loop orders before (see charlm_sweep): 1250x512 @ 512x2048 156 (112),
 * 1250x2048 @ 2048x512 158 (113), 2048x1250 . 1250x512 transposed 140 (105),
 * 512x1250 . 1250x128 transposed 131 (117), 25x512 @ 512x2048 130 (124).
 * CHARLM_L2_BYTES and CHARLM_L1_BYTES are the sizes assumed where the C
 * library cannot tell (then: the smallest seen on these machines). */
#ifndef CHARLM_L2_BYTES
#define CHARLM_L2_BYTES (1024 * 1024)
#endif
#ifndef CHARLM_L1_BYTES
#define CHARLM_L1_BYTES (32 * 1024)
#endif

/* Bytes of the data cache of this core at `level` (1 or 2), from the C
 * library, read once. */
static inline size_t charlm_cache_bytes(int level)
{
    static size_t l1 = 0, l2 = 0;               /* a benign race: same value */
    if (l2 == 0) {
        long one = -1, two = -1;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
        one = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        two = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        l1 = one >= 16 * 1024 && one <= 1024 * 1024 ? (size_t)one : CHARLM_L1_BYTES;
        l2 = two >= 256 * 1024 && two <= 64 * 1024 * 1024 ? (size_t)two : CHARLM_L2_BYTES;
    }
    return level == 1 ? l1 : l2;
}

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

/* The first row of that block. */
static inline int charlm_block_start(int M, int blocks, int block)
{
    return block * (M / blocks) + (block < M % blocks ? block : M % blocks);
}

/* Memory on whole cache lines: 64-byte aligned, the size rounded up to whole
 * lines; free with charlm_free_lines. Two reasons, measured on an Intel Xeon:
 * - a 64-byte vector load from an address that is not a multiple of 64
 *   touches two cache lines. malloc aligns to 16 (a large block sits 16
 *   bytes into its pages), so a packed or laid-out matrix was streamed at
 *   half the L1 bandwidth or at full, by the luck of the heap: the own
 *   GEMV of a 128 x 512 matrix took 2,868 ns at offset 16 or 32, 1,777 at
 *   0 or 64; the packed product 25 x 512 @ 512 x 2048 ran at 139.6 GFLOP/s
 *   with panels and C both off the line, 154.9 with both on it (C harness,
 *   one core). Evaluation of a 2x128 LSTM ran at 178k or 230k chars/s from
 *   one process to the next for this alone.
 * - memory that threads of a team share: from malloc, one member's scratch
 *   could end on the line where another's begins, and each write by one
 *   took the line from the other (false sharing). */
#define CHARLM_LINE 64

static inline size_t charlm_whole_lines(size_t bytes)
{
    return (bytes + CHARLM_LINE - 1) / CHARLM_LINE * CHARLM_LINE;
}

/* malloc's block, with the line-aligned address inside it and, just before
 * that, where the block starts (for charlm_free_lines). Not posix_memalign:
 * with glibc, its large blocks stayed in the heap, and training a 2x512
 * LSTM peaked at 292 MB of resident memory against 238 with malloc. */
static inline void* charlm_alloc_lines(size_t bytes)
{
    const size_t size = charlm_whole_lines(bytes ? bytes : 1);
    char* block = (char*)malloc(size + CHARLM_LINE + sizeof(void*));
    char* aligned;
    if (block == NULL)
        return NULL;
    aligned = block + sizeof(void*);
    aligned += (CHARLM_LINE - (size_t)aligned % CHARLM_LINE) % CHARLM_LINE;
    memcpy(aligned - sizeof(void*), &block, sizeof block);
    return aligned;
}

static inline void charlm_free_lines(void* p)
{
    void* block;
    if (p == NULL)
        return;
    memcpy(&block, (char*)p - sizeof(void*), sizeof block);
    free(block);
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
        if (stride_n == 1 && width == NR) {                                       \
            /* a whole panel of rows: two vectors a row (a memcpy call per      \
             * row, which is what gcc made of the loop below, took 46 us      \
             * for 1250 x 128 where this takes 20, one core of an Intel Xeon) */\
            for (k = 0; k < K; k++) {                                             \
                const REAL* src = b + k * stride_k + n0;                          \
                *(VEC*)packed = *(const VEC*)src;                                 \
                *(VEC*)(packed + NR / 2) = *(const VEC*)(src + NR / 2);           \
                packed += NR;                                                     \
            }                                                                     \
            continue;                                                             \
        }                                                                         \
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
/* Copy row blocks b0..b1-1 of a transposed A (element (r, k) at            \
 * a[k*lda + r]) into dst, block after block, each as K x rows row-major: the   \
 * order in which one micro-kernel call reads it. Row k of A is read once, in   \
 * order, for all the blocks. */                                                 \
static inline void charlm_copy_blocks_t_##SUFFIX(int M, int blocks, int b0,     \
                                                 int b1, int K, const REAL* a,    \
                                                 int lda, REAL* dst)              \
{                                                                                 \
    int k, r, block;                                                              \
    for (k = 0; k < K; k++) {                                                     \
        const REAL* a_k = a + (size_t)k * lda;                                    \
        REAL* dst_block = dst;                                                    \
        for (block = b0; block < b1; block++) {                                   \
            int rows = charlm_block_rows(M, blocks, block);                       \
            const REAL* src = a_k + charlm_block_start(M, blocks, block);         \
            REAL* dst_k = dst_block + (size_t)k * rows;                           \
            if (rows == CHARLM_MR)  /* a fixed count: vector moves, 4-5% of dW */ \
                for (r = 0; r < CHARLM_MR; r++)                                   \
                    dst_k[r] = src[r];                                            \
            else                                                                  \
                for (r = 0; r < rows; r++)                                        \
                    dst_k[r] = src[r];                                            \
            dst_block += (size_t)K * rows;                                        \
        }                                                                         \
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
     * heights (with MR = 8, 25 = 7+6+6+6, not 8+8+8+1): a block of one or   \
     * two rows cannot keep the FMA units busy (too few independent            \
     * accumulators), which cost 4-5% on 25 rows. */                           \
    int blocks = (M + CHARLM_MR - 1) / CHARLM_MR;                                 \
    int panels = (N + NR - 1) / NR;                                               \
    /* The loop order decides what each level of cache holds. One loop nest:  \
     * for each superblock of row blocks, for each group of panels, (for each  \
     * slice of k,) for each block of the superblock, for each panel of the    \
     * group. Three cases:                                                      \
     * - A recurrent step's few rows: one superblock, groups of one panel. A   \
     *   panel is read once, by every block, while it is in L1 or L2.          \
     * - A whole chunk's rows read in place (an input projection, dL/dx): one \
     *   superblock, panels in groups of a quarter of L2. A group stays in L2 \
     *   while every block of A passes it, and A is read once per group.       \
     *   Block by block over all panels instead read all of B from L3 for      \
     *   each block of rows (4 MB of packed W for a 512-unit LSTM).            \
     * - A read transposed (dgates, for the weight gradients): the same, in    \
     *   superblocks of half of L2 of A, copied (below) once per superblock. */ \
    const size_t block_bytes = (size_t)CHARLM_MR * K * sizeof(REAL);             \
    const size_t panel_bytes = (size_t)NR * K * sizeof(REAL);                    \
    const int rows_outer = a_transposed || M >= CHARLM_ROWS_OUTER_MIN;            \
    const size_t superblock_bytes = charlm_cache_bytes(2) / 2;                   \
    const size_t group_bytes = charlm_cache_bytes(2) / 4;                        \
    const size_t slice_bytes = charlm_cache_bytes(1) * 2 / 3;                    \
    const int super = !a_transposed ? blocks                                      \
        : superblock_bytes / block_bytes > 1                                      \
        ? (int)(superblock_bytes / block_bytes) : 1;                              \
    const int group = !rows_outer ? 1                                             \
        : group_bytes / panel_bytes > 1 ? (int)(group_bytes / panel_bytes) : 1;   \
    /* A read transposed is copied a superblock at a time, each block          \
     * contiguous: in place, the MR values a step reads sit one row of A       \
     * apart, a power-of-two stride for the usual widths (2 KB for a 128-unit  \
     * LSTM), so a block's K cache lines fell into a few sets of L1 and L2 and \
     * came from L3 again for every panel: 512x1250 @ 1250x128 ran at 70-77    \
     * GFLOP/s on a Zen 4, 384x1250 at 93. Copied, 79-84. Other strides do not \
     * alias so badly, and there the copy cost 3-5%. */                         \
    const int aliasing = (size_t)lda * sizeof(REAL) % CHARLM_ALIASING_STRIDE == 0; \
    REAL* copy = a_transposed && aliasing                                         \
        ? (REAL*)charlm_alloc_lines((size_t)K * super * CHARLM_MR * sizeof(REAL))   \
        : NULL;                                                                   \
    REAL bias_tail[NR];                         /* the last panel's, padded */    \
    int b0, b1, p0, p1, k0, k1, block, panel_index;                               \
    /* A recurrent step whose panel does not fit L1 takes it a slice of k at a  \
     * time, all blocks per slice, so that the slice stays in L1 while every    \
     * block reads it (the blocks' partial sums go through C). */               \
    const int slice = rows_outer || panel_bytes <= slice_bytes ? K                \
        : (int)(slice_bytes / (NR * sizeof(REAL)));                               \
    if (bias != NULL && N % NR != 0) {                                            \
        for (int j = 0; j < NR; j++)                                              \
            bias_tail[j] = (panels - 1) * NR + j < N ? bias[(panels - 1) * NR + j] : 0; \
    }                                                                             \
    for (b0 = 0; b0 < blocks; b0 = b1) {                                          \
      b1 = b0 + super < blocks ? b0 + super : blocks;                             \
      if (copy != NULL)                                                           \
          charlm_copy_blocks_t_##SUFFIX(M, blocks, b0, b1, K, a, lda, copy);      \
      for (p0 = 0; p0 < panels; p0 = p1) {                                        \
        p1 = p0 + group < panels ? p0 + group : panels;                           \
        for (k0 = 0; k0 < K; k0 = k1) {                                           \
          const REAL* copied = copy;                                              \
          k1 = k0 + slice < K ? k0 + slice : K;                                   \
          for (block = b0; block < b1; block++) {                                 \
            int rows = charlm_block_rows(M, blocks, block);                       \
            int m0 = charlm_block_start(M, blocks, block);                        \
            const REAL* a_m = copy != NULL ? copied                               \
                : a + (a_transposed ? (size_t)m0 : (size_t)m0 * lda);             \
            int lda_m = copy != NULL ? rows : lda;                                \
            const REAL* a_k = a_m + (a_transposed ? (size_t)k0 * lda_m : (size_t)k0); \
            copied += (size_t)K * rows;                                           \
            for (panel_index = p0; panel_index < p1; panel_index++) {             \
              const REAL* panel_k = packed + (size_t)panel_index * NR * K         \
                                    + (size_t)k0 * NR;                            \
              int n0 = panel_index * NR;                                          \
              int width = N - n0 < NR ? N - n0 : NR;                              \
              const REAL* bias_n = bias == NULL ? NULL                            \
                                   : width == NR ? bias + n0 : bias_tail;         \
              REAL* c_m = c + (size_t)m0 * ldc + n0;                              \
              switch (rows) {                                                     \
              CHARLM_MICRO_CASES_ABOVE_6(SUFFIX)                                  \
              case 6: CHARLM_MICRO(SUFFIX, 6); break;                             \
              case 5: CHARLM_MICRO(SUFFIX, 5); break;                             \
              case 4: CHARLM_MICRO(SUFFIX, 4); break;                             \
              case 3: CHARLM_MICRO(SUFFIX, 3); break;                             \
              case 2: CHARLM_MICRO(SUFFIX, 2); break;                             \
              default: CHARLM_MICRO(SUFFIX, 1); break;                            \
              }                                                                   \
            }                                                                     \
          }                                                                       \
        }                                                                         \
      }                                                                           \
    }                                                                             \
    charlm_free_lines(copy);                                                      \
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
