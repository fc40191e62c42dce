"""The float32 activations of charlm/_fastmath.h against libm (float64 numpy).

The kernels' exp, sigmoid and tanh are inline arithmetic so that the unit
loops vectorise; the LSTM and GRU units also compute two or three
activations with one shared division. Each must stay within a few float32
rounding steps of the correctly rounded value, saturate to within one, and
pass NaN through.
"""

import numpy as np
import pytest

from charlm import _kernels as K

EPS = float(np.finfo(np.float32).eps)


def _arguments():
    rng = np.random.default_rng(0)
    n = 50_000
    return np.concatenate([
        np.linspace(-100, 100, n),                               # the whole range, saturation
        rng.normal(0, 3, n),                                     # where the gates live
        rng.normal(0, 0.1, n),                                   # tanh's series near 0
        np.sign(rng.normal(size=n)) * 10 ** rng.uniform(-30, 2, n),   # tiny to large
        [0.0, -0.0, 0.125, -0.125, 0.12499999, -40.0, -40.5, 88.0, -87.0],
    ]).astype(np.float32)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v.astype(np.float64)))


@pytest.fixture(scope="module")
def results():
    x = _arguments()
    rng = np.random.default_rng(1)
    a, b = rng.permutation(x), rng.permutation(x)
    return a, b, x, K.fast_activations(a, b, x)


def _relative_error(got, exact):
    return np.abs(got.astype(np.float64) - exact) / np.abs(exact)


def test_exp_is_within_one_rounding_step(results):
    a, _, _, out = results
    inside = (a > -87) & (a < 88)
    assert _relative_error(out["exp(a)"][inside], np.exp(a[inside].astype(np.float64))).max() < EPS


@pytest.mark.parametrize("name, arg", [
    ("sigmoid(a)", 0), ("sigmoid2_tanh: sigmoid(a)", 0), ("sigmoid2_tanh: sigmoid(b)", 1),
    ("sigmoid_tanh: sigmoid(a)", 0), ("sigmoid2: sigmoid(a)", 0), ("sigmoid2: sigmoid(b)", 1)])
def test_sigmoids_match_libm(results, name, arg):
    """A few rounding steps down to sigmoid(-40) = 4.2e-18; below it the
    shared-division versions stop at 4.2e-18 (see _fastmath.h), an absolute
    error of at most that."""
    v = results[arg]
    got, exact = results[3][name], _sigmoid(v)
    resolved = v >= -40
    assert _relative_error(got[resolved], exact[resolved]).max() < 3 * EPS
    assert np.abs(got[~resolved] - exact[~resolved]).max() <= 4.3e-18
    # saturated: 1 to within one rounding step (the shared division's
    # cofactor products round on their own, so not always exactly 1)
    assert np.all(np.abs(got[v > 20] - 1) <= EPS)


@pytest.mark.parametrize("name", ["tanh(x)", "sigmoid2_tanh: tanh(x)", "sigmoid_tanh: tanh(x)"])
def test_tanhs_match_libm(results, name):
    x, got = results[2], results[3][name]
    exact = np.tanh(x.astype(np.float64))
    nonzero = x != 0
    assert _relative_error(got[nonzero], exact[nonzero]).max() < 4 * EPS
    assert np.all(got[x == 0] == 0)
    saturated = np.abs(x) > 10
    assert np.all(np.abs(got[saturated] - np.sign(x[saturated])) <= EPS)


def test_nan_gives_nan():
    nan, one = np.float32([np.nan]), np.float32([1.0])
    for name, value in K.fast_activations(nan, nan, nan).items():
        assert np.isnan(value[0]), name
    out = K.fast_activations(one, one, nan)
    assert np.isnan(out["tanh(x)"][0]) and np.isnan(out["sigmoid_tanh: tanh(x)"][0])
    out = K.fast_activations(nan, one, one)
    assert np.isnan(out["sigmoid(a)"][0]) and np.isnan(out["sigmoid2: sigmoid(a)"][0])
