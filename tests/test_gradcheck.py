"""Finite-difference gradient checks of every kernel, in float64.

Each check perturbs parameters (and the initial state) one element at a time
and compares the central difference of the loss with the analytic gradient
from the truncated-BPTT kernels. A sign error, a missing term or a wrong gate
order anywhere shows up as a relative error far above the tolerance.
"""

import numpy as np
import pytest

from charlm.model import CELLS, IGNORE, Config, Model

EPS = 1e-6
# Central differences in float64 with EPS = 1e-6 carry ~1e-10 of round-off;
# the analytic gradients here are 1e-4..1e-1, so a real error is far larger.
ABS_TOL = 2e-9
REL_TOL = 1e-6


def _problem(cell, layers, V=5, H=4, T=4, B=3, seed=0):
    config = Config(vocab_size=V, cell=cell, hidden=H, layers=layers, dtype="float64")
    model = Model(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    # Non-zero biases and a random initial state exercise every term.
    for name, p in model.params.items():
        if name.startswith(("bias", "weight_peep")) or name == "out.bias":
            p[...] = rng.normal(0, 0.5, p.shape)
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = model.zero_state(B)
    state.h[...] = rng.normal(0, 0.5, state.h.shape)
    if state.c is not None:
        state.c[...] = rng.normal(0, 0.5, state.c.shape)
    return model, x, y, state


def _numeric(f, array, index):
    old = array[index]
    array[index] = old + EPS
    up = f()
    array[index] = old - EPS
    down = f()
    array[index] = old
    return (up - down) / (2 * EPS)


def _err(numeric, analytic):
    """Error in units of the tolerance: above 1 fails."""
    return abs(numeric - analytic) / (ABS_TOL + REL_TOL * abs(analytic))


def _worst_parameter_error(model, x, y, state, grads):
    """The largest _err of `grads` against central differences of the loss,
    over every element of every parameter."""
    grads = {k: v.copy() for k, v in grads.items()}    # the model reuses its buffers

    def f():
        return model.loss(x, y, state)[0]

    worst = 0.0
    for name, p in model.params.items():
        for index in np.ndindex(p.shape):
            worst = max(worst, _err(_numeric(f, p, index), grads[name][index]))
    return worst


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_parameter_gradients_match_finite_differences(cell, layers):
    model, x, y, state = _problem(cell, layers)
    _, grads, _ = model.loss_and_grads(x, y, state)
    assert _worst_parameter_error(model, x, y, state, grads) < 1


@pytest.mark.parametrize("cell", CELLS)
def test_initial_state_gradient_matches_finite_differences(cell):
    """dL/d(initial state) is what carries gradient across chunk boundaries."""
    model, x, y, state = _problem(cell, layers=2)
    state_grad = model.zero_state(x.shape[1])
    model.loss_and_grads(x, y, state, state_grad=state_grad)

    def f():
        return model.loss(x, y, state)[0]

    arrays = [(state.h, state_grad.h)]
    if state.c is not None:
        arrays.append((state.c, state_grad.c))
    for value, grad in arrays:
        for index in np.ndindex(value.shape):
            assert _err(_numeric(f, value, index), grad[index]) < 1


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_gradients_match_finite_differences(cell):
    """With a fixed dropout mask the loss is smooth, so the check still applies."""
    model, x, y, state = _problem(cell, layers=2)
    seed = 7

    def run():
        return model.loss_and_grads(x, y, state, dropout=0.3, rng=np.random.default_rng(seed))

    _, grads, _ = run()
    grads = {k: v.copy() for k, v in grads.items()}

    def f():
        return run()[0]

    for name in ("weight_ih_l1", "weight_hh_l0", "out.weight"):
        p = model.params[name]
        for index in list(np.ndindex(p.shape))[:12]:
            assert _err(_numeric(f, p, index), grads[name][index]) < 1


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_across_chunks(cell):
    """Running two chunks with the carried state equals running them as one."""
    model, x, y, state = _problem(cell, layers=2, T=6)
    whole, whole_state = model.loss(x, y, state)
    first, mid_state = model.loss(x[:2], y[:2], state)
    second, end_state = model.loss(x[2:], y[2:], mid_state)
    assert np.isclose(whole, (2 * first + 4 * second) / 6, rtol=1e-12)
    np.testing.assert_allclose(end_state.h, whole_state.h, rtol=1e-12)


def test_loss_of_uniform_model_is_log_vocab():
    """All-zero output weights predict uniformly: loss = ln V exactly."""
    model, x, y, state = _problem("lstm", layers=1, V=7)
    model.params["out.weight"][...] = 0
    model.params["out.bias"][...] = 0
    loss, grads, _ = model.loss_and_grads(x, y, state)
    assert loss == pytest.approx(np.log(7), rel=1e-14)


def test_float32_gradients_agree_with_float64():
    model64, x, y, state64 = _problem("lstm", layers=2, H=16, T=8, B=4)
    config32 = Config(**{**model64.config.to_dict(), "dtype": "float32"})
    model32 = Model(config32, {k: v.astype(np.float32) for k, v in model64.params.items()})
    state32 = model32.zero_state(4)
    state32.h[...] = state64.h
    state32.c[...] = state64.c
    loss64, g64, _ = model64.loss_and_grads(x, y, state64)
    loss32, g32, _ = model32.loss_and_grads(x, y, state32)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in g64:
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-5)


