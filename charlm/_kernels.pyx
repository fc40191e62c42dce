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
    recurrence         the time loop in C: one (B,H)@(H,G) GEMM per step, then
                       the cell's element-wise equations
    backward           the same in reverse; the weight gradients are one GEMM
                       each over all N rows, after the loop

Every function validates the shapes it receives before it releases the GIL:
the loops run without bounds checks, so this is the memory-safety boundary.
"""

from libc.math cimport exp, expf, tanh, tanhf, log, logf
from libc.string cimport memset, memcpy
from scipy.linalg.cython_blas cimport sgemm, dgemm

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

cdef inline real sigmoid(real x) noexcept nogil:
    if real is float:
        return 1 / (1 + expf(-x))
    else:
        return 1 / (1 + exp(-x))


cdef inline real exp_(real x) noexcept nogil:
    if real is float:
        return expf(x)
    else:
        return exp(x)


cdef inline real tanh_(real x) noexcept nogil:
    if real is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      real alpha, const real* a, int lda,
                      const real* b, int ldb,
                      real beta, real* c, int ldc) noexcept nogil:
    """Row-major C[m,n] = alpha * op(A)[m,k] @ op(B)[k,n] + beta * C.

    BLAS is column-major; a row-major matrix is its transpose, so we ask for
    C.T = op(B).T @ op(A).T, i.e. swap the operands and their roles.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m == 0 or n == 0:
        return
    if real is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda,
              &beta, c, &ldc)


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
        column_sums(&dgates[0, 0], N, G, &dbias[0])
    _require(bad < 0, "input_from_ids_backward: id out of range")


