# cython: language_level=3
"""Fused kernels for charlm: RNN, LSTM and GRU layers over a chunk of text.

Shapes, used throughout:
    T  time steps in the chunk          B  parallel streams (batch)
    N  = T * B rows                     H  hidden units of the layer
    G  gate rows: H (RNN), 4H (LSTM, [i|f|g|o]), 3H (GRU, [r|z|n])
    V  vocabulary size                  In input width of the layer

Weights use PyTorch's layout (W_ih is (G, In), W_hh is (G, H)), except that
the first layer's input weights are passed transposed, W_ihT (V, G), so that
the one-hot product W_ih x_t is a contiguous row gather.

A layer's work is split in three kernels, called in order by charlm.model:
    input projection   gates = W_ih x + bias   one GEMM (or a gather) for all N rows
    recurrence         the time loop in C: one (B,H)@(H,G) product per step
                       with W_hh packed once per chunk (pack, packed_gemm),
                       then the cell's element-wise equations
    backward           the same in reverse; the weight gradients are one product
                       each over all N rows, after the loop (weight_gradient)

Every function validates the shapes it receives before it releases the GIL:
the loops run without bounds checks, so this is the memory-safety boundary.
"""

from libc.math cimport exp, expf, tanh, tanhf, log, logf
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, free
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv
import numpy as np

# A target id meaning "no loss at this position" (as PyTorch's ignore_index).
cdef enum:
    IGNORE = -1
IGNORE_TARGET = IGNORE     # the same, for Python

ctypedef fused real:
    float
    double

cdef extern from *:
    """
    #ifndef CHARLM_DEBUG_BUILD
    #define CHARLM_DEBUG_BUILD 0
    #endif
    """
    int CHARLM_DEBUG_BUILD

# True when built with CHARLM_DEBUG_KERNELS=1 (bounds and wraparound checks on).
DEBUG_BUILD = bool(CHARLM_DEBUG_BUILD)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

cdef extern from "_fastmath.h":
    # Vectorisable float32 exp/sigmoid/tanh (see the header for accuracy).
    float charlm_expf(float x) noexcept nogil
    float charlm_sigmoidf(float x) noexcept nogil
    float charlm_tanhf(float x) noexcept nogil
    double charlm_sigmoid_d(double x) noexcept nogil   # libm's exp; the C units use it too
    # Activations sharing one division (the LSTM's and GRU's units).
    void charlm_sigmoid2_tanh_f(float a_i, float a_f, float a_g,
                                float* i, float* f, float* g) noexcept nogil
    void charlm_sigmoid_tanh_f(float a_o, float x, float* o, float* t) noexcept nogil
    void charlm_sigmoid2_f(float a_r, float a_z, float* r, float* z) noexcept nogil


# float32 uses the inline, vectorisable versions; float64 (gradient checks,
# reference comparisons) keeps libm's correctly rounded functions.

cdef inline real sigmoid(real x) noexcept nogil:
    if real is float:
        return charlm_sigmoidf(x)
    else:
        return charlm_sigmoid_d(x)


cdef inline real exp_(real x) noexcept nogil:
    if real is float:
        return charlm_expf(x)
    else:
        return exp(x)


cdef inline real tanh_(real x) noexcept nogil:
    if real is float:
        return charlm_tanhf(x)
    else:
        return tanh(x)


def fast_activations(const float[::1] a, const float[::1] b, const float[::1] x):
    """The float32 activations of _fastmath.h, element by element, for the
    tests that hold them against libm: a dict of arrays named after the
    function and its output."""
    cdef Py_ssize_t n = a.shape[0], k
    _require(b.shape[0] == n and x.shape[0] == n, "fast_activations: lengths differ")
    names = ["exp(a)", "sigmoid(a)", "tanh(x)", "sigmoid2_tanh: sigmoid(a)",
             "sigmoid2_tanh: sigmoid(b)", "sigmoid2_tanh: tanh(x)", "sigmoid_tanh: sigmoid(a)",
             "sigmoid_tanh: tanh(x)", "sigmoid2: sigmoid(a)", "sigmoid2: sigmoid(b)"]
    out = np.empty((len(names), n), np.float32)
    cdef float[:, ::1] o = out
    with nogil:
        for k in range(n):
            o[0, k] = charlm_expf(a[k])
            o[1, k] = charlm_sigmoidf(a[k])
            o[2, k] = charlm_tanhf(x[k])
            charlm_sigmoid2_tanh_f(a[k], b[k], x[k], &o[3, k], &o[4, k], &o[5, k])
            charlm_sigmoid_tanh_f(a[k], x[k], &o[6, k], &o[7, k])
            charlm_sigmoid2_f(a[k], b[k], &o[8, k], &o[9, k])
    return dict(zip(names, out))


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      real alpha, const real* a, int lda,
                      const real* b, int ldb,
                      real beta, real* c, int ldc) noexcept nogil:
    """Row-major C[m,n] = alpha * op(A)[m,k] @ op(B)[k,n] + beta * C.

    BLAS is column-major; a row-major matrix is its transpose, so we ask for
    C.T = op(B).T @ op(A).T, i.e. swap the operands and their roles.
    A single row (m == 1: batch-1 sampling and evaluation) goes to GEMV,
    which reads op(B) once instead of packing it for a matrix product.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef char gemv_trans
    cdef int one = 1, rows, cols, inc_a
    if m == 0 or n == 0:
        return
    if m == 1:
        # c[n] = alpha * op(B).T[n,k] @ a[k] + beta * c. The column-major
        # view of B's buffer is op(B).T when B is not transposed (rows n, cols k),
        # and op(B) itself when it is (rows k, cols n): then ask GEMV for its 'T'.
        gemv_trans = b'T' if trans_b else b'N'
        rows = k if trans_b else n
        cols = n if trans_b else k
        inc_a = lda if trans_a else 1      # op(A)'s single row: a column of A if transposed
        if real is float:
            sgemv(&gemv_trans, &rows, &cols, &alpha, <float*>b, &ldb, <float*>a, &inc_a,
                  &beta, c, &one)
        else:
            dgemv(&gemv_trans, &rows, &cols, &alpha, <double*>b, &ldb, <double*>a, &inc_a,
                  &beta, c, &one)
        return
    if real is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda,
              &beta, c, &ldc)


cdef extern from "_packed_gemm.h":
    # memory on whole cache lines, 64-byte aligned (see the header)
    int CACHE_LINE_BYTES "CHARLM_LINE"
    size_t charlm_whole_lines(size_t bytes) noexcept nogil
    void* charlm_alloc_lines(size_t bytes) noexcept nogil
    void charlm_free_lines(void* p) noexcept nogil
    # Products against a right-hand side packed once (see the header).
    size_t charlm_packed_size_f(int K, int N) noexcept nogil
    size_t charlm_packed_size_d(int K, int N) noexcept nogil
    void charlm_pack_f(int K, int N, const float* b, Py_ssize_t stride_k,
                       Py_ssize_t stride_n, float* packed) noexcept nogil
    void charlm_pack_d(int K, int N, const double* b, Py_ssize_t stride_k,
                       Py_ssize_t stride_n, double* packed) noexcept nogil
    void charlm_packed_gemm_f(int M, int N, int K, const float* a, int lda,
                              const float* packed, int accumulate, float* c,
                              int ldc) noexcept nogil
    void charlm_packed_gemm_d(int M, int N, int K, const double* a, int lda,
                              const double* packed, int accumulate, double* c,
                              int ldc) noexcept nogil
    void charlm_packed_gemm_bias_f(int M, int N, int K, const float* a, int lda,
                                   const float* packed, const float* bias, float* c,
                                   int ldc) noexcept nogil
    void charlm_packed_gemm_bias_d(int M, int N, int K, const double* a, int lda,
                                   const double* packed, const double* bias, double* c,
                                   int ldc) noexcept nogil
    const int CHARLM_NR_F, CHARLM_NR_D   # columns per packed panel
    void charlm_packed_gemm_at_f(int M, int N, int K, const float* a, int lda,
                                 const float* packed, int accumulate, float* c,
                                 int ldc) noexcept nogil
    void charlm_packed_gemm_at_d(int M, int N, int K, const double* a, int lda,
                                 const double* packed, int accumulate, double* c,
                                 int ldc) noexcept nogil


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) whose data starts on a 64-byte boundary, so
    that the kernels' 64-byte vector loads and stores on it stay within
    cache lines (numpy aligns to 16: see charlm_alloc_lines in
    _packed_gemm.h for what that cost)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + CACHE_LINE_BYTES, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE_BYTES
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype) on aligned memory (aligned_empty)."""
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def aligned_copy(a):
    """A C-contiguous copy of `a` on aligned memory (aligned_empty)."""
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype)
    np.copyto(out, a)
    return out


cdef real* pack(const real* b, int K, int N, Py_ssize_t stride_k,
                Py_ssize_t stride_n) except NULL:
    """Pack the K x N matrix whose (k, n) element is b[k*stride_k + n*stride_n]
    for packed_gemm; the caller frees it (charlm_free_lines).

    The recurrences multiply by the same W_hh at every time step. BLAS would
    repack it on each call, which for a (B,H)@(H,G) product with B ~ 32 costs
    as much as the arithmetic; packing it once per chunk made that product
    1.5-2x faster on one core (benchmarks/README.md).
    """
    cdef real* packed = pack_or_null(b, K, N, stride_k, stride_n)
    if packed == NULL:
        raise MemoryError("cannot allocate the packed weights")
    return packed


cdef real* pack_or_null(const real* b, int K, int N, Py_ssize_t stride_k,
                        Py_ssize_t stride_n) noexcept nogil:
    """pack() without the GIL: NULL when there is no memory for it."""
    cdef real* packed
    if real is float:
        packed = <real*>charlm_alloc_lines(charlm_packed_size_f(K, N) * sizeof(real))
        if packed != NULL:
            charlm_pack_f(K, N, b, stride_k, stride_n, packed)
    else:
        packed = <real*>charlm_alloc_lines(charlm_packed_size_d(K, N) * sizeof(real))
        if packed != NULL:
            charlm_pack_d(K, N, b, stride_k, stride_n, packed)
    return packed


cdef inline void packed_gemm(int m, int n, int k, const real* a, int lda,
                             const real* packed, bint accumulate,
                             real* c, int ldc) noexcept nogil:
    """Row-major C[m,n] (+)= A[m,k] @ B[k,n], B packed by pack()."""
    if real is float:
        charlm_packed_gemm_f(m, n, k, a, lda, packed, accumulate, c, ldc)
    else:
        charlm_packed_gemm_d(m, n, k, a, lda, packed, accumulate, c, ldc)


cdef inline void packed_gemm_at(int m, int n, int k, const real* a, int lda,
                                const real* packed, bint accumulate,
                                real* c, int ldc) noexcept nogil:
    """Row-major C[m,n] (+)= A.T @ B for A stored (k, m) with leading dimension
    lda (read in place, transposed), B packed by pack()."""
    if real is float:
        charlm_packed_gemm_at_f(m, n, k, a, lda, packed, accumulate, c, ldc)
    else:
        charlm_packed_gemm_at_d(m, n, k, a, lda, packed, accumulate, c, ldc)


# Large products and BLAS's threads. Above the size limits below, a product
# goes to BLAS when BLAS may use several threads (a single-stream evaluation
# gives it both cores, against the packed kernel's one), and to the packed
# kernel when BLAS runs on one thread, as it does inside each training worker:
# there, on an AMD Zen 5 core (512-bit FMA units), the packed kernel ran the
# 2x512 LSTM's products at about 200 GFLOP/s against 110 for OpenBLAS's
# sgemm, and a training step 1.5x faster (benchmarks/README.md).
# charlm.parallel.blas_threads keeps this flag in step with BLAS.
cdef bint blas_on_one_thread = False


def set_blas_on_one_thread(bint one_thread):
    """Tell the kernels whether BLAS now runs on one thread; returns the
    previous setting (charlm.parallel.blas_threads restores it)."""
    global blas_on_one_thread
    previous = blas_on_one_thread
    blas_on_one_thread = one_thread
    return previous


def blas_runs_on_one_thread():
    """Whether the kernels have been told that BLAS runs on one thread (above)."""
    return blas_on_one_thread


cdef inline bint own_kernel_takes(size_t nbytes, size_t limit) noexcept nogil:
    """Whether an operand of nbytes goes to the own kernel under a size limit
    that stands only while BLAS has threads to spare (see above)."""
    return blas_on_one_thread or nbytes <= limit


# Weight gradients, dW (G, In) = dgates.T (G, N) @ x (N, In), summed over the
# N = T*B rows of a chunk. BLAS copies (and transposes) all of dgates before
# multiplying; the packed product reads dgates where it lies (the MR values
# one step of its micro-kernel needs are adjacent) and packs only x, which is
# 4x smaller for an LSTM: 111 against 102 GFLOP/s for 512x1250 @ 1250x128 on
# one core. It streams all of dgates once per panel of x, which paid only
# while dgates stayed in cache on a Zen 4 (85 against 104 GFLOP/s for the
# 10 MB dgates of a 512-unit LSTM, 2026-11); on a Zen 5 core it ran that
# product at 205 against 112 for OpenBLAS. Hence the size limit, when BLAS
# has threads to spare.
cdef enum:
    PACKED_WEIGHT_GRADIENT_MAX_BYTES = 4 * 1024 * 1024


cdef void weight_gradient(int G, int In, int N, const real* dgates, const real* x,
                          real* dW, bint accumulate=False) noexcept nogil:
    """dW (G, In) (+)= dgates.T @ x for dgates (N, G) and x (N, In), row-major."""
    cdef real* x_packed = NULL
    if own_kernel_takes(<size_t>G * N * sizeof(real), PACKED_WEIGHT_GRADIENT_MAX_BYTES):
        x_packed = pack_or_null(x, N, In, In, 1)
    if x_packed == NULL:            # too large, or no memory: BLAS needs none of ours
        gemm(True, False, G, In, N, 1, dgates, G, x, In, 1 if accumulate else 0, dW, In)
        return
    packed_gemm_at(G, In, N, dgates, G, x_packed, accumulate, dW, In)
    charlm_free_lines(x_packed)


# The BPTT loops add dW_hh = sum_t dgates[t].T @ h[t] in spans of steps, each
# as soon as the loop has its dgates, rather than in one product at the end;
# a layer fed by the layer below adds its input product's gradients (dW_ih,
# and dx for the layer below) in the same spans (`below`). The weight
# gradient copies dgates.T in blocks (see weight_gradient), which runs at its
# best from L2: a 2x128 LSTM worker's dgates for a chunk (50 steps of 25
# streams) is 2.6 MB, more than the Intel Xeon's 2 MB L2, and its product ran
# at 132 GFLOP/s from L3 against 147 over 250 rows from L2 (one core). Each
# span adds one more pass over dW, which pays only while dW is small: a
# 2x512 LSTM's (4 MB) lost 1.5%, so its sums stay whole. Training, 2 workers,
# Intel Xeon (2026-12-06), alternations: dW_hh in spans, LSTM 2x128 +1.3%
# round by round (186.4k -> 187.5k chars/s, medians of 5), GRU 2x128 +1.5%,
# RNN 2x128 +0.4%, LSTM 1x128 +1.2%; with the input side too, LSTM 2x128
# +2.7% and +4% in two runs of 3-4 rounds (186.2k -> 191.3k), GRU 2x128 +6%,
# RNN +2%, GRU 2x512 +1.6%, LSTM 2x512 unchanged. Spans of 256 KB, 512 KB and
# 1 MB of dgates did alike.
cdef enum:
    GRADIENT_SPAN_BYTES = 512 * 1024          # of dgates per span
    SPANNED_GRADIENT_MAX_BYTES = 256 * 1024   # dW summed whole when larger


