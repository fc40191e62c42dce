"""The packed matrix product the recurrences use for W_hh (charlm/_packed_gemm.h).

Its micro-kernel works on blocks of up to 13 rows (AVX-512 builds) or 6
(others; the debug build of CI is one), cut to nearly equal heights, and of
2 vectors of columns, with a zero-padded last panel, so the shapes below
cover every block height of either: rows 1..17 and 21, 25, 27 (blocks of
11+10, 13+12, 9+9+9), column counts on both sides of each panel width (16,
32 for float; 8, 16 for double), and sums over 1 to 129 terms.
"""

import numpy as np
import pytest

from charlm import _kernels as K

ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 21, 25, 27]
COLS = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100]
DEPTHS = [1, 3, 64, 129]


def _operands(rng, M, Kd, N, dtype):
    a = rng.standard_normal((M, Kd)).astype(dtype)
    b = rng.standard_normal((Kd, N)).astype(dtype)
    return a, b


def _tolerance(a, b, dtype):
    """Rounding bound of a dot product in this dtype, per output element."""
    eps = np.finfo(dtype).eps
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    return 4 * a.shape[1] * eps * scale + 1e-300


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N", COLS)
@pytest.mark.parametrize("a_transposed", [False, True], ids=["A", "A.T"])
def test_matches_numpy_for_every_remainder(dtype, M, N, a_transposed):
    """Both ways of reading A: rows of A (the recurrences) and columns of a
    stored A.T (the weight gradients, dgates.T @ x)."""
    rng = np.random.default_rng(M * 1000 + N)
    for Kd in DEPTHS:
        a, b = _operands(rng, M, Kd, N, dtype)
        out = np.full((M, N), np.nan, dtype)          # overwritten, never read
        stored = np.ascontiguousarray(a.T) if a_transposed else a
        K.packed_matmul(stored, b, out, a_transposed=a_transposed)
        exact = a.astype(np.float64) @ b.astype(np.float64)
        assert np.all(np.abs(out - exact) <= _tolerance(a, b, dtype)), (M, Kd, N)


# 512 gate rows: 100 rows of dgates are 0.2 MB (the packed product), 2100 rows
# 4.3 MB (over the 4 MB limit: BLAS).
@pytest.mark.parametrize("rows", [100, 2100])
def test_weight_gradient_on_both_sides_of_the_size_limit(rows):
    rng = np.random.default_rng(rows)
    G, In = 512, 40
    x = rng.standard_normal((rows, In)).astype(np.float32)
    W_ih = rng.standard_normal((G, In)).astype(np.float32)
    dgates = rng.standard_normal((rows, G)).astype(np.float32)
    dW, db, dx = np.empty((G, In), np.float32), np.empty(G, np.float32), np.empty((rows, In), np.float32)
    K.input_from_dense_backward(x, W_ih, dgates, dW, db, dx)
    exact = dgates.T.astype(np.float64) @ x.astype(np.float64)
    assert np.all(np.abs(dW - exact) <= _tolerance(dgates.T, x, np.float32))


# Over the size limits (weights over 1 MB, dgates over 4 MB) a product goes to
# BLAS while BLAS has threads, and to the packed kernel when it runs on one
# thread (training workers): both routes, through the same calls.
@pytest.mark.parametrize("blas_threads", [1, 2])
def test_large_products_on_both_routes(blas_threads):
    from charlm.parallel import blas_threads as limit
    rng = np.random.default_rng(blas_threads)
    rows, G, In = 2100, 520, 530            # W_ih 1.1 MB, dgates 4.4 MB in float32
    x = rng.standard_normal((rows, In)).astype(np.float32)
    W_ih = rng.standard_normal((G, In)).astype(np.float32)
    bias = rng.standard_normal(G).astype(np.float32)
    dgates = rng.standard_normal((rows, G)).astype(np.float32)
    gates = np.full((rows, G), np.nan, np.float32)
    dW, db, dx = np.empty((G, In), np.float32), np.empty(G, np.float32), np.empty((rows, In), np.float32)
    with limit(blas_threads):
        K.input_from_dense(x, W_ih, bias, gates)
        K.input_from_dense_backward(x, W_ih, dgates, dW, db, dx)
    x64, W64, d64 = (v.astype(np.float64) for v in (x, W_ih, dgates))
    assert np.all(np.abs(gates - (x64 @ W64.T + bias)) <= _tolerance(x, W_ih.T, np.float32) + 1e-5)
    assert np.all(np.abs(dW - d64.T @ x64) <= _tolerance(dgates.T, x, np.float32))
    assert np.all(np.abs(dx - d64 @ W64) <= _tolerance(dgates, W_ih, np.float32))


