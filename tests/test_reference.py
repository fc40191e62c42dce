"""The Cython kernels against the plain-numpy reference (charlm.reference).

Two claims are checked:
1. The reference is right on its own: its hand-written backward matches
   central finite differences of its own loss, in float64.
2. The kernels compute the same maths as the reference: loss, every parameter
   gradient, the final state and the gradient for the initial state, for
   every cell, 1-3 layers, with non-zero biases, a random initial state and
   (fixed) dropout masks.

Tolerances. In float64 the two differ only in the order of floating-point
sums (BLAS blocking versus one time step at a time), so elements agree to
rtol 1e-12; an element that is small because its terms cancel can carry a
few ulps of its terms' size, which the atol covers: 1e-14 times the largest
element of the same array (measured worst case ~1.5e-16, over 20 seeds).
A float32 model is compared with the exact float64 maths on the very same
float32 numbers: rtol 1e-5, plus an atol of 2e-6 times the array's largest
element for the entries that are small through cancellation (measured worst
case ~4e-7, i.e. a few float32 ulps of the array's scale).
"""

import numpy as np
import pytest

from charlm import _kernels as K
from charlm import reference
from charlm.model import CELLS, Config, Model, _dropout_mask

TOLERANCES = {"float64": (1e-12, 1e-14), "float32": (1e-5, 2e-6)}   # rtol, atol per max|x|