def input_from_dense(const real[:, ::1] x, const real[:, ::1] W_ih,
                     const real[::1] bias, real[:, ::1] gates):
    """Upper layers: gates = x @ W_ih.T + bias.

    x (N, In), W_ih (G, In), bias (G,), gates (N, G) written.
    """
    cdef int N = x.shape[0], In = x.shape[1], G = W_ih.shape[0]
    cdef int r
    _require(W_ih.shape[1] == In and bias.shape[0] == G
             and gates.shape[0] == N and gates.shape[1] == G,
             "input_from_dense: shape mismatch")
    with nogil:
        for r in range(N):
            memcpy(&gates[r, 0], &bias[0], G * sizeof(real))
        # gates += x @ W_ih.T                      (N,G) += (N,In) @ (In,G)
        gemm(False, True, N, G, In, 1, &x[0, 0], In, &W_ih[0, 0], In,
             1, &gates[0, 0], G)


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
    with nogil:
        # dW_ih = dgates.T @ x                     (G,In) = (G,N) @ (N,In)
        gemm(True, False, G, In, N, 1, &dgates[0, 0], G, &x[0, 0], In,
             0, &dW_ih[0, 0], In)
        # dx = dgates @ W_ih                       (N,In) = (N,G) @ (G,In)
        gemm(False, False, N, In, G, 1, &dgates[0, 0], G, &W_ih[0, 0], In,
             0, &dx[0, 0], In)
        column_sums(&dgates[0, 0], N, G, &dbias[0])


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
    _check_recurrence(T, B, H, H, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    with nogil:
        for t in range(T):
            # gates[t] += h[t] @ W_hh.T            (B,H) += (B,H) @ (H,H)
            gemm(False, True, B, H, H, 1, &h[t, 0, 0], H, &W_hh[0, 0], H,
                 1, &gates[t, 0, 0], H)
            for b in range(B):
                pre = &gates[t, b, 0]
                h_new = &h[t + 1, b, 0]
                if relu:
                    for j in range(H):
                        h_new[j] = pre[j] if pre[j] > 0 else 0
                else:
                    for j in range(H):
                        h_new[j] = tanh_(pre[j])


def rnn_backward(bint relu, const real[:, :, ::1] h, const real[:, ::1] W_hh,
                 const real[:, :, ::1] dh_out, real[:, ::1] dh_carry,
                 real[:, :, ::1] dgates, real[:, ::1] dW_hh):
    """Truncated BPTT through the chunk.

    h (T+1, B, H) from rnn_forward; W_hh (H, H).
    dh_out (T, B, H): dL/dh_t arriving from above (output layer or next layer).
    dh_carry (B, H): in, dL/dh_T from beyond the chunk (zero when truncating);
        out, dL/dh_0, the gradient for the initial state.
    dgates (T, B, H) written: dL/d(pre-activation).
    dW_hh (H, H) overwritten.
    """
    cdef int T = dh_out.shape[0], B = dh_out.shape[1], H = dh_out.shape[2]
    cdef int t, b, j
    cdef real dh
    cdef const real* h_t
    cdef const real* up
    cdef real* carry
    cdef real* dpre
    _check_recurrence(T, B, H, H, (_shape(dgates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(dh_carry, 2) == (B, H), "dh_carry must be (B, H)")
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
            # dh_carry = dgates[t] @ W_hh          (B,H) = (B,H) @ (H,H)
            gemm(False, False, B, H, H, 1, &dgates[t, 0, 0], H, &W_hh[0, 0], H,
                 0, &dh_carry[0, 0], H)
        # dW_hh = dgates.T @ h[:T]                 (H,H) = (H,N) @ (N,H)
        gemm(True, False, H, H, T * B, 1, &dgates[0, 0, 0], H, &h[0, 0, 0], H,
             0, &dW_hh[0, 0], H)


# ---------------------------------------------------------------------------
# LSTM, gates stacked [i | f | g | o]:
#   i, f, o = sigmoid(.), g = tanh(.)
#   c_t = f * c_{t-1} + i * g
#   h_t = o * tanh(c_t)
# ---------------------------------------------------------------------------

def lstm_forward(real[:, :, ::1] gates, const real[:, ::1] W_hh,
                 real[:, :, ::1] h, real[:, :, ::1] c, real[:, :, ::1] tanh_c):
    """Run the recurrence over the chunk.

    gates (T, B, 4H): in, the input projection with both biases; out, the
        activated gates i, f, g, o.
    W_hh (4H, H).
    h, c (T+1, B, H): index 0 is the initial state (set by the caller).
    tanh_c (T, B, H) written: tanh(c_t), kept for the backward pass.
    """
    cdef int T = gates.shape[0], B = gates.shape[1], H = h.shape[2], G = 4 * H
    cdef int t, b, j
    cdef real i, f, g, o
    cdef real* gate
    cdef const real* c_prev
    cdef real* c_new
    cdef real* h_new
    cdef real* tc
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(c, 3) == (T + 1, B, H) and _shape(tanh_c, 3) == (T, B, H),
             "c must be (T+1, B, H) and tanh_c (T, B, H)")
    with nogil:
        for t in range(T):
            # gates[t] += h[t] @ W_hh.T            (B,4H) += (B,H) @ (H,4H)
            gemm(False, True, B, G, H, 1, &h[t, 0, 0], H, &W_hh[0, 0], H,
                 1, &gates[t, 0, 0], G)
            for b in range(B):
                gate = &gates[t, b, 0]
                c_prev = &c[t, b, 0]
                c_new = &c[t + 1, b, 0]
                h_new = &h[t + 1, b, 0]
                tc = &tanh_c[t, b, 0]
                for j in range(H):
                    i = sigmoid(gate[j])
                    f = sigmoid(gate[H + j])
                    g = tanh_(gate[2 * H + j])
                    o = sigmoid(gate[3 * H + j])
                    gate[j] = i
                    gate[H + j] = f
                    gate[2 * H + j] = g
                    gate[3 * H + j] = o
                    c_new[j] = f * c_prev[j] + i * g
                    tc[j] = tanh_(c_new[j])
                    h_new[j] = o * tc[j]


def lstm_backward(const real[:, :, ::1] gates, const real[:, ::1] W_hh,
                  const real[:, :, ::1] h, const real[:, :, ::1] c,
                  const real[:, :, ::1] tanh_c, const real[:, :, ::1] dh_out,
                  real[:, ::1] dh_carry, real[:, ::1] dc_carry,
                  real[:, :, ::1] dgates, real[:, ::1] dW_hh):
    """Truncated BPTT through the chunk.

    gates (T, B, 4H) activated, h, c (T+1, B, H), tanh_c (T, B, H): from
        lstm_forward. W_hh (4H, H).
    dh_out (T, B, H): dL/dh_t arriving from above.
    dh_carry, dc_carry (B, H): in, dL/dh_T and dL/dc_T from beyond the chunk;
        out, dL/dh_0 and dL/dc_0.
    dgates (T, B, 4H) written: dL/d(pre-activation) of [i|f|g|o].
    dW_hh (4H, H) overwritten.
    """
    cdef int T = dh_out.shape[0], B = dh_out.shape[1], H = dh_out.shape[2], G = 4 * H
    cdef int t, b, j
    cdef real i, f, g, o, tc, dh, dc
    cdef const real* gate
    cdef const real* c_prev
    cdef const real* up
    cdef const real* tcs
    cdef real* dgate
    cdef real* dh_c
    cdef real* dc_c
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(c, 3) == (T + 1, B, H) and _shape(tanh_c, 3) == (T, B, H)
             and _shape(dgates, 3) == (T, B, G)
             and _shape(dh_carry, 2) == (B, H) and _shape(dc_carry, 2) == (B, H),
             "lstm_backward: shape mismatch")
    with nogil:
        for t in range(T - 1, -1, -1):
            for b in range(B):
                gate = &gates[t, b, 0]
                dgate = &dgates[t, b, 0]
                c_prev = &c[t, b, 0]
                tcs = &tanh_c[t, b, 0]
                up = &dh_out[t, b, 0]
                dh_c = &dh_carry[b, 0]
                dc_c = &dc_carry[b, 0]
                for j in range(H):
                    i = gate[j]
                    f = gate[H + j]
                    g = gate[2 * H + j]
                    o = gate[3 * H + j]
                    tc = tcs[j]
                    dh = up[j] + dh_c[j]
                    # through h_t = o * tanh(c_t), plus the carried dL/dc_t
                    dc = dc_c[j] + dh * o * (1 - tc * tc)
                    dgate[j] = dc * g * i * (1 - i)                 # d pre_i
                    dgate[H + j] = dc * c_prev[j] * f * (1 - f)     # d pre_f
                    dgate[2 * H + j] = dc * i * (1 - g * g)         # d pre_g
                    dgate[3 * H + j] = dh * tc * o * (1 - o)        # d pre_o
                    dc_c[j] = dc * f                                # dL/dc_{t-1}
            # dh_carry = dgates[t] @ W_hh          (B,H) = (B,4H) @ (4H,H)
            gemm(False, False, B, H, G, 1, &dgates[t, 0, 0], G, &W_hh[0, 0], H,
                 0, &dh_carry[0, 0], H)
        # dW_hh = dgates.T @ h[:T]                 (4H,H) = (4H,N) @ (N,H)
        gemm(True, False, G, H, T * B, 1, &dgates[0, 0, 0], G, &h[0, 0, 0], H,
             0, &dW_hh[0, 0], H)


# ---------------------------------------------------------------------------
# GRU, gates stacked [r | z | n]:
#   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr),  z likewise
#   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
#   h_t = (1 - z) * n + z * h_{t-1}
# The input projection carries b_ih only; b_hh is added here because b_hn
# sits inside the product with r.
# ---------------------------------------------------------------------------

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
    cdef int t, b, j
    cdef real r, z, n
    cdef real* gate
    cdef real* hh_row
    cdef const real* h_prev
    cdef real* h_new
    cdef real* hn_row
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(b_hh.shape[0] == G and _shape(hn, 3) == (T, B, H)
             and _shape(hh, 2) == (B, G), "gru_forward: shape mismatch")
    with nogil:
        for t in range(T):
            for b in range(B):
                memcpy(&hh[b, 0], &b_hh[0], G * sizeof(real))
            # hh = h[t] @ W_hh.T + b_hh            (B,3H) += (B,H) @ (H,3H)
            gemm(False, True, B, G, H, 1, &h[t, 0, 0], H, &W_hh[0, 0], H,
                 1, &hh[0, 0], G)
            for b in range(B):
                gate = &gates[t, b, 0]
                hh_row = &hh[b, 0]
                h_prev = &h[t, b, 0]
                h_new = &h[t + 1, b, 0]
                hn_row = &hn[t, b, 0]
                for j in range(H):
                    r = sigmoid(gate[j] + hh_row[j])
                    z = sigmoid(gate[H + j] + hh_row[H + j])
                    n = tanh_(gate[2 * H + j] + r * hh_row[2 * H + j])
                    gate[j] = r
                    gate[H + j] = z
                    gate[2 * H + j] = n
                    hn_row[j] = hh_row[2 * H + j]
                    h_new[j] = (1 - z) * n + z * h_prev[j]


def gru_backward(const real[:, :, ::1] gates, const real[:, :, ::1] hn,
                 const real[:, ::1] W_hh, const real[:, :, ::1] h,
                 const real[:, :, ::1] dh_out, real[:, ::1] dh_carry,
                 real[:, :, ::1] dgates_x, real[:, :, ::1] dgates_h,
                 real[:, ::1] dW_hh, real[::1] db_hh):
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
    cdef int t, b, j
    cdef real r, z, n, dh, dpre_n, dpre_r
    cdef const real* gate
    cdef const real* hn_row
    cdef const real* h_prev
    cdef const real* up
    cdef real* carry
    cdef real* dx
    cdef real* dhh
    _check_recurrence(T, B, H, G, (_shape(gates, 3), _shape(W_hh, 2), _shape(h, 3)))
    _require(_shape(hn, 3) == (T, B, H) and _shape(dh_carry, 2) == (B, H)
             and _shape(dgates_x, 3) == (T, B, G) and _shape(dgates_h, 3) == (T, B, G)
             and _shape(dW_hh, 2) == (G, H) and db_hh.shape[0] == G,
             "gru_backward: shape mismatch")
    with nogil:
        for t in range(T - 1, -1, -1):
            for b in range(B):
                gate = &gates[t, b, 0]
                hn_row = &hn[t, b, 0]
                h_prev = &h[t, b, 0]
                up = &dh_out[t, b, 0]
                carry = &dh_carry[b, 0]
                dx = &dgates_x[t, b, 0]
                dhh = &dgates_h[t, b, 0]
                for j in range(H):
                    r = gate[j]
                    z = gate[H + j]
                    n = gate[2 * H + j]
                    dh = up[j] + carry[j]
                    dpre_n = dh * (1 - z) * (1 - n * n)
                    dpre_r = dpre_n * hn_row[j] * r * (1 - r)
                    dx[j] = dpre_r
                    dx[H + j] = dh * (h_prev[j] - n) * z * (1 - z)   # d pre_z
                    dx[2 * H + j] = dpre_n
                    dhh[j] = dpre_r
                    dhh[H + j] = dx[H + j]
                    dhh[2 * H + j] = dpre_n * r
                    carry[j] = dh * z          # the direct path h_t <- z * h_{t-1}
            # dh_carry += dgates_h[t] @ W_hh       (B,H) += (B,3H) @ (3H,H)
            gemm(False, False, B, H, G, 1, &dgates_h[t, 0, 0], G, &W_hh[0, 0], H,
                 1, &dh_carry[0, 0], H)
        # dW_hh = dgates_h.T @ h[:T]               (3H,H) = (3H,N) @ (N,H)
        gemm(True, False, G, H, T * B, 1, &dgates_h[0, 0, 0], G, &h[0, 0, 0], H,
             0, &dW_hh[0, 0], H)
        column_sums(&dgates_h[0, 0, 0], T * B, G, &db_hh[0])


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

    logits (N, V): in, the logits; out, dL/dlogits for L = the mean loss,
        i.e. (softmax - one_hot(target)) / N.
    targets (N,) int32 in [0, V).
    Returns the mean loss in nats (a Python float, accumulated in double).
    """
    cdef int N = logits.shape[0], V = logits.shape[1]
    cdef int r, k, bad = -1
    cdef real m, scale
    cdef double total = 0, z
    cdef real* row
    _require(targets.shape[0] == N and N >= 1 and V >= 1,
             "softmax_cross_entropy: shape mismatch")
    scale = 1 / <real>N
    with nogil:
        for r in range(N):
            if targets[r] < 0 or targets[r] >= V:
                bad = r
                break
            row = &logits[r, 0]
            m = row[0]
            for k in range(1, V):
                if row[k] > m:
                    m = row[k]
            # loss_r = log sum_k exp(logit_k - m) - (logit_target - m)
            total -= row[targets[r]] - m
            z = 0
            for k in range(V):
                row[k] = exp_(row[k] - m)
                z += row[k]
            total += log(z)
            for k in range(V):
                row[k] = <real>(row[k] / z) * scale
            row[targets[r]] -= scale
    _require(bad < 0, "softmax_cross_entropy: target out of range")
    return total / N


def target_log_probs(const real[:, ::1] logits, const int[::1] targets,
                     double[::1] log_probs):
    """log_probs[r] = log softmax(logits[r])[targets[r]], in nats, stable.

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
            if targets[r] < 0 or targets[r] >= V:
                bad = r
                break
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