cdef inline int gradient_span(int T, int B, int G, int In, size_t itemsize) noexcept nogil:
    """The steps per span of a BPTT loop's dW_hh sum (see above): T when dW
    (G, In) is too large to be summed in parts."""
    if <size_t>G * In * itemsize > SPANNED_GRADIENT_MAX_BYTES:
        return T
    return max(1, min(T, <int>(GRADIENT_SPAN_BYTES // (<size_t>B * G * itemsize))))


def gradient_span_steps(int T, int B, int G, int In, int itemsize):
    """gradient_span, for the tests."""
    return gradient_span(T, B, G, In, itemsize)


cdef struct InputSide:
    # A layer fed by the layer below (not by the ids): the gradients of its
    # input product, added span by span with dW_hh (BPTT loops' `below`).
    int In                     # 0: none
    const void* x              # (T*B, In): the layer's input
    const void* W_ih           # (G, In)
    bint pack_W_ih             # dx's products on the packed kernel (worth_packing)
    const void* W_ih_packed    # W_ih packed for them, at the first span; or NULL
    void* dW_ih                # (G, In), overwritten
    void* dx                   # (T*B, In), overwritten: dL/dx, for the layer below


cdef int input_side(tuple below, int N, int G, InputSide* side, const real* tag) except -1:
    """Points side at below = (x (N, In), W_ih (G, In), dW_ih (G, In), dx (N, In))
    once checked; side.In = 0 for None. Free side.W_ih_packed, which the
    first span packs, with charlm_free_lines."""
    cdef const real[:, ::1] x, W_ih
    cdef real[:, ::1] dW_ih, dx
    memset(side, 0, sizeof(InputSide))
    if below is None:
        return 0
    _require(len(below) == 4, "below must be (x, W_ih, dW_ih, dx)")
    x, W_ih, dW_ih, dx = below
    cdef int In = x.shape[1]
    _require(In >= 1 and x.shape[0] == N and _shape(W_ih, 2) == (G, In)
             and _shape(dW_ih, 2) == (G, In) and _shape(dx, 2) == (N, In),
             "below: shape mismatch")
    side.In = In
    side.x, side.W_ih, side.dW_ih, side.dx = &x[0, 0], &W_ih[0, 0], &dW_ih[0, 0], &dx[0, 0]
    side.pack_W_ih = worth_packing(N, In, G, &dx[0, 0])
    return 0


cdef inline int add_gradient_span(int t, int span, int span_end, int T, int B, int G, int H,
                                  const real* dgates_h, const real* h, real* dW_hh,
                                  const real* dgates_x, InputSide* below) noexcept nogil:
    """After BPTT step t (steps run from T - 1 down to 0): once the steps
    [t, span_end) make a span, or t is the first step, add their part of
    the weight gradients: dW_hh (G, H) (+)= dgates_h[t:span_end].T @
    h[t:span_end], for dgates_h (T, B, G) and h (T, B, H) (the chunk's last
    span in time overwrites dW_hh); with a layer below, the same for dW_ih
    from dgates_x and x, and dx[t:span_end] = dgates_x[t:span_end] @ W_ih.
    Returns the end of the next span."""
    cdef int rows, In = below.In
    cdef size_t first = <size_t>t * B       # the span's first row
    if span_end - t < span and t > 0:
        return span_end
    rows = (span_end - t) * B
    weight_gradient(G, H, rows, dgates_h + first * G, h + first * H, dW_hh, span_end != T)
    if In > 0:
        # packed here rather than before the loop, which it would only crowd
        # out of cache (2x512 models: 4 MB, used at the end of the chunk)
        if below.pack_W_ih and below.W_ih_packed == NULL:
            below.W_ih_packed = pack_or_null(<const real*>below.W_ih, G, In, In, 1)
        input_backward(rows, G, In, dgates_x + first * G, <const real*>below.x + first * In,
                       <const real*>below.W_ih, <const real*>below.W_ih_packed,
                       <real*>below.dW_ih, span_end != T, <real*>below.dx + first * In)
    return t


cdef void input_backward(int N, int G, int In, const real* dgates, const real* x,
                         const real* W_ih, const real* W_ih_packed, real* dW_ih,
                         bint accumulate, real* dx) noexcept nogil:
    """The input product's backward for N rows: dW_ih (G, In) (+)= dgates.T @ x
    and dx (N, In) = dgates @ W_ih, for dgates (N, G), x (N, In), W_ih (G, In)
    (W_ih_packed: W_ih packed by pack_or_null, or NULL for BLAS)."""
    # dW_ih (+)= dgates.T @ x                  (G,In) = (G,N) @ (N,In)
    weight_gradient(G, In, N, dgates, x, dW_ih, accumulate)
    # dx = dgates @ W_ih                       (N,In) = (N,G) @ (G,In)
    if W_ih_packed != NULL:
        packed_gemm(N, In, G, dgates, G, W_ih_packed, False, dx, In)
    else:
        gemm(False, False, N, In, G, 1, dgates, G, W_ih, In, 0, dx, In)


# The recurrences' two products with W_hh (G, H), forward and backward. With
# one stream (B = 1: evaluation, sampling through the model) each is a
# matrix-vector product: GEMV streams W_hh once per step on BLAS's threads,
# which beats the packed kernel on one core, so nothing is packed then.

# Products with a weight matrix over all T*B rows of a chunk (input
# projections, the output layer and their gradients) also go through a packed
# copy of the weights: packing costs one pass over W, and the packed kernel
# beat OpenBLAS's sgemm on one thread (benchmarks/README.md). Not worth it:
# a few rows, which do not repay the packing; a width that leaves much of the
# last panel padding (V = 65 is two panels of 32 and one of a single column);
# and, unless BLAS runs on one thread, weights larger than a core's L2 cache,
# where a single-stream evaluation, which gives BLAS both cores, lost 10% on
# a 2x512 LSTM (Zen 4). Those, and a failed allocation, go to BLAS.
cdef enum:
    PACKED_PRODUCT_MIN_ROWS = 8
    PACKED_PRODUCT_MAX_WEIGHT_BYTES = 1 << 20


cdef inline bint worth_packing(int m, int n, int k, real* kind) noexcept nogil:
    """For the product of m rows by k x n weights (kind only picks the precision)."""
    cdef int panel = CHARLM_NR_F if real is float else CHARLM_NR_D
    cdef int padding = (n + panel - 1) // panel * panel - n
    return (m >= PACKED_PRODUCT_MIN_ROWS and 8 * padding <= n
            and own_kernel_takes(<size_t>n * k * sizeof(real), PACKED_PRODUCT_MAX_WEIGHT_BYTES))


cdef void times_weights(bint w_transposed, int m, int n, int k, const real* a, int lda,
                        const real* w, int ldw, const real* bias, bint accumulate,
                        real* c, int ldc) noexcept nogil:
    """c (m, n) = a (m, k) @ op(w) + bias (n,) on every row, or without bias
    (NULL) c (+)= a @ op(w). op(w) = w.T for w stored (n, k) when w_transposed,
    else w stored (k, n); ldw is w's row stride. bias requires not accumulate."""
    cdef real* packed = NULL
    cdef int r
    if worth_packing(m, n, k, c):
        if w_transposed:
            packed = pack_or_null(w, k, n, 1, ldw)
        else:
            packed = pack_or_null(w, k, n, ldw, 1)
    if packed == NULL:
        if bias != NULL:
            for r in range(m):
                memcpy(c + <size_t>r * ldc, bias, n * sizeof(real))
        gemm(False, w_transposed, m, n, k, 1, a, lda, w, ldw,
             accumulate or bias != NULL, c, ldc)
    elif one_stream_threads >= 2 and team_rows_gemm(m, n, k, a, lda, packed, bias,
                                                    accumulate, c, ldc):
        pass                       # a single stream's chunk, rows shared (_team.h)
    elif bias != NULL:             # added as each block of c is stored
        if real is float:
            charlm_packed_gemm_bias_f(m, n, k, a, lda, packed, bias, c, ldc)
        else:
            charlm_packed_gemm_bias_d(m, n, k, a, lda, packed, bias, c, ldc)
    else:
        packed_gemm(m, n, k, a, lda, packed, accumulate, c, ldc)
    charlm_free_lines(packed)


cdef bint team_rows_gemm(int m, int n, int k, const real* a, int lda, const real* packed,
                         const real* bias, bint accumulate, real* c, int ldc) noexcept nogil:
    """c (m, n) (+)= a @ packed (+ bias), the rows shared out to the single
    stream's team (one_stream_threads, set while evaluating); False if the
    rows are too few to share, nothing written."""
    global one_stream_team_runs
    cdef int status
    if real is float:
        status = charlm_team_rows_gemm_f(one_stream_threads, m, n, k, a, lda, packed, bias,
                                         accumulate, c, ldc)
    else:
        status = charlm_team_rows_gemm_d(one_stream_threads, m, n, k, a, lda, packed, bias,
                                         accumulate, c, ldc)
    if status == 0:
        one_stream_team_runs += 1
    return status == 0


cdef extern from "_gemv.h":
    # One row times a weight matrix laid out in strips (see the header).
    void charlm_gemv_layout_f(int K, int N, const float* b, Py_ssize_t stride_k,
                              Py_ssize_t stride_n, float* out) noexcept nogil
    void charlm_gemv_layout_d(int K, int N, const double* b, Py_ssize_t stride_k,
                              Py_ssize_t stride_n, double* out) noexcept nogil
    void charlm_gemv_f(int K, int N, const float* x, const float* laid_out,
                       float* y) noexcept nogil
    void charlm_gemv_d(int K, int N, const double* x, const double* laid_out,
                       double* y) noexcept nogil
    void charlm_gemv_dir_f(int K, int N, const float* x, const float* laid_out,
                           float* y, int order) noexcept nogil
    void charlm_gemv_dir_d(int K, int N, const double* x, const double* laid_out,
                           double* y, int order) noexcept nogil
    int CHARLM_GEMV_FORWARDS, CHARLM_GEMV_STRIPS_BACKWARDS, CHARLM_GEMV_REVERSED
    int charlm_gemv_strip_width(int N, int n0, int strip, int lanes) noexcept nogil
    int CHARLM_GEMV_STRIP_F, CHARLM_GEMV_STRIP_D, CHARLM_VBYTES


cdef inline void gemv_layout(int K, int N, const real* W, real* out) noexcept nogil:
    """out (K*N values) = W.T (K, N) laid out for gemv, W row-major (N, K)."""
    if real is float:
        charlm_gemv_layout_f(K, N, W, 1, K, out)
    else:
        charlm_gemv_layout_d(K, N, W, 1, K, out)


cdef inline void gemv(int K, int N, const real* x, const real* laid_out,
                      real* y) noexcept nogil:
    """y (N,) += x (K,) @ W.T, W.T laid out by gemv_layout."""
    if real is float:
        charlm_gemv_f(K, N, x, laid_out, y)
    else:
        charlm_gemv_d(K, N, x, laid_out, y)


cdef inline void gemv_dir(int K, int N, const real* x, const real* laid_out, real* y,
                          int order) noexcept nogil:
    """gemv, the layout read in `order` (a CHARLM_GEMV_* order of _gemv.h):
    FORWARDS; STRIPS_BACKWARDS (the same sums); REVERSED (the exact reverse:
    each output summed from its last input to its first)."""
    if real is float:
        charlm_gemv_dir_f(K, N, x, laid_out, y, order)
    else:
        charlm_gemv_dir_d(K, N, x, laid_out, y, order)


# A single row (sampling, single-stream evaluation) times a weight matrix
# (N outputs, K inputs) of up to this size goes through the own GEMV, the
# matrix laid out for it once; larger ones keep their (N, K) layout and go
# to BLAS, whose GEMV reads a matrix that no longer fits one core's L2 with
# both cores (own GEMV on the 4 MB matrices of a 2x512 LSTM: sampling at
# half the speed; BLAS on them transposed: 8% slower than on their layout).
DEF OWN_GEMV_MAX_BYTES = 512 * 1024


cdef inline bint own_gemv_size(int N, int K, size_t itemsize) noexcept nogil:
    return <size_t>N * K * itemsize <= OWN_GEMV_MAX_BYTES


# A single stream's recurrence lays W_hh out for the own GEMV only when the
# chunk has this many steps: the copy costs about as much as 100-200 steps
# save (Model.next_logits, called per character by the reference sampler,
# ran 2-3x slower when every call of one step transposed W_hh). A W_hh over
# the size limit goes to the own GEMV too while BLAS runs on one thread (the
# two-stage evaluation pipeline): there the own loop read a 4 MB matrix from
# L3 at 90 GB/s (C model; 59 for the same loop over the plain transposed
# matrix), and evaluation, which used BLAS's GEMV on one thread there, ran
# 42-47k -> 78-83k chars/s for a 2x256 LSTM, 28.6-29.1k -> 37.8-38.3k for a
# 2x384 GRU (Zen 5, 2026-12-02, 2 runs each).
DEF OWN_GEMV_MIN_STEPS = 256


cdef real* pack_W_hhT(const real* W_hh, int G, int H, int B, int T) except? NULL:
    """W_hh.T (H, G) laid out for times_W_hhT over T steps: packed when B > 1;
    for a single stream over a long chunk, laid out for the own GEMV; else
    NULL (BLAS)."""
    cdef real* laid_out
    if B > 1:
        return pack(W_hh, H, G, 1, H)
    if T < OWN_GEMV_MIN_STEPS or not own_kernel_takes(<size_t>G * H * sizeof(real),
                                                      OWN_GEMV_MAX_BYTES):
        return NULL
    laid_out = <real*>charlm_alloc_lines(<size_t>H * G * sizeof(real))
    if laid_out == NULL:
        raise MemoryError("cannot allocate the laid-out weights")
    gemv_layout(H, G, W_hh, laid_out)
    return laid_out


cdef extern from "_team.h":
    # A single stream's recurrence shared by a team of threads (see the header).
    int CHARLM_TEAM_MAX
    int CHARLM_LSTM, CHARLM_GRU, CHARLM_RNN_TANH, CHARLM_RNN_RELU
    int charlm_one_stream_forward_f(int cell, int members, int T, int H, float* gates,
                                    const float* W_hh, float* h, float* c,
                                    float* tanh_c, const float* peep,
                                    const float* b_hh, float* hn) noexcept nogil
    int charlm_one_stream_forward_d(int cell, int members, int T, int H, double* gates,
                                    const double* W_hh, double* h, double* c,
                                    double* tanh_c, const double* peep,
                                    const double* b_hh, double* hn) noexcept nogil
    int charlm_team_rows_gemm_f(int members, int M, int N, int K, const float* a, int lda,
                                const float* packed, const float* bias, int accumulate,
                                float* c, int ldc) noexcept nogil
    int charlm_team_rows_gemm_d(int members, int M, int N, int K, const double* a,
                                int lda, const double* packed, const double* bias,
                                int accumulate, double* c, int ldc) noexcept nogil


# A single stream over a long chunk whose W_hh is over the own GEMV's size
# limit goes to a team of this many of our own threads, when the caller
# allows more than one (charlm.parallel.one_stream_team; evaluation does),
# each thread owning a share of the units and its rows of W_hh, with one
# barrier per step (_team.h). It replaced BLAS's GEMV on both cores, which
# streamed the whole matrix from L3 at every step with a hand-off per call:
# evaluation of a 2x512 LSTM on a Zen 5 went from 13-14k chars/s to 16-19k
# (2026-12-02, benchmarks/bench_eval.py).
cdef int one_stream_threads = 1
cdef long one_stream_team_runs = 0      # recurrences the team has run (for the tests)


def set_one_stream_threads(int threads):
    """The threads a single stream's recurrence may use (at most
    CHARLM_TEAM_MAX); returns the previous setting."""
    global one_stream_threads
    previous = one_stream_threads
    one_stream_threads = max(1, min(threads, CHARLM_TEAM_MAX))
    return previous


def team_runs():
    """How many recurrences a team of threads has run in this process."""
    return one_stream_team_runs


def team_solos():
    """How many teams found the machine oversubscribed and finished on one
    thread (see _team.h)."""
    return charlm_team_solos


cdef bint one_stream_on_team(int cell, int T, int B, int H, int G, real* gates,
                             const real* W_hh, real* h, real* c, real* tanh_c,
                             const real* peep, const real* b_hh,
                             real* hn) noexcept nogil:
    """Run the recurrence (arrays as the forward kernels take them) on the
    team if it takes it (see above); False: not run, nothing written."""
    global one_stream_team_runs
    if (B != 1 or T < OWN_GEMV_MIN_STEPS or one_stream_threads < 2
            or <size_t>G * H * sizeof(real) <= OWN_GEMV_MAX_BYTES):
        return False
    cdef int status
    if real is float:
        status = charlm_one_stream_forward_f(cell, one_stream_threads, T, H, gates, W_hh,
                                             h, c, tanh_c, peep, b_hh, hn)
    else:
        status = charlm_one_stream_forward_d(cell, one_stream_threads, T, H, gates, W_hh,
                                             h, c, tanh_c, peep, b_hh, hn)
    if status != 0:
        return False
    one_stream_team_runs += 1
    return True


cdef real* pack_W_hh(const real* W_hh, int G, int H, int B) except? NULL:
    """W_hh (G, H) packed for times_W_hh; NULL when B == 1."""
    return pack(W_hh, G, H, H, 1) if B > 1 else NULL


cdef inline void times_W_hhT(int B, int G, int H, const real* h, const real* W_hh,
                             const real* W_hhT_packed, real* out) noexcept nogil:
    """out (B, G) += h (B, H) @ W_hh.T, W_hhT_packed from pack_W_hhT."""
    if W_hhT_packed != NULL and B > 1:
        packed_gemm(B, G, H, h, H, W_hhT_packed, True, out, G)
    elif W_hhT_packed != NULL:                   # one stream: laid out for gemv
        gemv(H, G, h, W_hhT_packed, out)
    else:
        gemm(False, True, B, G, H, 1, h, H, W_hh, H, 1, out, G)


cdef inline void times_W_hh(int B, int G, int H, const real* dgates, const real* W_hh,
                            const real* W_hh_packed, bint accumulate,
                            real* out) noexcept nogil:
    """out (B, H) (+)= dgates (B, G) @ W_hh"""
    if W_hh_packed != NULL:
        packed_gemm(B, H, G, dgates, G, W_hh_packed, accumulate, out, H)
    else:
        gemm(False, False, B, H, G, 1, dgates, G, W_hh, H, accumulate, out, H)


def packed_matmul(const real[:, ::1] a, const real[:, ::1] b, real[:, ::1] out,
                  bint accumulate=False, bint a_transposed=False):
    """out (+)= a @ b through pack() and packed_gemm(), as the recurrences use
    them: a (M, K), b (K, N), out (M, N). With a_transposed, out (+)= a.T @ b
    for a (K, M), as weight_gradient() computes it. Exposed for the tests."""
    cdef int M = a.shape[1] if a_transposed else a.shape[0]
    cdef int K = a.shape[0] if a_transposed else a.shape[1]
    cdef int N = b.shape[1]
    cdef real* b_packed
    _require(M >= 1 and K >= 1 and N >= 1 and b.shape[0] == K
             and _shape(out, 2) == (M, N), "packed_matmul: shape mismatch")
    b_packed = pack(&b[0, 0], K, N, N, 1)
    with nogil:
        if a_transposed:
            packed_gemm_at(M, N, K, &a[0, 0], M, b_packed, accumulate, &out[0, 0], N)
        else:
            packed_gemm(M, N, K, &a[0, 0], K, b_packed, accumulate, &out[0, 0], N)
    charlm_free_lines(b_packed)


cdef inline void column_sums(const real* x, int rows, int cols, real* out) noexcept nogil:
    """out[j] = x[:, j].sum() for a row-major (rows, cols) array."""
    cdef int r, j
    cdef const real* row
    memset(out, 0, cols * sizeof(real))
    for r in range(rows):
        row = x + <size_t>r * cols
        for j in range(cols):
            out[j] += row[j]


cdef inline void add_into(real* y, const real* x, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        y[i] += x[i]


# Reductions over one row, written as LANES independent partial results: a
# single running max or sum is one serial chain of dependent operations
# (each waits for the last), which the compiler may not reorder without
# -ffast-math; LANES chains overlap in the CPU. The order is fixed, so the
# result is deterministic.
cdef enum:
    LANES = 8

cdef inline real row_max(const real* x, int n) noexcept nogil:
    """max(x[0..n)), n >= 1. A NaN is never picked (x > NaN is false), but it
    still reaches the caller's exp(x - max), so it is never laundered."""
    cdef real lanes[LANES]
    cdef real m
    cdef int k = 0, l
    for l in range(LANES):
        lanes[l] = x[0]
    while k + LANES <= n:
        for l in range(LANES):
            lanes[l] = x[k + l] if x[k + l] > lanes[l] else lanes[l]
        k += LANES
    m = lanes[0]
    for l in range(1, LANES):
        m = lanes[l] if lanes[l] > m else m
    for k in range(k, n):
        m = x[k] if x[k] > m else m
    return m


cdef inline double row_sum(const real* x, int n) noexcept nogil:
    """sum(x[0..n)) accumulated in double."""
    cdef double lanes[LANES]
    cdef double s = 0
    cdef int k = 0, l
    for l in range(LANES):
        lanes[l] = 0
    while k + LANES <= n:
        for l in range(LANES):
            lanes[l] += x[k + l]
        k += LANES
    for l in range(LANES):
        s += lanes[l]
    for k in range(k, n):
        s += x[k]
    return s


cdef void _require(bint ok, str what) except *:
    if not ok:
        raise ValueError("charlm kernel: " + what)


# ---------------------------------------------------------------------------
# Input projection: gates = W_ih x + bias, for all N = T*B rows at once
# ---------------------------------------------------------------------------

def input_from_ids(const int[::1] ids, const real[:, ::1] W_ihT,
                   const real[::1] bias, real[:, ::1] gates):
    """First layer: gates[r] = W_ihT[ids[r]] + bias.

    ids (N,) int32, W_ihT (V, G), bias (G,), gates (N, G) written.
    W_ih @ one_hot(id) is column `id` of W_ih: a row gather, never a product.
    Raises ValueError if any id is outside [0, V).
    """
    cdef int N = ids.shape[0], V = W_ihT.shape[0], G = W_ihT.shape[1]
    cdef int r, j, bad = -1
    cdef const real* w
    cdef real* g
    _require(bias.shape[0] == G and gates.shape[0] == N and gates.shape[1] == G,
             "input_from_ids: shape mismatch")
    with nogil:
        for r in range(N):
            if ids[r] < 0 or ids[r] >= V:
                bad = r
                break
            w = &W_ihT[ids[r], 0]
            g = &gates[r, 0]
            for j in range(G):
                g[j] = w[j] + bias[j]
    _require(bad < 0, "input_from_ids: id out of range")


def input_from_ids_backward(const int[::1] ids, const real[:, ::1] dgates,
                            real[:, ::1] dW_ihT, real[::1] dbias):
    """dW_ihT = scatter-add of dgates rows at ids; dbias = dgates summed over rows.

    ids (N,), dgates (N, G), dW_ihT (V, G) overwritten, dbias (G,) overwritten.
    The transpose of the row gather: each row of dgates lands on its id's row.
    Every row lands on exactly one row of dW_ihT, so dbias is also the sum of
    the V rows of dW_ihT: V sums instead of N (65 against thousands).
    """
    cdef int N = ids.shape[0], V = dW_ihT.shape[0], G = dW_ihT.shape[1]
    cdef int r, bad = -1
    _require(dgates.shape[0] == N and dgates.shape[1] == G and dbias.shape[0] == G,
             "input_from_ids_backward: shape mismatch")
    with nogil:
        memset(&dW_ihT[0, 0], 0, <size_t>V * G * sizeof(real))
        for r in range(N):
            if ids[r] < 0 or ids[r] >= V:
                bad = r
                break
            add_into(&dW_ihT[ids[r], 0], &dgates[r, 0], G)
        column_sums(&dW_ihT[0, 0], V, G, &dbias[0])
    _require(bad < 0, "input_from_ids_backward: id out of range")


def input_from_dense(const real[:, ::1] x, const real[:, ::1] W_ih,
                     const real[::1] bias, real[:, ::1] gates):
    """Upper layers: gates = x @ W_ih.T + bias.

    x (N, In), W_ih (G, In), bias (G,), gates (N, G) written.
    """
    cdef int N = x.shape[0], In = x.shape[1], G = W_ih.shape[0]
    _require(W_ih.shape[1] == In and bias.shape[0] == G
             and gates.shape[0] == N and gates.shape[1] == G,
             "input_from_dense: shape mismatch")
    with nogil:
        # gates = x @ W_ih.T + bias                (N,G) = (N,In) @ (In,G) + (G,)
        times_weights(True, N, G, In, &x[0, 0], In, &W_ih[0, 0], In, &bias[0],
                      False, &gates[0, 0], G)


def input_from_dense_backward(const real[:, ::1] x, const real[:, ::1] W_ih,
                              const real[:, ::1] dgates, real[:, ::1] dW_ih,
                              real[::1] dbias, real[:, ::1] dx):
    """dW_ih = dgates.T @ x; dbias = dgates.sum(0); dx = dgates @ W_ih.

    x (N, In), W_ih (G, In), dgates (N, G); outputs overwritten:
    dW_ih (G, In), dbias (G,), dx (N, In).
    """
    cdef int N = x.shape[0], In = x.shape[1], G = W_ih.shape[0]
    _require(W_ih.shape[1] == In and dgates.shape[0] == N and dgates.shape[1] == G
             and dW_ih.shape[0] == G and dW_ih.shape[1] == In and dbias.shape[0] == G
             and dx.shape[0] == N and dx.shape[1] == In,
             "input_from_dense_backward: shape mismatch")
    cdef real* W_ih_packed = NULL
    if worth_packing(N, In, G, &dx[0, 0]):
        W_ih_packed = pack_or_null(&W_ih[0, 0], G, In, In, 1)
    with nogil:
        input_backward(N, G, In, &dgates[0, 0], &x[0, 0], &W_ih[0, 0], W_ih_packed,
                       &dW_ih[0, 0], False, &dx[0, 0])
        column_sums(&dgates[0, 0], N, G, &dbias[0])
    charlm_free_lines(W_ih_packed)


def bias_gradient(const real[:, ::1] dgates, real[::1] dbias):
    """dbias (G,) = dgates.sum(0) for dgates (N, G): the input bias's gradient
    of a layer whose other input gradients its BPTT loop added (`below`)."""
    _require(dbias.shape[0] == dgates.shape[1], "bias_gradient: shape mismatch")
    with nogil:
        column_sums(&dgates[0, 0], dgates.shape[0], dgates.shape[1], &dbias[0])


cdef void _check_recurrence(int T, int B, int H, int G, tuple shapes) except *:
    """Shared shape checks: gates (T,B,G), W_hh (G,H), h (T+1,B,H)."""
    gates_shape, W_hh_shape, h_shape = shapes
    _require(T >= 1 and B >= 1 and H >= 1, "empty chunk")
    _require(gates_shape == (T, B, G), "gates must be (T, B, G)")
    _require(W_hh_shape == (G, H), "W_hh must be (G, H)")
    _require(h_shape == (T + 1, B, H), "h must be (T+1, B, H)")


def _shape(a, int ndim):
    return tuple(a.shape[:ndim])


# ---------------------------------------------------------------------------
# Vanilla RNN:  h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),  act = tanh | relu
# ---------------------------------------------------------------------------

def rnn_forward(bint relu, real[:, :, ::1] gates, const real[:, ::1] W_hh,
                real[:, :, ::1] h):
    """Run the recurrence over the chunk.

    gates (T, B, H): in, the input projection with both biases; out, the
        pre-activations.
    W_hh (H, H).
    h (T+1, B, H): h[0] is the initial state (set by the caller); h[1:] written.
    """
    cdef int T = gates.shape[0], B = gates.shape[1], H = h.shape[2]
    cdef int t, b, j
    cdef real* pre
    cdef real* h_new
    cdef real* W_hhT
    cdef bint on_team
    _check_recurrence(T, B, H, H, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    with nogil:
        on_team = one_stream_on_team(CHARLM_RNN_RELU if relu else CHARLM_RNN_TANH, T, B, H,
                                     H, &gates[0, 0, 0], &W_hh[0, 0], &h[0, 0, 0], NULL,
                                     NULL, NULL, NULL, NULL)
    if on_team:
        return
    W_hhT = pack_W_hhT(&W_hh[0, 0], H, H, B, T)
    try:
        with nogil:
            for t in range(T):
                # gates[t] += h[t] @ W_hh.T        (B,H) += (B,H) @ (H,H)
                times_W_hhT(B, H, H, &h[t, 0, 0], &W_hh[0, 0], W_hhT, &gates[t, 0, 0])
                for b in range(B):
                    pre = &gates[t, b, 0]
                    h_new = &h[t + 1, b, 0]
                    if relu:
                        for j in range(H):
                            h_new[j] = pre[j] if pre[j] > 0 else 0
                    else:
                        for j in range(H):
                            h_new[j] = tanh_(pre[j])
    finally:
        charlm_free_lines(W_hhT)


def rnn_backward(bint relu, const real[:, :, ::1] h, const real[:, ::1] W_hh,
                 const real[:, :, ::1] dh_out, real[:, ::1] dh_carry,
                 real[:, :, ::1] dgates, real[:, ::1] dW_hh, tuple below=None):
    """Truncated BPTT through the chunk.

    h (T+1, B, H) from rnn_forward; W_hh (H, H).
    dh_out (T, B, H): dL/dh_t arriving from above (output layer or next layer).
    dh_carry (B, H): in, dL/dh_T from beyond the chunk (zero when truncating);
        out, dL/dh_0, the gradient for the initial state.
    dgates (T, B, H) written: dL/d(pre-activation).
    dW_hh (H, H) overwritten.
    below: for a layer fed by the layer below, (x, W_ih, dW_ih, dx) (see
        InputSide): dW_ih and dx are added as the loop goes, too.
    """
    cdef int T = dh_out.shape[0], B = dh_out.shape[1], H = dh_out.shape[2]
    cdef int t, b, j, span_end = T, span = gradient_span(T, B, H, H, sizeof(real))
    cdef real dh
    cdef const real* h_t
    cdef const real* up
    cdef real* carry
    cdef real* dpre
    cdef real* W_hh_packed
    _check_recurrence(T, B, H, H, (_shape(dgates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(dh_carry, 2) == (B, H), "dh_carry must be (B, H)")
    cdef InputSide side
    input_side(below, T * B, H, &side, &dgates[0, 0, 0])
    W_hh_packed = pack_W_hh(&W_hh[0, 0], H, H, B)
    try:
        with nogil:
            for t in range(T - 1, -1, -1):
                for b in range(B):
                    h_t = &h[t + 1, b, 0]
                    up = &dh_out[t, b, 0]
                    carry = &dh_carry[b, 0]
                    dpre = &dgates[t, b, 0]
                    for j in range(H):
                        dh = up[j] + carry[j]
                        if relu:
                            dpre[j] = dh if h_t[j] > 0 else 0
                        else:
                            dpre[j] = dh * (1 - h_t[j] * h_t[j])
                # dh_carry = dgates[t] @ W_hh      (B,H) = (B,H) @ (H,H)
                times_W_hh(B, H, H, &dgates[t, 0, 0], &W_hh[0, 0], W_hh_packed, False,
                           &dh_carry[0, 0])
                # dW_hh = dgates.T @ h[:T]         (H,H) = (H,N) @ (N,H), by spans
                span_end = add_gradient_span(t, span, span_end, T, B, H, H, &dgates[0, 0, 0],
                                             &h[0, 0, 0], &dW_hh[0, 0], &dgates[0, 0, 0],
                                             &side)
    finally:
        charlm_free_lines(W_hh_packed)
        charlm_free_lines(<void*>side.W_ih_packed)


# ---------------------------------------------------------------------------
# LSTM, gates stacked [i | f | g | o]:
#   i, f, o = sigmoid(.), g = tanh(.)
#   c_t = f * c_{t-1} + i * g
#   h_t = o * tanh(c_t)
# The peephole LSTM (Gers & Schmidhuber) lets the gates see the cell state
# through per-unit weights peep = [w_ci | w_cf | w_co], (3, H):
#   i = sigmoid(. + w_ci * c_{t-1}),  f = sigmoid(. + w_cf * c_{t-1})
#   o = sigmoid(. + w_co * c_t)
# Both share these kernels; peep is None (NULL) for the plain LSTM.
# ---------------------------------------------------------------------------

cdef extern from "_lstm_units.h":
    # The element-wise equations of one stream and one step, forward and
    # backward side by side (see the header for why they are written in C).
    void charlm_lstm_forward_units_f(int H, float* gate, const float* c_prev, float* c,
                                     float* tanh_c, float* h, const float* peep) noexcept nogil
    void charlm_lstm_forward_units_d(int H, double* gate, const double* c_prev, double* c,
                                     double* tanh_c, double* h, const double* peep) noexcept nogil
    void charlm_lstm_backward_units_f(int H, float* gate, const float* c_prev,
                                      const float* c_t, const float* tanh_c,
                                      const float* dh_next, const float* dh_up, float* dc,
                                      const float* peep, float* dpeep) noexcept nogil
    void charlm_lstm_backward_units_d(int H, double* gate, const double* c_prev,
                                      const double* c_t, const double* tanh_c,
                                      const double* dh_next, const double* dh_up, double* dc,
                                      const double* peep, double* dpeep) noexcept nogil


cdef inline void lstm_units(int H, real* gate, const real* c_prev, real* c,
                            real* tanh_c, real* h, const real* peep) noexcept nogil:
    """One stream, one step, after the products: gate (4H,) holds the
    pre-activations [i|f|g|o] and receives the activated gates; writes
    c = c_t, tanh_c = tanh(c_t) and h = h_t. c may be c_prev (the sampler
    updates its state in place); tanh_c and h must not overlap anything else.
    peep (3H,) or NULL: the peephole weights [w_ci|w_cf|w_co]."""
    if real is float:
        charlm_lstm_forward_units_f(H, gate, c_prev, c, tanh_c, h, peep)
    else:
        charlm_lstm_forward_units_d(H, gate, c_prev, c, tanh_c, h, peep)


cdef inline void lstm_backward_units(int H, real* gate, const real* c_prev,
                                     const real* c_t, const real* tanh_c,
                                     const real* dh_next, const real* dh_up, real* dc,
                                     const real* peep, real* dpeep) noexcept nogil:
    """One stream, one step of BPTT through the equations of lstm_units:
    gate (4H,): in the activated gates, out dL/d(pre-activations);
    dL/dh_t = dh_next + dh_up; dc (H,): in dL/dc_t, out dL/dc_{t-1};
    dpeep (3H,) accumulated when peep is not NULL."""
    if real is float:
        charlm_lstm_backward_units_f(H, gate, c_prev, c_t, tanh_c, dh_next, dh_up, dc,
                                     peep, dpeep)
    else:
        charlm_lstm_backward_units_d(H, gate, c_prev, c_t, tanh_c, dh_next, dh_up, dc,
                                     peep, dpeep)


cdef inline const real* _peep_pointer(const real[:, ::1] peep, int H) except? NULL:
    """NULL for the plain LSTM (peep None), else the checked (3, H) weights."""
    if peep is None:
        return NULL
    _require(_shape(peep, 2) == (3, H), f"peephole weights must be (3, {H})")
    return &peep[0, 0]


def lstm_forward(real[:, :, ::1] gates, const real[:, ::1] W_hh,
                 real[:, :, ::1] h, real[:, :, ::1] c, real[:, :, ::1] tanh_c,
                 const real[:, ::1] peep=None):
    """Run the recurrence over the chunk.

    gates (T, B, 4H): in, the input projection with both biases; out, the
        activated gates i, f, g, o.
    W_hh (4H, H).
    h, c (T+1, B, H): index 0 is the initial state (set by the caller).
    tanh_c (T, B, H) written: tanh(c_t), kept for the backward pass.
    peep (3, H) or None: the peephole weights [w_ci|w_cf|w_co].
    """
    cdef int T = gates.shape[0], B = gates.shape[1], H = h.shape[2], G = 4 * H
    cdef int t, b
    cdef const real* w_peep
    cdef real* W_hhT
    cdef bint on_team
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(c, 3) == (T + 1, B, H) and _shape(tanh_c, 3) == (T, B, H),
             "c must be (T+1, B, H) and tanh_c (T, B, H)")
    w_peep = _peep_pointer(peep, H)
    with nogil:
        on_team = one_stream_on_team(CHARLM_LSTM, T, B, H, G, &gates[0, 0, 0], &W_hh[0, 0],
                                     &h[0, 0, 0], &c[0, 0, 0], &tanh_c[0, 0, 0], w_peep,
                                     NULL, NULL)
    if on_team:
        return
    W_hhT = pack_W_hhT(&W_hh[0, 0], G, H, B, T)
    try:
        with nogil:
            for t in range(T):
                # gates[t] += h[t] @ W_hh.T        (B,4H) += (B,H) @ (H,4H)
                times_W_hhT(B, G, H, &h[t, 0, 0], &W_hh[0, 0], W_hhT, &gates[t, 0, 0])
                for b in range(B):
                    lstm_units(H, &gates[t, b, 0], &c[t, b, 0], &c[t + 1, b, 0],
                               &tanh_c[t, b, 0], &h[t + 1, b, 0], w_peep)
    finally:
        charlm_free_lines(W_hhT)


def lstm_backward(real[:, :, ::1] gates, const real[:, ::1] W_hh,
                  const real[:, :, ::1] h, const real[:, :, ::1] c,
                  const real[:, :, ::1] tanh_c, const real[:, :, ::1] dh_out,
                  real[:, ::1] dh_carry, real[:, ::1] dc_carry,
                  real[:, ::1] dW_hh,
                  const real[:, ::1] peep=None, real[:, ::1] dpeep=None, tuple below=None):
    """Truncated BPTT through the chunk.

    gates (T, B, 4H): in, the activated gates from lstm_forward; out, dgates,
        dL/d(pre-activation) of [i|f|g|o] (in place: one buffer instead of
        two keeps more of the chunk in cache; measured in the README's Speed).
    h, c (T+1, B, H), tanh_c (T, B, H): from lstm_forward. W_hh (4H, H).
    dh_out (T, B, H): dL/dh_t arriving from above.
    dh_carry, dc_carry (B, H): in, dL/dh_T and dL/dc_T from beyond the chunk;
        out, dL/dh_0 and dL/dc_0.
    dW_hh (4H, H) overwritten.
    peep (3, H), dpeep (3, H) overwritten: the peephole LSTM; both None
        for the plain one.
    below: for a layer fed by the layer below, (x, W_ih, dW_ih, dx) (see
        InputSide): dW_ih and dx are added as the loop goes, too.
    """
    cdef int T = dh_out.shape[0], B = dh_out.shape[1], H = dh_out.shape[2], G = 4 * H
    cdef int t, b, span_end = T, span = gradient_span(T, B, G, H, sizeof(real))
    cdef const real* w_peep = NULL
    cdef real* dw_peep = NULL
    cdef real* W_hh_packed
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(c, 3) == (T + 1, B, H) and _shape(tanh_c, 3) == (T, B, H)
             and _shape(dh_carry, 2) == (B, H) and _shape(dc_carry, 2) == (B, H),
             "lstm_backward: shape mismatch")
    _require((peep is None) == (dpeep is None), "lstm_backward: pass peep and dpeep together")
    if peep is not None:
        w_peep = _peep_pointer(peep, H)
        _require(_shape(dpeep, 2) == (3, H), f"dpeep must be (3, {H})")
        dw_peep = &dpeep[0, 0]
        memset(dw_peep, 0, 3 * H * sizeof(real))
    cdef InputSide side
    input_side(below, T * B, G, &side, &gates[0, 0, 0])
    W_hh_packed = pack_W_hh(&W_hh[0, 0], G, H, B)
    try:
        with nogil:
            for t in range(T - 1, -1, -1):
                for b in range(B):
                    # dc_carry[b] goes from dL/dc_t to dL/dc_{t-1}
                    # gates[t, b] becomes dgates[t, b]
                    lstm_backward_units(H, &gates[t, b, 0], &c[t, b, 0], &c[t + 1, b, 0],
                                        &tanh_c[t, b, 0], &dh_carry[b, 0], &dh_out[t, b, 0],
                                        &dc_carry[b, 0], w_peep, dw_peep)
                # dh_carry = dgates[t] @ W_hh      (B,H) = (B,4H) @ (4H,H)
                times_W_hh(B, G, H, &gates[t, 0, 0], &W_hh[0, 0], W_hh_packed, False,
                           &dh_carry[0, 0])
                # dW_hh = dgates.T @ h[:T]         (4H,H) = (4H,N) @ (N,H), by spans
                span_end = add_gradient_span(t, span, span_end, T, B, G, H, &gates[0, 0, 0],
                                             &h[0, 0, 0], &dW_hh[0, 0], &gates[0, 0, 0],
                                             &side)
    finally:
        charlm_free_lines(W_hh_packed)
        charlm_free_lines(<void*>side.W_ih_packed)


# ---------------------------------------------------------------------------
# GRU, gates stacked [r | z | n]:
#   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z likewise
#   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
#   h_t = (1 - z) * n + z * h_{t-1}
# The input projection carries b_ih only; b_hh is added here because b_hn
# sits inside the product with r.
# ---------------------------------------------------------------------------

cdef extern from "_gru_units.h":
    # The element-wise equations of one stream and one step, forward and
    # backward side by side (see the header for why they are written in C).
    void charlm_gru_forward_units_f(int H, float* gate, const float* hh, const float* h_prev,
                                    float* h) noexcept nogil
    void charlm_gru_forward_units_d(int H, double* gate, const double* hh,
                                    const double* h_prev, double* h) noexcept nogil
    void charlm_gru_backward_units_f(int H, const float* gate, const float* hh_n,
                                     const float* h_prev, const float* dh_up, float* dh,
                                     float* dx, float* dhh) noexcept nogil
    void charlm_gru_backward_units_d(int H, const double* gate, const double* hh_n,
                                     const double* h_prev, const double* dh_up, double* dh,
                                     double* dx, double* dhh) noexcept nogil


cdef inline void gru_units(int H, real* gate, const real* hh, const real* h_prev,
                           real* h) noexcept nogil:
    """One stream, one step, after the products: gate (3H,) holds W_ih x + b_ih
    as [r|z|n] and receives the activated gates; hh (3H,) holds W_hh h + b_hh;
    writes h = h_t. h may be h_prev (the sampler updates in place)."""
    if real is float:
        charlm_gru_forward_units_f(H, gate, hh, h_prev, h)
    else:
        charlm_gru_forward_units_d(H, gate, hh, h_prev, h)


cdef inline void gru_backward_units(int H, const real* gate, const real* hh_n,
                                    const real* h_prev, const real* dh_up, real* dh,
                                    real* dx, real* dhh) noexcept nogil:
    """One stream, one step of BPTT through the equations of gru_units:
    dh (H,): in dL/dh_t from step t+1 (dh_up is added), out the direct part of
    dL/dh_{t-1}; dx, dhh (3H,) written: dL/d(W_ih x + b_ih), dL/d(W_hh h + b_hh)."""
    if real is float:
        charlm_gru_backward_units_f(H, gate, hh_n, h_prev, dh_up, dh, dx, dhh)
    else:
        charlm_gru_backward_units_d(H, gate, hh_n, h_prev, dh_up, dh, dx, dhh)


def gru_forward(real[:, :, ::1] gates, const real[:, ::1] W_hh,
                const real[::1] b_hh, real[:, :, ::1] h, real[:, :, ::1] hn,
                real[:, ::1] hh):
    """Run the recurrence over the chunk.

    gates (T, B, 3H): in, W_ih x + b_ih; out, the activated gates r, z, n.
    W_hh (3H, H), b_hh (3H,).
    h (T+1, B, H): h[0] is the initial state (set by the caller).
    hn (T, B, H) written: W_hn h_{t-1} + b_hn, kept for the backward pass.
    hh (B, 3H): scratch for W_hh h_{t-1} + b_hh.
    """
    cdef int T = gates.shape[0], B = gates.shape[1], H = h.shape[2], G = 3 * H
    cdef int t, b
    cdef real* W_hhT
    cdef bint on_team
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(b_hh.shape[0] == G and _shape(hn, 3) == (T, B, H)
             and _shape(hh, 2) == (B, G), "gru_forward: shape mismatch")
    with nogil:
        on_team = one_stream_on_team(CHARLM_GRU, T, B, H, G, &gates[0, 0, 0], &W_hh[0, 0],
                                     &h[0, 0, 0], NULL, NULL, NULL, &b_hh[0], &hn[0, 0, 0])
    if on_team:
        return
    W_hhT = pack_W_hhT(&W_hh[0, 0], G, H, B, T)
    try:
        with nogil:
            for t in range(T):
                for b in range(B):
                    memcpy(&hh[b, 0], &b_hh[0], G * sizeof(real))
                # hh = h[t] @ W_hh.T + b_hh        (B,3H) += (B,H) @ (H,3H)
                times_W_hhT(B, G, H, &h[t, 0, 0], &W_hh[0, 0], W_hhT, &hh[0, 0])
                for b in range(B):
                    gru_units(H, &gates[t, b, 0], &hh[b, 0], &h[t, b, 0], &h[t + 1, b, 0])
                    # kept for the backward pass: W_hn h_{t-1} + b_hn
                    memcpy(&hn[t, b, 0], &hh[b, 2 * H], H * sizeof(real))
    finally:
        charlm_free_lines(W_hhT)


def gru_backward(const real[:, :, ::1] gates, const real[:, :, ::1] hn,
                 const real[:, ::1] W_hh, const real[:, :, ::1] h,
                 const real[:, :, ::1] dh_out, real[:, ::1] dh_carry,
                 real[:, :, ::1] dgates_x, real[:, :, ::1] dgates_h,
                 real[:, ::1] dW_hh, real[::1] db_hh, tuple below=None):
    """Truncated BPTT through the chunk.

    gates (T, B, 3H) activated and hn (T, B, H): from gru_forward.
    W_hh (3H, H); h (T+1, B, H).
    dh_out (T, B, H): dL/dh_t arriving from above.
    dh_carry (B, H): in, dL/dh_T; out, dL/dh_0.
    dgates_x (T, B, 3H) written: gradient for the input projection
        W_ih x + b_ih.
    dgates_h (T, B, 3H) written: gradient for W_hh h + b_hh. It differs from
        dgates_x only in the n block, which is scaled by r.
    dW_hh (3H, H), db_hh (3H,) overwritten.
    """
    cdef int T = dh_out.shape[0], B = dh_out.shape[1], H = dh_out.shape[2], G = 3 * H
    cdef int t, b, span_end = T, span = gradient_span(T, B, G, H, sizeof(real))
    cdef real* W_hh_packed
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(hn, 3) == (T, B, H) and _shape(dh_carry, 2) == (B, H)
             and _shape(dgates_x, 3) == (T, B, G) and _shape(dgates_h, 3) == (T, B, G)
             and _shape(dW_hh, 2) == (G, H) and db_hh.shape[0] == G,
             "gru_backward: shape mismatch")
    cdef InputSide side
    input_side(below, T * B, G, &side, &dgates_x[0, 0, 0])
    W_hh_packed = pack_W_hh(&W_hh[0, 0], G, H, B)
    try:
        with nogil:
            for t in range(T - 1, -1, -1):
                for b in range(B):
                    # dh_carry[b] becomes the direct part of dL/dh_{t-1};
                    # the product below adds the rest
                    gru_backward_units(H, &gates[t, b, 0], &hn[t, b, 0], &h[t, b, 0],
                                       &dh_out[t, b, 0], &dh_carry[b, 0],
                                       &dgates_x[t, b, 0], &dgates_h[t, b, 0])
                # dh_carry += dgates_h[t] @ W_hh       (B,H) += (B,3H) @ (3H,H)
                times_W_hh(B, G, H, &dgates_h[t, 0, 0], &W_hh[0, 0], W_hh_packed, True,
                           &dh_carry[0, 0])
                # dW_hh = dgates_h.T @ h[:T]           (3H,H) = (3H,N) @ (N,H), by spans
                span_end = add_gradient_span(t, span, span_end, T, B, G, H, &dgates_h[0, 0, 0],
                                             &h[0, 0, 0], &dW_hh[0, 0], &dgates_x[0, 0, 0],
                                             &side)
            column_sums(&dgates_h[0, 0, 0], T * B, G, &db_hh[0])
    finally:
        charlm_free_lines(W_hh_packed)
        charlm_free_lines(<void*>side.W_ih_packed)


# ---------------------------------------------------------------------------
# Output layer and loss: logits = h_top @ W_out.T + b_out;
# loss = mean over rows of -log softmax(logits)[target]
# ---------------------------------------------------------------------------

def output_forward(const real[:, ::1] h_top, const real[:, ::1] W_out,
                   const real[::1] b_out, real[:, ::1] logits):
    """logits = h_top @ W_out.T + b_out.  h_top (N, H), W_out (V, H), logits (N, V)."""
    input_from_dense(h_top, W_out, b_out, logits)


def output_backward(const real[:, ::1] h_top, const real[:, ::1] W_out,
                    const real[:, ::1] dlogits, real[:, ::1] dW_out,
                    real[::1] db_out, real[:, ::1] dh_top):
    """dW_out = dlogits.T @ h_top; db_out = dlogits.sum(0); dh_top = dlogits @ W_out."""
    input_from_dense_backward(h_top, W_out, dlogits, dW_out, db_out, dh_top)


def softmax_cross_entropy(real[:, ::1] logits, const int[::1] targets):
    """Fused, numerically stable softmax, loss and gradient in one pass per row.

    logits (N, V): in, the logits; out, dL/dlogits for L = the mean loss over
        the scored rows, i.e. (softmax - one_hot(target)) / n_scored, and 0 in
        the rows whose target is IGNORE (-1).
    targets (N,) int32 in [0, V), or -1: no loss at this position.
    Returns the mean loss in nats over the scored rows (a Python float,
    accumulated in double); 0 when no row is scored.
    """
    cdef int N = logits.shape[0], V = logits.shape[1]
    cdef int r, k, y, scored = 0, bad = -1
    cdef real m, scale, inv_z
    cdef double total = 0, z
    cdef real* row
    _require(targets.shape[0] == N and N >= 1 and V >= 1,
             "softmax_cross_entropy: shape mismatch")
    with nogil:
        for r in range(N):
            if targets[r] < IGNORE or targets[r] >= V:
                bad = r
            scored += targets[r] != IGNORE
    _require(bad < 0, "softmax_cross_entropy: target out of range")
    scale = 1 / <real>max(scored, 1)
    with nogil:
        for r in range(N):
            row = &logits[r, 0]
            y = targets[r]
            if y == IGNORE:
                for k in range(V):
                    row[k] = 0
                continue
            m = row_max(row, V)
            # loss_r = log sum_k exp(logit_k - m) - (logit_y - m)
            total -= row[y] - m
            for k in range(V):
                row[k] = exp_(row[k] - m)
            z = row_sum(row, V)
            total += log(z)
            # one division per row, not per element (a double divide per
            # element cost more than the exps)
            inv_z = <real>(scale / z)
            for k in range(V):
                row[k] = row[k] * inv_z
            row[y] -= scale
    return total / max(scored, 1)


def target_log_probs(const real[:, ::1] logits, const int[::1] targets,
                     double[::1] log_probs):
    """log_probs[r] = log softmax(logits[r])[targets[r]], in nats, stable;
    0 where targets[r] is IGNORE (-1).

    logits (N, V) unchanged; targets (N,); log_probs (N,) written.
    """
    cdef int N = logits.shape[0], V = logits.shape[1]
    cdef int r, k, bad = -1
    cdef double m, z
    cdef const real* row
    _require(targets.shape[0] == N and log_probs.shape[0] == N and V >= 1,
             "target_log_probs: shape mismatch")
    with nogil:
        for r in range(N):
            if targets[r] < IGNORE or targets[r] >= V:
                bad = r
                break
            if targets[r] == IGNORE:
                log_probs[r] = 0
                continue
            row = &logits[r, 0]
            m = row[0]
            for k in range(1, V):
                if row[k] > m:
                    m = row[k]
            z = 0
            for k in range(V):
                z += exp(row[k] - m)
            log_probs[r] = row[targets[r]] - m - log(z)
    _require(bad < 0, "target_log_probs: target out of range")


# ===========================================================================
# Sampling: one fused step per generated character
# ===========================================================================
#
# sample_steps draws `steps` characters for B streams without returning to
# Python. Each step is, per stream: feed the previous id through every layer
# (a row gather for layer 0, GEMMs for the rest, the cell's equations), the
# output layer, softmax with temperature, optional top-k and top-p filtering,
# and an inverse-CDF draw with a uniform supplied by the caller. Taking the
# uniforms as input keeps the randomness in numpy's Generator: the same seed
# gives the same text, however the steps are split into calls.
#
# The arithmetic repeats the training forward's exactly (same folded biases,
# same order of operations, same GEMM calls), so the probabilities agree with
# softmax(Model.next_logits) to round-off.

from libc.stdlib cimport malloc, free, qsort
from libc.math cimport isfinite

cdef enum:
    CELL_RNN_TANH = 0
    CELL_RNN_RELU = 1
    CELL_LSTM = 2
    CELL_GRU = 3
    CELL_LSTM_PEEPHOLE = 4

# cell name -> (code, gate rows per hidden unit)
_SAMPLING_CELLS = {"rnn": (CELL_RNN_TANH, 1), "rnn-relu": (CELL_RNN_RELU, 1),
                   "lstm": (CELL_LSTM, 4), "gru": (CELL_GRU, 3),
                   "lstm-peephole": (CELL_LSTM_PEEPHOLE, 4)}

# Top-p first sorts this many of the heaviest ids; if their mass falls short
# of p it selects four times as many, and so on. A peaked distribution (the
# usual case) then costs O(V), not a full O(V log V) sort.
cdef enum:
    NUCLEUS_FIRST_GUESS = 64


cdef struct Ranked:
    double weight
    int id


cdef inline bint _heavier(const Ranked* a, const Ranked* b) noexcept nogil:
    """The total order used for top-k and top-p: heavier first, ties by lower id.
    Ids are distinct, so no two entries compare equal and the result of a
    selection or sort does not depend on the algorithm."""
    return a.weight > b.weight or (a.weight == b.weight and a.id < b.id)


cdef int _heavier_first(const void* a, const void* b) noexcept nogil:
    return -1 if _heavier(<const Ranked*>a, <const Ranked*>b) else 1


cdef inline void _swap(Ranked* a, Ranked* b) noexcept nogil:
    cdef Ranked t = a[0]
    a[0] = b[0]
    b[0] = t


cdef void _select(Ranked* a, int n, int k) noexcept nogil:
    """Quickselect: reorder a[:n] so that a[k] is the entry a full sort would
    put there, with the k entries before it heavier. Median-of-three pivots;
    Lomuto partitions, which stay inside [lo, hi] whatever the values."""
    cdef int lo = 0, hi = n - 1, mid, store, i
    while hi > lo:
        mid = lo + (hi - lo) // 2
        # median of a[lo], a[mid], a[hi] into a[hi], as the pivot
        if _heavier(&a[mid], &a[lo]):
            _swap(&a[mid], &a[lo])
        if _heavier(&a[hi], &a[lo]):
            _swap(&a[hi], &a[lo])
        if _heavier(&a[mid], &a[hi]):
            _swap(&a[mid], &a[hi])
        store = lo
        for i in range(lo, hi):
            if _heavier(&a[i], &a[hi]):
                _swap(&a[i], &a[store])
                store += 1
        _swap(&a[store], &a[hi])
        if store == k:
            return
        if store < k:
            lo = store + 1
        else:
            hi = store - 1


cdef inline int _first_max(const real* x, int n) noexcept nogil:
    cdef int k, best = 0
    for k in range(1, n):
        if x[k] > x[best]:
            best = k
    return best


cdef void _softmax_weights(const real* logits, int V, double temperature,
                           double* weight) noexcept nogil:
    """weight = exp((logits - max) / temperature), unnormalised, in double.
    Subtracting the max before dividing keeps a tiny temperature finite (the
    max weighs exactly 1). NaN logits weigh 0, which keeps the order total."""
    cdef int k
    cdef double m = logits[_first_max(logits, V)], w
    for k in range(V):
        w = exp((<double>logits[k] - m) / temperature)
        weight[k] = w if w > 0 else 0


cdef void _keep_top_k(double* weight, int V, int top_k, Ranked* ranked) noexcept nogil:
    """Zero every weight below the top_k-th largest (ties with it are kept)."""
    cdef int k
    cdef double threshold
    for k in range(V):
        ranked[k].weight = weight[k]
        ranked[k].id = k
    _select(ranked, V, top_k - 1)
    threshold = ranked[top_k - 1].weight
    for k in range(V):
        if weight[k] < threshold:
            weight[k] = 0


cdef void _keep_nucleus(double* weight, int V, double top_p, Ranked* ranked) noexcept nogil:
    """Keep the heaviest ids, in order, while the mass before each is below
    top_p of the total: the smallest set whose mass reaches top_p."""
    cdef int k, n = 0, m, kept = 0
    cdef double total = 0, mass, before = 0
    for k in range(V):
        if weight[k] > 0:
            ranked[n].weight = weight[k]
            ranked[n].id = k
            total += weight[k]
            n += 1
    if n == 0:
        return
    mass = top_p * total
    m = NUCLEUS_FIRST_GUESS if n > NUCLEUS_FIRST_GUESS else n
    while True:
        # ranked[:m] = the m heaviest, sorted; the walk resumes where it stopped
        _select(ranked, n, m - 1)
        qsort(ranked, m, sizeof(Ranked), _heavier_first)
        while kept < m and before < mass:
            before += ranked[kept].weight
            kept += 1
        if before >= mass or m == n:
            break
        m = n if m > n // 4 else 4 * m
    for k in range(kept, n):
        weight[ranked[k].id] = 0


cdef int _inverse_cdf(const double* weight, int V, double u, double* probs) noexcept nogil:
    """The first id whose cumulative weight exceeds u * total (u in [0, 1)).
    Round-off can leave u * total at or past the end: then the last id with
    weight. probs (V,), if not NULL, receives the normalised weights."""
    cdef int k, chosen = -1, last = 0
    cdef double total = 0, target, cumulative = 0
    for k in range(V):
        total += weight[k]
    target = u * total
    for k in range(V):
        if weight[k] > 0:
            last = k
            cumulative += weight[k]
            if cumulative > target:
                chosen = k
                break
    if chosen < 0:
        chosen = last
    if probs != NULL:
        for k in range(V):
            probs[k] = weight[k] / total if total > 0 else 0
    return chosen


cdef int _pick(const real* logits, int V, double temperature, int top_k, double top_p,
               bint argmax, double u, double* weight, Ranked* ranked,
               double* probs) noexcept nogil:
    """One id from one row of logits (V,); weight and ranked are (V,) scratch."""
    cdef int chosen
    if argmax:
        chosen = _first_max(logits, V)
        if probs != NULL:
            memset(probs, 0, V * sizeof(double))
            probs[chosen] = 1
        return chosen
    _softmax_weights(logits, V, temperature, weight)
    if 0 < top_k < V:
        _keep_top_k(weight, V, top_k, ranked)
    if top_p < 1:
        _keep_nucleus(weight, V, top_p, ranked)
    return _inverse_cdf(weight, V, u, probs)


def sampler_stores_transposed(int rows, int cols, int itemsize):
    """True if sample_steps takes a (rows, cols) weight matrix (rows =
    outputs) as a (cols, rows) array; see OWN_GEMV_MAX_BYTES and
    sampler_layout."""
    return own_gemv_size(rows, cols, itemsize)


def sampler_layout(const real[:, ::1] W, int batch):
    """W (N outputs, K inputs) as sample_steps takes it for `batch` streams:
    W itself when large; else a (K, N) array, W.T laid out for the own GEMV
    with one stream, W.T itself with several (BLAS's GEMM)."""
    cdef int N = W.shape[0], K = W.shape[1]
    if not own_gemv_size(N, K, sizeof(real)):
        return np.asarray(W)
    if batch > 1:
        return aligned_copy(np.asarray(W).T)
    out = aligned_empty((K, N), np.float32 if real is float else np.float64)
    cdef real[:, ::1] laid_out = out
    with nogil:
        gemv_layout(K, N, &W[0, 0], &laid_out[0, 0])
    return out


cdef tuple _sampler_layout(int N, int K, size_t itemsize):
    """The shape sample_steps expects of a weight with N outputs, K inputs."""
    return (K, N) if own_gemv_size(N, K, itemsize) else (N, K)


cdef inline void times_weight(int B, int N, int K, const real* a, const real* W,
                              real* out) noexcept nogil:
    """out (B,N) += a (B,K) @ W.T for a sampler's weight (N outputs, K inputs),
    as sampler_layout gives it: (N,K) when large, else (K,N), laid out for
    the own GEMV when B == 1, else W.T (BLAS's GEMM); large ones go to BLAS
    (GEMV for one row, GEMM for several)."""
    if not own_gemv_size(N, K, sizeof(real)):
        gemm(False, True, B, N, K, 1, a, K, W, K, 1, out, N)
    elif B == 1:
        gemv(K, N, a, W, out)
    else:
        gemm(False, False, B, N, K, 1, a, K, W, N, 1, out, N)


cdef void _cell_step(int cell, int B, int H, real* gates, real* hh,
                     const real* W_hh, const real* b_hh, real* h, real* c,
                     const real* peep) noexcept nogil:
    """Advance one layer by one step, in place, for B streams.

    gates (B, G): in, the input projection (with both biases folded in; for
        the GRU, b_ih only); clobbered (the activated gates).
    W_hh (G, H), or an (H, G) array when small (see times_weight).
    b_hh (G,): read by the GRU only (the others have it folded).
    h, c (B, H): in, the previous state; out, the new one. Updating in place
        is safe: the GEMM has consumed h before, and unit j reads only h[j], c[j].
    hh (B, G): scratch: W_hh h + b_hh for the GRU, tanh(c_t) for the LSTM.
    peep (3H,): the peephole LSTM's weights; NULL for every other cell.
    Same equations, in the same order, as rnn/lstm/gru_forward; one short
    loop per equation, as there, so that gcc vectorises each.
    """
    cdef bint lstm = cell == CELL_LSTM or cell == CELL_LSTM_PEEPHOLE
    cdef int G = H * (4 if lstm else 3 if cell == CELL_GRU else 1)
    cdef int b, j
    cdef real* gate
    cdef real* hrow
    if cell == CELL_GRU:
        for b in range(B):
            memcpy(hh + <size_t>b * G, b_hh, G * sizeof(real))
        # hh = h @ W_hh.T + b_hh                   (B,3H) += (B,H) @ (H,3H)
        times_weight(B, G, H, h, W_hh, hh)
    else:
        # gates += h @ W_hh.T                      (B,G) += (B,H) @ (H,G)
        times_weight(B, G, H, h, W_hh, gates)
    for b in range(B):
        gate = gates + <size_t>b * G
        hrow = h + <size_t>b * H
        if lstm:
            # hh is free scratch for the LSTM: it takes tanh(c_t)
            lstm_units(H, gate, c + <size_t>b * H, c + <size_t>b * H, hh + <size_t>b * H, hrow,
                       peep)
        elif cell == CELL_GRU:
            gru_units(H, gate, hh + <size_t>b * G, hrow, hrow)
        elif cell == CELL_RNN_RELU:
            for j in range(H):
                hrow[j] = gate[j] if gate[j] > 0 else 0
        else:
            for j in range(H):
                hrow[j] = tanh_(gate[j])


cdef const real** _layer_pointers(tuple arrays, int count, int rows, int cols,
                                  str what, list keep, const real* dtype_tag) except NULL:
    """Pointers to the data of `count` contiguous arrays of shape (rows, cols)
    (cols 0: 1-D arrays of length rows), checked; their buffers are held in
    `keep` until the caller is done. dtype_tag only selects the specialisation."""
    cdef const real** pointers
    cdef const real[:, ::1] matrix
    cdef const real[::1] vector
    cdef int k
    _require(len(arrays) == count, f"sample_steps: {what} needs {count} arrays")
    pointers = <const real**>malloc((count if count > 0 else 1) * sizeof(void*))
    if pointers == NULL:
        raise MemoryError()
    try:
        for k in range(count):
            if cols:
                matrix = arrays[k]
                _require(matrix.shape[0] == rows and matrix.shape[1] == cols,
                         f"sample_steps: {what}[{k}] must be ({rows}, {cols})")
                pointers[k] = &matrix[0, 0]
                keep.append(matrix)
            else:
                vector = arrays[k]
                _require(vector.shape[0] == rows, f"sample_steps: {what}[{k}] must be ({rows},)")
                pointers[k] = &vector[0]
                keep.append(vector)
    except BaseException:
        free(pointers)
        raise
    return pointers


def sample_steps(str cell, const real[:, ::1] W_ihT, tuple W_ih, tuple W_hh,
                 tuple bias, tuple b_hh, const real[:, ::1] W_out, const real[::1] b_out,
                 real[:, :, ::1] h, real[:, :, ::1] c, const int[::1] prev_ids,
                 const double[:, ::1] uniforms, int[:, ::1] ids,
                 double temperature=1.0, int top_k=0, double top_p=1.0,
                 bint argmax=False, double[:, :, ::1] probs=None, tuple peep=None):
    """Draw `steps` ids for each of B streams, one fused step per character.

    Step s feeds ids[s-1] (prev_ids for s = 0) through the model and draws
    ids[s]; the last row drawn is not fed (pass it as prev_ids next time).

    cell: "lstm", "gru", "rnn" or "rnn-relu".  L layers, G gate rows.
    W_ihT (V, G): the first layer's input weights, transposed (rows gathered).
    W_ih: L-1 arrays (G, H), the upper layers' input weights.
    W_hh: L arrays (G, H).  bias: L arrays (G,), the projection biases
        (b_ih + b_hh; b_ih alone for the GRU).  b_hh: L arrays (G,), read by
        the GRU only.  W_out (V, H), b_out (V,).
    W_ih, W_hh and W_out come as sampler_layout(W, B) gives them: small
        matrices as (H, G) and (H, V) arrays, laid out for the own GEMV
        when B == 1 (see _gemv.h), transposed otherwise.
    h, c (L, B, H): the state, advanced in place. c is read only for the
        LSTM; for the other cells any array (e.g. an empty one) will do.
    prev_ids (B,) int32 in [0, V).
    uniforms (steps, B) float64 in [0, 1): the draws (ignored with argmax).
    ids (steps, B) int32 written.
    temperature > 0; top_k: keep the top_k most likely (0: all); top_p in
        (0, 1]: keep the smallest most likely set with that mass (1: all);
        argmax: take the most likely id (first of equals).
    probs (steps, B, V) float64, optional: receives each step's final
        (filtered, normalised) distribution; one-hot with argmax. For tests.
    peep: for "lstm-peephole", L arrays (3, H), the peephole weights.
    """
    cdef int L = h.shape[0], B = h.shape[1], H = h.shape[2], V = b_out.shape[0]
    cdef int steps = ids.shape[0], code, G, s, b, j, k, bad = -1
    cdef int rows, cols
    cdef list keep = []
    cdef const real** W_ih_p = NULL
    cdef const real** W_hh_p = NULL
    cdef const real** bias_p = NULL
    cdef const real** b_hh_p = NULL
    cdef const real** peep_p = NULL
    cdef bint lstm
    cdef real* gates = NULL
    cdef real* hh = NULL
    cdef real* logits = NULL
    cdef double* weight = NULL
    cdef Ranked* ranked = NULL
    cdef const int* feed
    cdef const real* row
    cdef const real* b0
    cdef real* g
    cdef real* c_base = NULL
    cdef double* probs_base = NULL

    _require(cell in _SAMPLING_CELLS, f"sample_steps: unknown cell {cell!r}")
    code, per_unit = _SAMPLING_CELLS[cell]
    G = per_unit * H
    lstm = code == CELL_LSTM or code == CELL_LSTM_PEEPHOLE
    _require(L >= 1 and B >= 1 and H >= 1 and V >= 1, "sample_steps: empty model or batch")
    _require(_shape(W_ihT, 2) == (V, G), f"sample_steps: W_ihT must be ({V}, {G})")
    out_shape = _sampler_layout(V, H, sizeof(real))
    _require(_shape(W_out, 2) == out_shape, f"sample_steps: W_out must be {out_shape}")
    _require(not lstm or _shape(c, 3) == (L, B, H), "sample_steps: c must be (L, B, H)")
    _require(prev_ids.shape[0] == B, "sample_steps: prev_ids must be (B,)")
    _require(_shape(uniforms, 2) == (steps, B) and ids.shape[1] == B,
             "sample_steps: uniforms and ids must be (steps, B)")
    _require(probs is None or _shape(probs, 3) == (steps, B, V),
             "sample_steps: probs must be (steps, B, V)")
    _require(isfinite(temperature) and temperature > 0, "sample_steps: temperature must be > 0")
    _require(top_k >= 0 and 0 < top_p <= 1, "sample_steps: top_k must be >= 0, top_p in (0, 1]")
    for b in range(B):
        if prev_ids[b] < 0 or prev_ids[b] >= V:
            bad = b
    _require(bad < 0, "sample_steps: prev id out of range")
    if steps == 0:
        return
    if lstm:
        c_base = &c[0, 0, 0]
    if probs is not None:
        probs_base = &probs[0, 0, 0]
    try:
        rows, cols = _sampler_layout(G, H, sizeof(real))
        W_ih_p = _layer_pointers(W_ih, L - 1, rows, cols, "W_ih", keep, &W_ihT[0, 0])
        W_hh_p = _layer_pointers(W_hh, L, rows, cols, "W_hh", keep, &W_ihT[0, 0])
        bias_p = _layer_pointers(bias, L, G, 0, "bias", keep, &W_ihT[0, 0])
        b_hh_p = _layer_pointers(b_hh, L, G, 0, "b_hh", keep, &W_ihT[0, 0])
        if code == CELL_LSTM_PEEPHOLE:
            peep_p = _layer_pointers(peep or (), L, 3, H, "peep", keep, &W_ihT[0, 0])
        # All scratch, once per call: nothing is allocated per character.
        gates = <real*>charlm_alloc_lines(<size_t>B * G * sizeof(real))
        hh = <real*>charlm_alloc_lines(<size_t>B * G * sizeof(real))
        logits = <real*>charlm_alloc_lines(<size_t>B * V * sizeof(real))
        weight = <double*>malloc(<size_t>V * sizeof(double))
        ranked = <Ranked*>malloc(<size_t>V * sizeof(Ranked))
        if not (gates and hh and logits and weight and ranked):
            raise MemoryError()
        b0 = bias_p[0]
        with nogil:
            for s in range(steps):
                feed = &prev_ids[0] if s == 0 else &ids[s - 1, 0]
                # layer 0: gates = W_ihT[id] + bias, a row gather
                for b in range(B):
                    row = &W_ihT[feed[b], 0]
                    g = gates + <size_t>b * G
                    for j in range(G):
                        g[j] = row[j] + b0[j]
                _cell_step(code, B, H, gates, hh, W_hh_p[0], b_hh_p[0], &h[0, 0, 0], c_base,
                           peep_p[0] if peep_p != NULL else NULL)
                for k in range(1, L):
                    for b in range(B):
                        memcpy(gates + <size_t>b * G, bias_p[k], G * sizeof(real))
                    # gates += h[k-1] @ W_ih.T      (B,G) += (B,H) @ (H,G)
                    times_weight(B, G, H, &h[k - 1, 0, 0], W_ih_p[k - 1], gates)
                    _cell_step(code, B, H, gates, hh, W_hh_p[k], b_hh_p[k], &h[k, 0, 0],
                               c_base + <size_t>k * B * H if c_base != NULL else NULL,
                               peep_p[k] if peep_p != NULL else NULL)
                # logits = h_top @ W_out.T + b_out  (B,V) += (B,H) @ (H,V)
                for b in range(B):
                    memcpy(logits + <size_t>b * V, &b_out[0], V * sizeof(real))
                times_weight(B, V, H, &h[L - 1, 0, 0], &W_out[0, 0], logits)
                for b in range(B):
                    ids[s, b] = _pick(logits + <size_t>b * V, V, temperature, top_k, top_p,
                                      argmax, uniforms[s, b], weight, ranked,
                                      probs_base + (<size_t>s * B + b) * V
                                      if probs_base != NULL else NULL)
    finally:
        free(W_ih_p)
        free(W_hh_p)
        free(bias_p)
        free(b_hh_p)
        free(peep_p)
        charlm_free_lines(gates)
        charlm_free_lines(hh)
        charlm_free_lines(logits)
        free(weight)
        free(ranked)


# ---------------------------------------------------------------------------
# One stream sampled by a team of threads
# ---------------------------------------------------------------------------
#
# At batch 1 a character is one matrix-vector product per weight matrix, all
# bound by reading the weights (a 2x128 GRU reads 620 KB per character, from
# one core's L2). As in single-stream evaluation (_team.h), each thread of a
# team owns a share of every layer's units with their gates: its rows of
# W_ih and W_hh, laid out for the own GEMV, its columns of the first layer's
# input rows and its slice of the biases, held in its own core's cache. A
# character takes one pass of the team per layer (_team.h's claimed shares,
# with a wait at the end of each pass), every share updating its units; share
# 0 draws it (output layer, softmax, draw) at the start of the next
# character's first pass, where the other shares wait for the id. The state is
# double-buffered (character s reads buffer s % 2 and writes the other), as a
# share must not overwrite units another is still reading. Every output is
# summed in the same order as sample_steps's (the own GEMV, k in order), so
# the ids are the same, to the last bit, as long as sample_steps multiplies
# by its own GEMV too (matrices up to OWN_GEMV_MAX_BYTES).
#
# A large model's shares do not fit a core's L2 (a 2x512 GRU: 4.7 MB per
# share of two, against 2 MB of L2 on the Intel Xeon): each character streams
# them from L3, which gives one core ~29 GB/s however the loads are
# prefetched (C harness). A cache that keeps the most recently used lines
# keeps none of a stream larger than itself read in the same order at every
# character; read in the opposite order (and each matrix in the opposite
# direction) the next character starts with what the last one read last,
# still in L2. A layer's W_hh h_{t-1} needs only h_{t-1}, so it can be done
# ahead, as soon as h_{t-1} is complete (_team_layer_ahead), and the products
# of a 2-layer model then fall in mirrored orders (W_hh0 is layer 0's, W_ih1
# layer 1's):
#   even characters:  pass 0: W_hh1 (this character's) | pass 1: W_ih1, W_hh0 (the next's)
#   odd characters:   pass 0: -                       | pass 1: W_hh0 (the next's), W_ih1, W_hh1
# (with more layers only every other character's boundary mirrors). The
# GRU's W_hh h + b_hh is a term of its own, summed as by one thread; the
# LSTM's and RNN's W_hh h then is a sum of its own too, added to bias + W_ih x
# (one thread sums it onto them: round-off apart, the same). 2 threads, Intel
# Xeon, 2026-12-06, characters/s: 2x512 GRU 5,750 -> 7,900-8,000, 2x512 LSTM
# 4,315 -> 5,535, 2x384 LSTM 7,950 -> 12,800.
# The odd characters read every matrix in reverse, row by row from the last
# (CHARLM_GEMV_REVERSED): taking only the strips in reverse order, each still
# from its first row, lost the strip that was only partly in L2 at the
# boundary (its first rows' misses evicted its last rows, the oldest lines
# there). Each sum then runs from its last term to its first on odd
# characters: round-off from one thread for every cell, the GRU's too, but
# the same sums however many threads share the units, and, as the orders
# alternate with the stream's characters, however the stream is cut into
# calls. 2x512 GRU 120.1 -> 116.9 us per character, 2x512 LSTM 176.5 ->
# 172.9 (medians of 4 alternations of 1,024-character calls). A small
# model's shares sit in L2 whatever the order, and on odd characters the
# other shares would no longer have a product to do while share 0 draws:
# 2x128 GRU 3% slower. So the mirrored orders are for shares of more than
# STREAMED_SHARE_BYTES of weights (the GRU's smaller teams still do W_hh
# ahead, in one order: the same sums, and its shares' W_hh product still
# overlaps the draw).
#
# Such shares have W_out evicted too by the next character's draw, and share 0
# read it alone from L3 (133 KB for 65 characters and 512 units: 4.6 us of a
# 2x512 GRU's ~126 us per character) while the others waited for the id. With
# a split output each share adds its units' part of the logits, W_out[:, its
# units] @ h_top[its units], as soon as it has updated them, and share 0 sums
# the parts for the draw (the logits then differ from one thread's by
# round-off: their sums are cut in two). Small models keep the one sum, the
# same as one thread's, to the last bit, unless W_out itself is large (a
# large vocabulary): past SPLIT_OUTPUT_MIN_BYTES of it the parts pay even
# when everything fits L2. 2x128 LSTM, 2 threads, characters/s (Intel Xeon,
# 2026-12-06): V = 200 (100 KB) 144k either way; V = 500 (256 KB) 92.8k ->
# 99.1k; V = 1000 60.0k -> 65.4k; V = 3000 (1.5 MB) 17.0k -> 26.8k.
DEF STREAMED_SHARE_BYTES = 1 << 20
DEF SPLIT_OUTPUT_MIN_BYTES = 128 << 10

cdef extern from "_team.h":
    ctypedef void (*charlm_team_task)(void* job, int share, int t) noexcept nogil
    void charlm_team_run(int shares, int steps, charlm_team_task task,
                         void* job) noexcept nogil
    long charlm_team_solos
    void charlm_publish(int* flag, int value) noexcept nogil
    void charlm_await(int* flag, int value) noexcept nogil
    int charlm_team_split(int H, int shares, int itemsize, int* u0, int* n) noexcept nogil


cdef enum:
    SAMPLER_TEAM_MAX = 4       # CHARLM_TEAM_MAX


cdef struct SamplerShare:
    int u0, n                  # units [u0, u0 + n)
    const void* W_ihT          # (V, width): the first layer's input rows, its columns
    const void** W_ih          # L - 1 of (H, width), laid out for gemv
    const void** W_hh          # L of (H, width), laid out for gemv
    const void** bias          # L of (width,)
    const void** b_hh          # L of (width,) (the GRU's)
    const void** peep          # L of (3, n), or NULL
    const void* W_out          # (n, V): its units' columns of W_out, laid out for gemv
    void* logits               # (V,): their part of the logits (split output)
    void* gates                # (width,) scratch
    void* hh                   # (L, width): W_hh h_{t-1} done ahead, layer by layer
    void* scratch              # (width,): the LSTM's tanh(c)


cdef struct TeamSampling:
    int cell, L, H, V, blocks, shares, steps
    bint mirrored              # the products in mirrored orders (see above)
    bint first_odd             # character 0 of the call is an odd one of the stream
    bint split_output          # the logits summed from the shares' parts (see above)
    void* h                    # (2, L, H): the state, double-buffered
    void* c                    # (L, H), the LSTM's cell state (unit by unit: in place)
    const void* W_out          # as sampler_layout gives it for one stream
    const void* b_out
    void* logits               # (V,)
    int first_id               # fed at step 0
    int* drawn                 # characters drawn so far (published by share 0;
                               # a line of its own)
    int* ids                   # (steps,) written
    const double* uniforms     # (steps,)
    double* probs              # (steps, V) or NULL
    double temperature, top_p
    int top_k
    bint argmax
    double* weight             # (V,) scratch
    Ranked* ranked             # (V,) scratch
    SamplerShare share[SAMPLER_TEAM_MAX]


cdef inline real* _team_ahead(real* tag, TeamSampling* job, SamplerShare* sh,
                              int layer) noexcept nogil:
    """The share's W_hh h_{t-1} of a layer, computed ahead of the layer
    (_team_recurrent), (width,): one buffer per layer."""
    return <real*>sh.hh + <size_t>layer * job.blocks * sh.n


cdef inline void _team_recurrent(real* tag, TeamSampling* job, SamplerShare* sh, int layer,
                                 const real* h_prev, bint backwards) noexcept nogil:
    """ahead = W_hh h_prev for the share's units of a layer  (width,), plus
    b_hh for the GRU (whose W_hh h + b_hh is a term of its own, as one thread
    sums it); the matrix read in reverse when `backwards`."""
    cdef int width = job.blocks * sh.n
    cdef real* ahead = _team_ahead(tag, job, sh, layer)
    if job.cell == CELL_GRU:
        memcpy(ahead, sh.b_hh[layer], width * sizeof(real))
    else:
        memset(ahead, 0, width * sizeof(real))
    gemv_dir(job.H, width, h_prev, <const real*>sh.W_hh[layer], ahead,
             CHARLM_GEMV_REVERSED if backwards else CHARLM_GEMV_FORWARDS)


cdef inline void _team_output_part(real* tag, TeamSampling* job, SamplerShare* sh,
                                   const real* h_top) noexcept nogil:
    """The share's part of the logits: W_out[:, units] @ h_top[units]   (V,)."""
    memset(sh.logits, 0, job.V * sizeof(real))
    gemv(sh.n, job.V, h_top + sh.u0, <const real*>sh.W_out, <real*>sh.logits)


cdef inline void _team_first_input(real* tag, TeamSampling* job, SamplerShare* sh, int s,
                                   real* gates, const real* bias) noexcept nogil:
    """gates = W_ihT[id] + bias for the share's gate rows of layer 0, a row
    gather of character s's input, once share 0 has drawn it."""
    cdef int width = job.blocks * sh.n, j, feed
    cdef const real* row
    if s > 0:
        charlm_await(job.drawn, s)
    feed = job.first_id if s == 0 else job.ids[s - 1]
    row = <const real*>sh.W_ihT + <size_t>feed * width
    for j in range(width):
        gates[j] = row[j] + bias[j]


cdef void _team_layer_ahead(real* tag, TeamSampling* job, int share, int s,
                            int layer) noexcept nogil:
    """Layer `layer` of character s, for one share's units, with each W_hh
    product done ahead, right after the state it multiplies is complete (see
    above): the GRU's always (the same sums as one thread); the LSTM's and
    RNN's when the orders mirror, as a sum of its own then added to the
    input product's (round-off apart, the same)."""
    cdef SamplerShare* sh = &job.share[share]
    cdef int L = job.L, H = job.H, n = sh.n, u0 = sh.u0, width = job.blocks * sh.n, j
    cdef int top = L - 1
    cdef real* h_old = <real*>job.h + <size_t>(s & 1) * L * H       # (L, H): s - 1
    cdef real* h_new = <real*>job.h + <size_t>((s + 1) & 1) * L * H  # (L, H): s
    cdef real* gates = <real*>sh.gates
    cdef real* ahead = _team_ahead(tag, job, sh, layer)
    cdef const real* bias = <const real*>sh.bias[layer]
    # this character's order, and the last one's (a product done ahead at a
    # call's first character is read as it would have been the character
    # before: the same sums however the stream is cut into calls)
    cdef bint backwards = job.mirrored and (s + job.first_odd) & 1
    cdef bint backwards_before = job.mirrored and not backwards
    if layer == 0:
        # ahead_0 of this character: in the last's pass 1, but for the first
        # character (or with one layer); the top layer's here every other one
        if L == 1:
            _team_recurrent(tag, job, sh, 0, h_old, backwards)
        elif s == 0:
            _team_recurrent(tag, job, sh, 0, h_old, backwards_before)
        if L > 1 and not backwards:
            _team_recurrent(tag, job, sh, top, h_old + <size_t>top * H, backwards)
        _team_first_input(tag, job, sh, s, gates, bias)
    else:
        # h_below (this character's) is complete: the next character's W_hh
        # product of the layer below, around this one's input product
        if backwards:
            _team_recurrent(tag, job, sh, layer - 1, h_new + <size_t>(layer - 1) * H, backwards)
        # gates = bias + W_ih h_below
        memcpy(gates, bias, width * sizeof(real))
        gemv_dir(H, width, h_new + <size_t>(layer - 1) * H, <const real*>sh.W_ih[layer - 1],
                 gates, CHARLM_GEMV_REVERSED if backwards else CHARLM_GEMV_FORWARDS)
        if not backwards:
            _team_recurrent(tag, job, sh, layer - 1, h_new + <size_t>(layer - 1) * H, backwards)
        if s == 0 and layer < top:
            _team_recurrent(tag, job, sh, layer, h_old + <size_t>layer * H, backwards_before)
        if layer == top and backwards:
            _team_recurrent(tag, job, sh, top, h_old + <size_t>top * H, backwards)
    if job.cell == CELL_GRU:
        gru_units(n, gates, ahead, h_old + <size_t>layer * H + u0,
                  h_new + <size_t>layer * H + u0)
    else:
        for j in range(width):          # gates += W_hh h_{t-1}
            gates[j] += ahead[j]
        _team_units(tag, job, sh, layer, gates, h_new + <size_t>layer * H)


cdef inline void _team_units(real* tag, TeamSampling* job, SamplerShare* sh, int layer,
                             real* gates, real* h_new) noexcept nogil:
    """The LSTM's or RNN's units of the share from their pre-activations:
    writes its units of h_new (H,), a layer's row, and of the LSTM's c."""
    cdef int n = sh.n, u0 = sh.u0, j
    cdef real* c
    if job.cell == CELL_LSTM or job.cell == CELL_LSTM_PEEPHOLE:
        c = <real*>job.c + <size_t>layer * job.H + u0
        lstm_units(n, gates, c, c, <real*>sh.scratch, h_new + u0,
                   <const real*>sh.peep[layer] if sh.peep != NULL else NULL)
    elif job.cell == CELL_RNN_RELU:
        for j in range(n):
            h_new[u0 + j] = gates[j] if gates[j] > 0 else 0
    else:
        for j in range(n):
            h_new[u0 + j] = tanh_(gates[j])


cdef void _team_layer(real* tag, TeamSampling* job, int share, int s, int layer) noexcept nogil:
    """Layer `layer` of character s, for one share's units: the LSTM and RNN
    of a small model, W_hh h summed onto W_ih x + bias in the one thread's
    order (the training forward's), so that the sums are the same."""
    cdef SamplerShare* sh = &job.share[share]
    cdef int L = job.L, H = job.H, width = job.blocks * sh.n
    cdef real* h_old = <real*>job.h + (<size_t>(s & 1) * L + layer) * H
    cdef real* h_new = <real*>job.h + (<size_t>((s + 1) & 1) * L + layer) * H
    cdef real* gates = <real*>sh.gates
    cdef const real* bias = <const real*>sh.bias[layer]
    if layer == 0:
        _team_first_input(tag, job, sh, s, gates, bias)
    else:
        # gates = bias + W_ih h_below, h_below this character's (written the pass before)
        memcpy(gates, bias, width * sizeof(real))
        gemv(H, width, h_new - H, <const real*>sh.W_ih[layer - 1], gates)
    # gates += W_hh h
    gemv(H, width, h_old, <const real*>sh.W_hh[layer], gates)
    _team_units(tag, job, sh, layer, gates, h_new)


cdef inline real* _team_h_top(real* tag, TeamSampling* job, int s) noexcept nogil:
    """The top layer's h after character s  (H,), in buffer (s + 1) % 2."""
    return <real*>job.h + (<size_t>((s + 1) & 1) * job.L + job.L - 1) * job.H


cdef void _team_draw(real* tag, TeamSampling* job, int s) noexcept nogil:
    """The output layer and the draw of character s."""
    cdef int V = job.V, m, k
    cdef real* logits = <real*>job.logits
    cdef const real* part
    memcpy(logits, job.b_out, V * sizeof(real))
    if job.split_output:
        # logits = b_out + the shares' parts, in order
        for m in range(job.shares):
            part = <const real*>job.share[m].logits
            for k in range(V):
                logits[k] += part[k]
    else:
        # logits = h_top @ W_out.T + b_out       (V,) += (H,) @ (H,V)
        times_weight(1, V, job.H, _team_h_top(tag, job, s),
                     <const real*>job.W_out, logits)
    job.ids[s] = _pick(logits, V, job.temperature, job.top_k, job.top_p, job.argmax,
                       job.uniforms[s], job.weight, job.ranked,
                       job.probs + <size_t>s * V if job.probs != NULL else NULL)
    charlm_publish(job.drawn, s + 1)


cdef inline void _team_sample_task(real* tag, void* arg, int share, int t) noexcept nogil:
    """Pass t: layer t % L of character t // L; the last pass draws the last
    character. Share 0 draws character s - 1 at the start of character s's
    first layer: the other shares wait for the id there (the GRU's after its
    W_hh h, which does not need it), not for a pass of their own."""
    cdef TeamSampling* job = <TeamSampling*>arg
    cdef int L = job.L, s, p
    if t < 0:                   # nothing to prepare: the shares come laid out
        return
    s = t // L
    p = t - s * L
    if share == 0 and p == 0 and s > 0:
        _team_draw(tag, job, s - 1)
    if s < job.steps:
        if job.cell == CELL_GRU or job.mirrored:
            _team_layer_ahead(tag, job, share, s, p)
        else:
            _team_layer(tag, job, share, s, p)
        if p == L - 1 and job.split_output:
            _team_output_part(tag, job, &job.share[share], _team_h_top(tag, job, s))


cdef void _team_sample_task_f(void* job, int share, int t) noexcept nogil:
    _team_sample_task(<float*>NULL, job, share, t)


cdef void _team_sample_task_d(void* job, int share, int t) noexcept nogil:
    _team_sample_task(<double*>NULL, job, share, t)


def unit_shares(int H, int threads, int itemsize):
    """How a team of `threads` splits H units, as the recurrences' team does
    (charlm_team_split): (u0, n) per share; [] if some would be empty."""
    cdef int u0[SAMPLER_TEAM_MAX]
    cdef int n[SAMPLER_TEAM_MAX]
    _require(1 <= threads <= SAMPLER_TEAM_MAX and itemsize in (4, 8),
             f"unit_shares: 1 to {SAMPLER_TEAM_MAX} threads, items of 4 or 8 bytes")
    if charlm_team_split(H, threads, itemsize, u0, n) != 0:
        return []
    return [(u0[m], n[m]) for m in range(threads)]


def gemv_layout_of(const real[:, ::1] W):
    """W (N outputs, K inputs) as the own GEMV reads it: W.T laid out in
    strips, a (K, N) array."""
    cdef int N = W.shape[0], K = W.shape[1]
    out = aligned_empty((K, N), np.float32 if real is float else np.float64)
    cdef real[:, ::1] laid_out = out
    with nogil:
        gemv_layout(K, N, &W[0, 0], &laid_out[0, 0])
    return out


def gemv_strip_widths(int N, int itemsize):
    """The widths of the strips the own GEMV cuts N columns of `itemsize`
    bytes into (for the tests)."""
    cdef int strip = CHARLM_GEMV_STRIP_F if itemsize == 4 else CHARLM_GEMV_STRIP_D
    cdef int lanes = CHARLM_VBYTES // itemsize, n0 = 0, width
    widths = []
    while True:
        width = charlm_gemv_strip_width(N, n0, strip, lanes)
        if width == 0:
            return widths
        widths.append(width)
        n0 += width


GEMV_ORDERS = {"forwards": CHARLM_GEMV_FORWARDS,
               "strips backwards": CHARLM_GEMV_STRIPS_BACKWARDS,
               "reversed": CHARLM_GEMV_REVERSED}


def gemv_laid_out(const real[::1] x, const real[:, ::1] laid_out, real[::1] y,
                  str order="forwards"):
    """y += x @ W.T, laid_out = gemv_layout_of(W) (K, N), read in `order`, a
    key of GEMV_ORDERS (for the tests)."""
    cdef int direction = GEMV_ORDERS[order]
    cdef int K = laid_out.shape[0], N = laid_out.shape[1]
    _require(x.shape[0] == K and y.shape[0] == N, "gemv_laid_out: shape mismatch")
    with nogil:
        gemv_dir(K, N, &x[0], &laid_out[0, 0], &y[0], direction)


cdef const real* _checked(object array, int rows, int cols, str what, list keep,
                         const real* tag) except? NULL:
    """The data of a contiguous (rows, cols) array (cols 0: (rows,)), checked;
    its buffer is held in `keep`. tag only selects the specialisation."""
    cdef const real[:, ::1] matrix
    cdef const real[::1] vector
    if cols:
        matrix = array
        _require(matrix.shape[0] == rows and matrix.shape[1] == cols,
                 f"sample_steps_team: {what} must be ({rows}, {cols})")
        keep.append(matrix)
        return &matrix[0, 0]
    vector = array
    _require(vector.shape[0] == rows, f"sample_steps_team: {what} must be ({rows},)")
    keep.append(vector)
    return &vector[0]


cdef void _share_pointers(SamplerShare* sh, tuple parts, int start, int L, int blocks,
                          int V, int H, bint peephole, list keep,
                          const real* tag) except *:
    """Fill sh from one share's parts (u0, n, W_ihT, W_ih, W_hh, bias, b_hh,
    peep, W_out; see sample_steps_team), checked; start: where the previous
    share ended. Allocates sh.W_ih (all the pointer tables) and the scratch,
    which the caller frees."""
    cdef int n, width, k
    _require(len(parts) == 9, "sample_steps_team: a share has 9 parts")
    u0, n, W_ihT, W_ih, W_hh, bias, b_hh, peep, W_out = parts
    _require(u0 == start and n >= 1 and u0 + n <= H,
             "sample_steps_team: the shares must cover the units in order")
    _require(len(W_ih) == L - 1 and len(W_hh) == L and len(bias) == L and len(b_hh) == L
             and (not peephole or len(peep) == L), "sample_steps_team: one array per layer")
    width = blocks * n
    sh.u0, sh.n = u0, n
    # on lines of their own: the other members write theirs (charlm_alloc_lines)
    sh.W_ih = <const void**>charlm_alloc_lines(5 * L * sizeof(void*))
    sh.gates = charlm_alloc_lines((2 + <size_t>L) * width * sizeof(real))
    sh.logits = charlm_alloc_lines(V * sizeof(real))
    if sh.W_ih == NULL or sh.gates == NULL or sh.logits == NULL:
        raise MemoryError()
    sh.hh = <real*>sh.gates + width
    sh.scratch = <real*>sh.hh + <size_t>L * width
    sh.W_hh, sh.bias, sh.b_hh = sh.W_ih + L, sh.W_ih + 2 * L, sh.W_ih + 3 * L
    sh.peep = sh.W_ih + 4 * L if peephole else NULL
    sh.W_ihT = _checked(W_ihT, V, width, "W_ihT", keep, tag)
    sh.W_out = _checked(W_out, n, V, "W_out", keep, tag)
    for k in range(L):
        if k > 0:
            sh.W_ih[k - 1] = _checked(W_ih[k - 1], H, width, "W_ih", keep, tag)
        sh.W_hh[k] = _checked(W_hh[k], H, width, "W_hh", keep, tag)
        sh.bias[k] = _checked(bias[k], width, 0, "bias", keep, tag)
        sh.b_hh[k] = _checked(b_hh[k], width, 0, "b_hh", keep, tag)
        if peephole:
            sh.peep[k] = _checked(peep[k], 3, n, "peep", keep, tag)


def team_streams(int H, int L, int blocks, int n, int itemsize):
    """Whether a team's shares stream their weights from L3 at every
    character (so that the team takes the mirrored orders and splits the
    output layer; see above): when the first share, n of the H
    units of each of L layers with `blocks` gate rows per unit, holds more
    than STREAMED_SHARE_BYTES of weight matrices."""
    return (2 * L - 1) * <size_t>H * blocks * n * itemsize > STREAMED_SHARE_BYTES


def team_splits_output(int V, int H, bint streams, int itemsize):
    """Whether a team sums the logits from its shares' parts (see above):
    when its shares stream, or W_out (V, H) holds more than
    SPLIT_OUTPUT_MIN_BYTES."""
    return streams or <size_t>V * H * itemsize > SPLIT_OUTPUT_MIN_BYTES


def sample_steps_team(str cell, list shares, const real[:, ::1] W_out,
                      const real[::1] b_out, real[:, :, ::1] h, real[:, :, ::1] c,
                      const int[::1] prev_ids, const double[:, ::1] uniforms,
                      int[:, ::1] ids, double temperature=1.0, int top_k=0,
                      double top_p=1.0, bint argmax=False, double[:, :, ::1] probs=None,
                      mirrored=None, split_output=None, bint first_odd=False):
    """sample_steps for one stream on a team of len(shares) threads (see above).

    shares: per thread, (u0, n, W_ihT, W_ih, W_hh, bias, b_hh, peep, W_out):
    its units [u0, u0 + n) and, for its width = gates-per-unit * n gate rows
    (each gate block's rows of those units, block by block), the first
    layer's input rows (V, width), the upper layers' W_ih and every layer's
    W_hh rows laid out by gemv_layout_of ((H, width) each), the biases'
    slices (width,), for "lstm-peephole" the peephole weights (3, n), and
    its units' columns of the output weights, W_out[:, u0:u0 + n] laid out
    by gemv_layout_of ((n, V)).
    The rest as for sample_steps, with B = 1. mirrored: whether the
    products go in mirrored orders (round-off apart, the same sums);
    split_output: whether the logits are summed from the shares' parts
    (round-off apart, the same);
    None: when the shares stream (team_streams), and for split_output also
    when W_out is large (team_splits_output). first_odd: prev_ids is the
    stream's character of odd index (counting from 0) since the orders began
    to alternate; mirrored orders alternate with the stream's characters, not
    the call's, so that how a stream is cut into calls changes no sum.
    """
    cdef int L = h.shape[0], H = h.shape[2], V = b_out.shape[0]
    cdef int steps = ids.shape[0], code, per_unit, S = len(shares), k, start = 0
    cdef bint lstm, streams
    cdef TeamSampling* job = NULL
    cdef list keep = []
    cdef real* state = NULL
    cdef size_t h_bytes, c_bytes
    _require(cell in _SAMPLING_CELLS, f"sample_steps_team: unknown cell {cell!r}")
    code, per_unit = _SAMPLING_CELLS[cell]
    lstm = code == CELL_LSTM or code == CELL_LSTM_PEEPHOLE
    _require(1 <= S <= SAMPLER_TEAM_MAX, f"sample_steps_team: 1 to {SAMPLER_TEAM_MAX} shares")
    _require(L >= 1 and h.shape[1] == 1 and H >= 1 and V >= 1,
             "sample_steps_team: h must be (L, 1, H)")
    out_shape = _sampler_layout(V, H, sizeof(real))
    _require(_shape(W_out, 2) == out_shape, f"sample_steps_team: W_out must be {out_shape}")
    _require(not lstm or _shape(c, 3) == (L, 1, H), "sample_steps_team: c must be (L, 1, H)")
    _require(prev_ids.shape[0] == 1 and 0 <= prev_ids[0] < V,
             "sample_steps_team: prev_ids must be one id in range")
    _require(_shape(uniforms, 2) == (steps, 1) and ids.shape[1] == 1,
             "sample_steps_team: uniforms and ids must be (steps, 1)")
    _require(probs is None or _shape(probs, 3) == (steps, 1, V),
             "sample_steps_team: probs must be (steps, 1, V)")
    _require(isfinite(temperature) and temperature > 0,
             "sample_steps_team: temperature must be > 0")
    _require(top_k >= 0 and 0 < top_p <= 1,
             "sample_steps_team: top_k must be >= 0, top_p in (0, 1]")
    if steps == 0:
        return
    # read by every member at every step: on lines of its own, away from
    # the caller's stack, which the caller writes as it plays its share
    job = <TeamSampling*>charlm_alloc_lines(sizeof(TeamSampling))
    if job == NULL:
        raise MemoryError()
    memset(job, 0, sizeof(TeamSampling))
    job.cell, job.L, job.H, job.V, job.blocks, job.shares = code, L, H, V, per_unit, S
    job.steps = steps
    job.first_odd = first_odd
    try:
        for k in range(S):
            _share_pointers(&job.share[k], shares[k], start, L, per_unit, V, H,
                            code == CELL_LSTM_PEEPHOLE, keep, &W_out[0, 0])
            start += job.share[k].n
        _require(start == H, "sample_steps_team: the shares must cover the units")
        streams = team_streams(H, L, per_unit, job.share[0].n, sizeof(real))
        job.mirrored = streams if mirrored is None else mirrored
        job.split_output = (team_splits_output(V, H, streams, sizeof(real))
                            if split_output is None else split_output)
        # h's two buffers, the LSTM's c, then the logits (share 0's), each
        # from a line of its own: the members write h and c unit by unit
        h_bytes = charlm_whole_lines(2 * <size_t>L * H * sizeof(real))
        c_bytes = charlm_whole_lines(<size_t>L * H * sizeof(real)) if lstm else 0
        state = <real*>charlm_alloc_lines(h_bytes + c_bytes + V * sizeof(real))
        job.drawn = <int*>charlm_alloc_lines(sizeof(int))
        job.weight = <double*>malloc(<size_t>V * sizeof(double))
        job.ranked = <Ranked*>malloc(<size_t>V * sizeof(Ranked))
        if not (state and job.drawn and job.weight and job.ranked):
            raise MemoryError()
        job.drawn[0] = 0
        memcpy(state, &h[0, 0, 0], <size_t>L * H * sizeof(real))
        job.h, job.logits = state, <real*>(<char*>state + h_bytes + c_bytes)
        job.c = <real*>(<char*>state + h_bytes) if lstm else NULL
        if lstm:
            memcpy(job.c, &c[0, 0, 0], <size_t>L * H * sizeof(real))
        job.W_out, job.b_out = &W_out[0, 0], &b_out[0]
        job.first_id, job.ids, job.uniforms = prev_ids[0], &ids[0, 0], &uniforms[0, 0]
        job.probs = &probs[0, 0, 0] if probs is not None else NULL
        job.temperature, job.top_p, job.top_k, job.argmax = temperature, top_p, top_k, argmax
        with nogil:
            charlm_team_run(S, steps * L + 1,
                            _team_sample_task_f if real is float else _team_sample_task_d,
                            job)
            # the state after the last character is in buffer steps % 2
            memcpy(&h[0, 0, 0], state + (<size_t>(steps & 1)) * L * H,
                   <size_t>L * H * sizeof(real))
            if lstm:
                memcpy(&c[0, 0, 0], job.c, <size_t>L * H * sizeof(real))
    finally:
        for k in range(S):
            charlm_free_lines(job.share[k].W_ih)
            charlm_free_lines(job.share[k].gates)
            charlm_free_lines(job.share[k].logits)
        charlm_free_lines(state)
        charlm_free_lines(job.drawn)
        free(job.weight)
        free(job.ranked)
        charlm_free_lines(job)


# ===========================================================================
# Optimiser updates: one fused pass per parameter
# ===========================================================================
#
# The optimisers (charlm.optim) own the hyper-parameters, the state and the
# checkpoints; these kernels do their per-element arithmetic. Written with
# numpy ufuncs, Adam made eight passes over every parameter and its state,
# and it runs once per step on the calling thread while the other workers
# wait: a few percent of a small model's training time. Here each element is
# read and written once. Scalars arrive as Python floats and are rounded to
# the parameter's dtype once, as numpy does with them.

from libc.math cimport sqrt, sqrtf


cdef inline real sqrt_(real x) noexcept nogil:
    if real is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef void _check_same_length(tuple arrays) except *:
    n = arrays[0].shape[0]
    _require(all(a.shape[0] == n for a in arrays), "optimiser arrays differ in length")


def adam_update(real[::1] p, const real[::1] g, real[::1] m, real[::1] v,
                double beta1, double beta2, double eps, double step_size,
                double inv_sqrt_bc2, double decay):
    """One Adam(W) step on a flat parameter, in place:
        p *= decay                                (1 - lr * weight_decay; AdamW)
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
    step_size = lr / (1 - b1^t) and inv_sqrt_bc2 = 1 / sqrt(1 - b2^t) fold
    the bias corrections in. p, g, m, v: (n,) of one dtype.
    """
    cdef Py_ssize_t n = p.shape[0], k
    cdef real b1 = beta1, b2 = beta2, one_minus_b1 = 1.0 - beta1, one_minus_b2 = 1.0 - beta2
    cdef real e = eps, s = step_size, c2 = inv_sqrt_bc2, d = decay
    cdef real gk
    _check_same_length((p, g, m, v))
    with nogil:
        for k in range(n):
            gk = g[k]
            m[k] = b1 * m[k] + one_minus_b1 * gk
            v[k] = b2 * v[k] + one_minus_b2 * (gk * gk)
            p[k] = d * p[k] - s * (m[k] / (sqrt_(v[k]) * c2 + e))


def rmsprop_update(real[::1] p, const real[::1] g, real[::1] square_avg,
                   double alpha, double eps, double lr):
    """One RMSProp step on a flat parameter, in place:
        E = alpha E + (1 - alpha) g^2;  p -= lr * g / (sqrt(E) + eps).
    g already includes any L2 weight decay. p, g, square_avg: (n,).
    """
    cdef Py_ssize_t n = p.shape[0], k
    cdef real a = alpha, one_minus_a = 1.0 - alpha, e = eps, rate = lr
    cdef real gk
    _check_same_length((p, g, square_avg))
    with nogil:
        for k in range(n):
            gk = g[k]
            square_avg[k] = a * square_avg[k] + one_minus_a * (gk * gk)
            p[k] = p[k] - rate * (gk / (sqrt_(square_avg[k]) + e))


def scaled_sum(real[::1] out, const real[::1] a, double alpha, const real[::1] b,
               double beta):
    """out = alpha * a + beta * b, in one pass (out may be a). All (n,).
    Combines the gradients of the shares of a batch (charlm.parallel)."""
    cdef Py_ssize_t n = out.shape[0], k
    cdef real wa = alpha, wb = beta
    _check_same_length((out, a, b))
    with nogil:
        for k in range(n):
            out[k] = wa * a[k] + wb * b[k]


def sum_of_squares(const real[::1] x):
    """sum(x**2) accumulated in double (float32 squares of 1e20 would overflow)."""
    cdef Py_ssize_t n = x.shape[0], k = 0
    cdef double lanes[LANES]
    cdef double total = 0, xk
    cdef int l
    with nogil:
        for l in range(LANES):
            lanes[l] = 0
        while k + LANES <= n:
            for l in range(LANES):
                xk = x[k + l]
                lanes[l] += xk * xk
            k += LANES
        for l in range(LANES):
            total += lanes[l]
        while k < n:
            xk = x[k]
            total += xk * xk
            k += 1
    return total