def _problem(cell, layers, dtype, V=7, H=5, T=6, B=3, seed=0):
    config = Config(vocab_size=V, cell=cell, hidden=H, layers=layers, dtype=dtype)
    model = Model(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    # Non-zero biases and a random initial state exercise every term.
    for name, p in model.params.items():
        if "bias" in name or "peep" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = model.zero_state(B)
    state.h[...] = rng.normal(0, 0.5, state.h.shape)
    if state.c is not None:
        state.c[...] = rng.normal(0, 0.5, state.c.shape)
    return model, x, y, state


def _model_masks(config, x, dropout, seed):
    """The masks Model.loss_and_grads draws from default_rng(seed): one per
    layer, layer 0 first, in the model's dtype (so float32 masks hold
    float32(1/keep), exactly as the kernels see them)."""
    if dropout == 0.0:
        return None
    rng = np.random.default_rng(seed)
    shape = (*x.shape, config.hidden)
    return [_dropout_mask(rng, shape, dropout, np.dtype(config.np_dtype))
            for _ in range(config.layers)]


def _assert_close(actual, expected, dtype, what):
    rtol, atol_scale = TOLERANCES[dtype]
    expected = np.asarray(expected)
    atol = atol_scale * np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_kernels_match_reference(cell, layers, dropout, dtype):
    model, x, y, state = _problem(cell, layers, dtype)
    seed = 11
    state_grad = model.zero_state(x.shape[1])
    loss, grads, final = model.loss_and_grads(x, y, state, dropout=dropout,
                                              rng=np.random.default_rng(seed),
                                              state_grad=state_grad)
    masks = _model_masks(model.config, x, dropout, seed)
    ref_loss, ref_grads, hT, cT, dh0, dc0 = reference.loss_and_grads(
        model.config, model.params, x, y, state.h, state.c, dropout_masks=masks)

    rtol = TOLERANCES[dtype][0]
    assert loss == pytest.approx(ref_loss, rel=rtol, abs=0)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert np.abs(ref_grads[name]).max() > 0, name     # every gradient is exercised
        _assert_close(grad, ref_grads[name], dtype, name)
    _assert_close(final.h, hT, dtype, "final h")
    _assert_close(state_grad.h, dh0, dtype, "dL/dh0")
    if model.config.has_cell_state:
        _assert_close(final.c, cT, dtype, "final c")
        _assert_close(state_grad.c, dc0, dtype, "dL/dc0")
    else:
        assert cT is None and dc0 is None


@pytest.mark.parametrize("cell", CELLS)
def test_kernels_match_reference_with_dW_hh_summed_in_spans(cell):
    """A chunk long and wide enough for the BPTT loops to add dW_hh in
    several spans of steps, the last one shorter: the same gradients."""
    H, T, B = 64, 19, 64
    model, x, y, state = _problem(cell, 2, "float64", H=H, T=T, B=B, seed=3)
    gates = model.config.gates
    span = K.gradient_span_steps(T, B, gates, H, 8)
    assert 1 < span < T and T % span, span          # several spans, a partial one
    loss, grads, _ = model.loss_and_grads(x, y, state)
    ref_loss, ref_grads = reference.loss_and_grads(model.config, model.params, x, y,
                                                   state.h, state.c)[:2]
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=0)
    for name, grad in grads.items():
        _assert_close(grad, ref_grads[name], "float64", name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_log_probs_match_reference(cell, dtype):
    model, x, y, state = _problem(cell, 2, dtype, seed=5)
    logp, _ = model.log_probs(x, y, state)
    ref_logp = reference.log_probs(model.config, model.params, x, y, state.h, state.c)
    assert ref_logp.shape == x.shape and ref_logp.dtype == np.float64
    assert np.all(ref_logp < 0)
    _assert_close(logp, ref_logp, dtype, "log p(y)")
    # and the reference's loss is the mean of its own log-probabilities
    ref_loss = reference.loss_and_grads(model.config, model.params, x, y, state.h, state.c)[0]
    assert ref_loss == pytest.approx(-ref_logp.mean(), rel=1e-14)


@pytest.mark.parametrize("blas_threads", [0, 1])
@pytest.mark.parametrize("hidden", [37, 190])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", CELLS)
def test_single_stream_log_probs_match_reference(cell, dtype, hidden, blas_threads):
    """A single stream over a long chunk (evaluation) multiplies by W_hh
    through the own GEMV while W_hh fits its size limit (37 units: G = 148
    leaves whole strips, a narrower one and single columns), else through
    BLAS (the 190-unit LSTMs, and the 190-unit GRU in float64) unless BLAS
    runs on one thread (then all through the own GEMV); short chunks always
    through BLAS."""
    from charlm.parallel import blas_threads as limit
    for T in (3, 300):
        model, x, y, state = _problem(cell, 2, dtype, H=hidden, T=T, B=1, seed=7)
        with limit(blas_threads):
            logp, _ = model.log_probs(x, y, state)
        ref_logp = reference.log_probs(model.config, model.params, x, y, state.h, state.c)
        _assert_close(logp, ref_logp, dtype, f"log p(y), {T} steps")


# -- the reference proven on its own ------------------------------------------

EPS = 1e-6
# Central differences in float64 with EPS = 1e-6 carry ~1e-10 of round-off;
# the analytic gradients here are 1e-4..1e-1, so a real error is far larger.
ABS_TOL = 2e-9
REL_TOL = 1e-6


def _numeric(f, array, index):
    old = array[index]
    array[index] = old + EPS
    up = f()
    array[index] = old - EPS
    down = f()
    array[index] = old
    return (up - down) / (2 * EPS)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("cell", CELLS)
def test_reference_backward_matches_finite_differences(cell, dropout):
    model, x, y, state = _problem(cell, 2, "float64", V=4, H=3, T=3, B=2, seed=2)
    config, params = model.config, model.params
    masks = _model_masks(config, x, dropout, seed=3)

    def run():
        return reference.loss_and_grads(config, params, x, y, state.h, state.c, masks)

    _, grads, _, _, dh0, dc0 = run()

    def loss():
        return run()[0]

    checks = [(params[name], grads[name], name) for name in params]
    checks.append((state.h, dh0, "h0"))
    if state.c is not None:
        checks.append((state.c, dc0, "c0"))
    worst, worst_at = 0.0, None
    for value, grad, name in checks:
        for index in np.ndindex(value.shape):
            tolerance = ABS_TOL + REL_TOL * abs(grad[index])
            err = abs(_numeric(loss, value, index) - grad[index]) / tolerance
            if err > worst:
                worst, worst_at = err, (name, index)
    assert worst < 1, f"worst error {worst:.2f} tolerances at {worst_at}"


def test_reference_rejects_inconsistent_arguments():
    model, x, y, state = _problem("lstm", 1, "float64")
    args = (model.config, model.params, x, y, state.h)
    with pytest.raises(ValueError, match="c0"):
        reference.loss_and_grads(*args)                  # the LSTM needs its cell state
    y[0, 0] = model.config.vocab_size
    with pytest.raises(ValueError, match="ids"):
        reference.loss_and_grads(*args, state.c)


# The softmax kernel reduces each row in vector lanes plus a scalar tail, so
# every vocabulary size around the lane widths is checked, with unscored rows.
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy_kernel_matches_reference(dtype):
    from charlm import _kernels as K
    rng = np.random.default_rng(3)
    rtol = {"float64": 1e-12, "float32": 1e-5}[dtype]
    for V in list(range(1, 41)) + [65, 257]:
        logits = rng.normal(0, 4, (9, V)).astype(dtype)
        y = rng.integers(0, V, 9).astype(np.int32)
        y[[2, 5]] = K.IGNORE_TARGET
        expected_loss, _ = reference.cross_entropy(logits.astype(np.float64), y)
        expected_grad = reference.cross_entropy_backward(logits.astype(np.float64), y)
        grad = logits.copy()
        loss = K.softmax_cross_entropy(grad, y)
        assert loss == pytest.approx(expected_loss, rel=rtol), V
        np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=rtol * 1e-2,
                                   err_msg=f"V={V}")


def test_softmax_cross_entropy_kernel_propagates_nan():
    from charlm import _kernels as K
    for position in (0, 9, 16, 20):             # in the lanes and in the tail
        logits = np.zeros((2, 21), np.float32)
        logits[1, position] = np.nan
        assert np.isnan(K.softmax_cross_entropy(logits, np.array([0, 1], np.int32)))