def test_out_of_range_ids_are_rejected_before_the_kernels():
    model, x, y, state = _problem("gru", layers=1)
    x[0, 0] = 99
    with pytest.raises(ValueError, match="out of range"):
        model.loss(x, y, state)
    x[0, 0] = 0
    y[1, 1] = -2         # -1 is IGNORE, a legal target
    with pytest.raises(ValueError, match="out of range"):
        model.loss_and_grads(x, y, state)


@pytest.mark.parametrize("cell", CELLS)
def test_initialisation(cell):
    """Orthogonal recurrent gate blocks, zero biases but the LSTM forget gate's 1,
    zero peephole weights."""
    config = Config(vocab_size=9, cell=cell, hidden=6, layers=2, dtype="float64")
    params = Model(config, seed=4).params
    H = config.hidden
    for layer in range(2):
        W_hh = params[f"weight_hh_l{layer}"]
        for block in np.split(W_hh, W_hh.shape[0] // H):
            np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-12)
        bias = params[f"bias_ih_l{layer}"]
        expected = np.zeros_like(bias)
        if config.has_cell_state:
            expected[H:2 * H] = 1.0
        np.testing.assert_array_equal(bias, expected)
        if cell == "lstm-peephole":     # starts as a plain LSTM
            assert not params[f"weight_peep_l{layer}"].any()
    limit = np.sqrt(6.0 / (H + 9))         # Xavier for the one-hot input block
    assert np.abs(params["weight_ih_l0"]).max() <= limit
    assert np.abs(params["weight_ih_l0"]).max() > 0.8 * limit


@pytest.mark.parametrize("cell", ["lstm-peephole", "gru"])
def test_ignored_targets_carry_no_loss_and_no_gradient(cell):
    """IGNORE positions drop out of the mean: the loss and gradients are the
    finite-difference ones of the mean over the scored positions only."""
    model, x, y, state = _problem(cell, layers=2)
    y[:2] = IGNORE                  # score only the last steps, as a lag task does
    loss, grads, _ = model.loss_and_grads(x, y, state)
    logp, _ = model.log_probs(x, y, state)
    assert np.all(logp[:2] == 0)
    assert loss == pytest.approx(-logp[2:].mean(), rel=1e-12)
    assert _worst_parameter_error(model, x, y, state, grads) < 1

    y[...] = IGNORE                 # nothing scored: zero loss, zero gradient
    loss, grads, _ = model.loss_and_grads(x, y, state)
    assert loss == 0 and all(not g.any() for g in grads.values())