def test_blas_threads_tells_the_kernels_and_restores():
    from charlm.parallel import blas_threads
    outside = K.set_blas_on_one_thread(False)
    try:
        with blas_threads(1):
            assert K.set_blas_on_one_thread(True) is True
            with blas_threads(2):
                assert K.set_blas_on_one_thread(False) is False
            assert K.set_blas_on_one_thread(True) is True
        assert K.set_blas_on_one_thread(False) is False
    finally:
        K.set_blas_on_one_thread(outside)


# Shapes large enough for each level of the sweep's cache blocking with the
# caches of these machines (L1 32-48 KB, L2 1-2 MB) or the sizes assumed when
# the C library cannot tell: a recurrent step whose panel is cut into slices
# of k, with a partial last slice; a chunk's rows over several groups of
# panels; A read transposed in several superblocks, with a row stride that
# aliases (copied) and one that does not (read in place).
BLOCKED = [
    (25, 3001, 70, False),       # few rows, panels of 3001 k: sliced
    (300, 700, 300, False),      # a chunk's rows, several groups of panels
    (512, 3000, 40, True),       # transposed, stride 2 KB: copied, 4+ superblocks
    (515, 3000, 40, True),       # transposed, stride not aliasing: in place
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M, Kd, N, a_transposed", BLOCKED)
def test_cache_blocked_sweeps_match_numpy(dtype, M, Kd, N, a_transposed):
    rng = np.random.default_rng(M + Kd)
    a, b = _operands(rng, M, Kd, N, dtype)
    stored = np.ascontiguousarray(a.T) if a_transposed else a
    start = rng.standard_normal((M, N)).astype(dtype)
    out = start.copy()
    K.packed_matmul(stored, b, out, accumulate=True, a_transposed=a_transposed)
    exact = start.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    assert np.all(np.abs(out - exact) <= _tolerance(a, b, dtype) + 4 * np.finfo(dtype).eps
                  * np.abs(exact))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulate_adds_to_the_output(dtype):
    rng = np.random.default_rng(0)
    for M, Kd, N in [(7, 33, 17), (6, 64, 32), (1, 5, 100)]:
        a, b = _operands(rng, M, Kd, N, dtype)
        start = rng.standard_normal((M, N)).astype(dtype)
        out = start.copy()
        K.packed_matmul(a, b, out, accumulate=True)
        exact = start.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
        assert np.all(np.abs(out - exact) <= _tolerance(a, b, dtype) + 4 * np.finfo(dtype).eps
                      * np.abs(exact)), (M, Kd, N)


def test_writes_nothing_outside_the_output():
    """A partial last panel is stored element by element: the columns past N
    (here the rest of a wider buffer's rows) must stay untouched."""
    rng = np.random.default_rng(1)
    a, b = _operands(rng, 5, 20, 9, np.float32)
    wide = np.full((5, 40), 7.0, np.float32)
    out = wide[:, :9].copy()
    K.packed_matmul(a, b, out)
    assert np.array_equal(wide[:, 9:], np.full((5, 31), 7.0, np.float32))
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def test_nan_propagates():
    """A non-finite weight must poison the product, not vanish in a padded lane."""
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    b[2, 4] = np.nan
    out = np.zeros((3, 5), np.float32)
    K.packed_matmul(a, b, out)
    assert np.isnan(out[:, 4]).all() and np.isfinite(out[:, :4]).all()


def test_rejects_mismatched_shapes():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError):
        K.packed_matmul(a, np.ones((5, 2), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError):
        K.packed_matmul(a, np.ones((4, 2), np.float32), np.zeros((3, 3), np.float32))


# The products over all rows of a chunk: input projections (with their bias
# added as C is stored) and dL/dx. Rows below 8 and widths that would leave much
# of the last panel padding (65 = 32 + 32 + 1) go to BLAS; 300 rows take the
# sweep with row blocks outer; 60 columns end in a partial panel with a bias.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 7, 8, 25, 300])
@pytest.mark.parametrize("width", [16, 60, 65, 128])
def test_input_projection_and_its_backward_on_both_paths(dtype, rows, width):
    rng = np.random.default_rng(rows * 1000 + width)
    In = 37
    x = rng.standard_normal((rows, In)).astype(dtype)
    W_ih = rng.standard_normal((width, In)).astype(dtype)
    bias = rng.standard_normal(width).astype(dtype)
    gates = np.full((rows, width), np.nan, dtype)         # overwritten, never read
    K.input_from_dense(x, W_ih, bias, gates)
    exact = x.astype(np.float64) @ W_ih.T.astype(np.float64) + bias
    assert np.all(np.abs(gates - exact) <= _tolerance(x, W_ih.T, dtype)
                  + 4 * np.finfo(dtype).eps * np.abs(exact))

    dgates = rng.standard_normal((rows, width)).astype(dtype)
    dW, db = np.empty((width, In), dtype), np.empty(width, dtype)
    dx = np.full((rows, In), np.nan, dtype)
    K.input_from_dense_backward(x, W_ih, dgates, dW, db, dx)
    exact_dx = dgates.astype(np.float64) @ W_ih.astype(np.float64)
    assert np.all(np.abs(dx - exact_dx) <= _tolerance(dgates, W_ih, dtype))


@pytest.mark.parametrize("a_transposed", [False, True], ids=["A", "A.T"])
def test_many_rows_sweep_row_blocks_first(a_transposed):
    """300 rows: the sweep's other loop order, accumulating."""
    rng = np.random.default_rng(3)
    a, b = _operands(rng, 300, 45, 70, np.float32)
    start = rng.standard_normal((300, 70)).astype(np.float32)
    out = start.copy()
    stored = np.ascontiguousarray(a.T) if a_transposed else a
    K.packed_matmul(stored, b, out, accumulate=True, a_transposed=a_transposed)
    exact = start.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    assert np.all(np.abs(out - exact) <= _tolerance(a, b, np.float32)
                  + 4 * np.finfo(np.float32).eps * np.abs(exact))


# A.T with a row stride that is a multiple of 1 KB (dgates of a 128-unit LSTM:
# 512 floats) is copied two row blocks at a time into a contiguous strip;
# other strides are read in place. Both, with an odd number of row blocks
# where the block height allows (6 rows: 256 = 43 blocks).
@pytest.mark.parametrize("dtype,M", [(np.float32, 256), (np.float32, 512), (np.float32, 768),
                                     (np.float32, 520), (np.float64, 128), (np.float64, 384),
                                     (np.float64, 130)])
@pytest.mark.parametrize("Kd", [1, 33, 1250])
def test_columns_of_a_power_of_two_wide_a_read_through_a_strip(dtype, M, Kd):
    rng = np.random.default_rng(M + Kd)
    a, b = _operands(rng, M, Kd, 70, dtype)
    start = rng.standard_normal((M, 70)).astype(dtype)
    out = start.copy()
    K.packed_matmul(np.ascontiguousarray(a.T), b, out, accumulate=True, a_transposed=True)
    exact = start.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    assert np.all(np.abs(out - exact) <= _tolerance(a, b, dtype)
                  + 4 * np.finfo(dtype).eps * np.abs(exact)), (M, Kd)


@pytest.mark.parametrize("shape, dtype", [((0,), np.float32), (3, np.float32), ((5, 7), np.float64),
                                          ((2, 3, 129), np.float32)])
def test_aligned_arrays_start_on_a_cache_line(shape, dtype):
    """The kernels' buffers start on a 64-byte line: a vector load 16 bytes
    off it touches two lines (see charlm_alloc_lines in _packed_gemm.h)."""
    a = K.aligned_empty(shape, dtype)
    expected = (shape,) if isinstance(shape, int) else shape
    assert a.shape == expected and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % 64 == 0 or a.size == 0      # nothing to align in an empty one
    a[...] = 1
    zeros = K.aligned_zeros(shape, dtype)
    assert (zeros.ctypes.data % 64 == 0 or zeros.size == 0) and not zeros.any()
    source = np.arange(12, dtype=dtype).reshape(3, 4).T       # not contiguous
    copy = K.aligned_copy(source)
    assert copy.ctypes.data % 64 == 0 and copy.flags.c_contiguous
    np.testing.assert_array_equal(copy, source)


def test_model_buffers_and_sampler_layouts_are_aligned():
    from charlm.model import Config, Model
    model = Model(Config(vocab_size=11, cell="lstm", hidden=24, layers=2), seed=0)
    x = np.random.default_rng(0).integers(0, 11, (5, 3)).astype(np.int32)
    model.loss_and_grads(x, x, model.zero_state(3))
    workspace = model._current
    arrays = [workspace.logits, workspace.d_top, workspace.W_ihT, workspace.dW_ihT]
    for cache in workspace.caches:
        arrays += [cache.gates, cache.h, cache.c, cache.tanh_c, cache.d_input, cache.dh_carry]
    arrays += list(model.grads.values()) + list(model.params.values())
    from charlm.optim import make_optimizer
    optimiser = make_optimizer("adam", model.params, 1e-3)
    arrays += [a for slot in optimiser._state.values() for a in slot.values()]
    loaded = Model.from_torch_state_dict(model.torch_state_dict(), cell="lstm")
    arrays += list(loaded.params.values())
    arrays.append(K.sampler_layout(model.params["weight_hh_l0"], 1))
    arrays.append(K.sampler_layout(model.params["weight_hh_l0"], 4))
    assert all(a.ctypes.data % 64 == 0 for a in arrays)
