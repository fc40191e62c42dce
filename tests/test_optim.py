"""Optimisers, gradient clipping and learning-rate schedules (charlm.optim).

The optimisers are checked three ways: against the update equations written
out by hand for the first steps, against torch.optim over 20 steps with a
changing learning rate (skipped without PyTorch), and by minimising a
quadratic. Checkpoint round trips must continue bit for bit; corrupted state
must be refused. Clipping and schedules are checked at chosen values.
"""

import json
import math
import tracemalloc

import numpy as np
import pytest

from charlm.errors import ModelFileError, UsageError
from charlm.optim import (OPTIMIZERS, Schedule, clip_by_global_norm, clip_by_value,
                          global_norm, make_optimizer)


def _params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {"weight_hh_l0": rng.normal(0, 1, (4, 3)).astype(dtype),
            "out.bias": rng.normal(0, 1, (5,)).astype(dtype)}


def _grads(params, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 1, p.shape).astype(p.dtype) for k, p in params.items()}
            for _ in range(steps)]


def _copy(arrays):
    return {k: v.copy() for k, v in arrays.items()}


# -- the equations, step by step ---------------------------------------------------

def _reference(name, p, grads, lr, **h):
    """The update equations written out plainly (no in-place tricks) for one array."""
    p = p.copy()
    state = [np.zeros_like(p), np.zeros_like(p)]
    for t, g in enumerate(grads, start=1):
        if name != "adam":
            g = g + h.get("weight_decay", 0.0) * p
        if name == "sgd":
            mu = h["momentum"]
            state[0] = mu * state[0] + g
            p = p - lr * ((g + mu * state[0]) if h["nesterov"] else state[0])
        elif name == "rmsprop":
            a = h["alpha"]
            state[0] = a * state[0] + (1 - a) * g * g
            p = p - lr * g / (np.sqrt(state[0]) + h["eps"])
        elif name == "adagrad":
            state[0] = state[0] + g * g
            p = p - lr * g / (np.sqrt(state[0]) + h["eps"])
        else:
            b1, b2 = h["betas"]
            state[0] = b1 * state[0] + (1 - b1) * g
            state[1] = b2 * state[1] + (1 - b2) * g * g
            m_hat, v_hat = state[0] / (1 - b1 ** t), state[1] / (1 - b2 ** t)
            p = p - lr * h.get("weight_decay", 0.0) * p
            p = p - lr * m_hat / (np.sqrt(v_hat) + h["eps"])
    return p


HAND_CASES = [
    ("sgd", {"momentum": 0.9, "nesterov": False}),
    ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-3}),
    ("rmsprop", {"alpha": 0.95, "eps": 1e-8, "weight_decay": 0.05}),
    ("adagrad", {"eps": 1e-3, "weight_decay": 0.1}),
    ("adam", {"betas": (0.9, 0.999), "eps": 1e-3}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.2}),
]


@pytest.mark.parametrize("name, hyper", HAND_CASES)
def test_first_three_steps_follow_the_equations(name, hyper):
    p0 = np.array([0.5, -1.0, 2.0, 0.0])
    grads = [np.array([1.0, -2.0, 0.5, 3.0]), np.array([-0.5, -1.0, 1.5, 0.0]),
             np.array([2.0, 0.25, -1.0, -3.0])]
    params = {"w": p0.copy()}
    opt = make_optimizer(name, params, 0.1, **hyper)
    for i, g in enumerate(grads, start=1):
        opt.step({"w": g})
        expected = _reference(name, p0, grads[:i], 0.1, **hyper)
        np.testing.assert_allclose(params["w"], expected, rtol=1e-13, atol=1e-15)
    assert opt.step_count == 3



# Adam and RMSProp run as one fused kernel per parameter: every length around
# the vector widths, in both dtypes, must follow the equations.
@pytest.mark.parametrize("name, hyper", [c for c in HAND_CASES if c[0] in ("adam", "rmsprop")])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_fused_updates_follow_the_equations_at_every_length(name, hyper, dtype, rtol):
    rng = np.random.default_rng(7)
    for n in (1, 2, 7, 8, 15, 16, 17, 31, 33, 64, 65, 1000):
        p0 = rng.normal(0, 1, n).astype(dtype)
        grads = [rng.normal(0, 1, n).astype(dtype) for _ in range(3)]
        params = {"w": p0.copy()}
        opt = make_optimizer(name, params, 0.1, **hyper)
        for g in grads:
            opt.step({"w": g})
        expected = _reference(name, p0.astype(np.float64), [g.astype(np.float64) for g in grads],
                              0.1, **hyper)
        np.testing.assert_allclose(params["w"], expected, rtol=rtol, atol=rtol, err_msg=f"n={n}")

# Constant gradient g = 2 from p = 1 with lr = 0.1, worked out on paper.
PAPER = {
    # v = 2, 3.8, 5.42 -> p = 1 - 0.1 * (2 + 3.8 + 5.42)
    ("sgd", False): ({"momentum": 0.9}, 1 - 0.1 * (2 + 3.8 + 5.42)),
    # update g + 0.9 v = 3.8, 5.42, 6.878
    ("sgd", True): ({"momentum": 0.9, "nesterov": True}, 1 - 0.1 * (3.8 + 5.42 + 6.878)),
    # E = 2, 3, 3.5 (alpha 0.5): steps 2/sqrt(E)
    ("rmsprop", None): ({"alpha": 0.5, "eps": 0.0 + 1e-300},
                        1 - 0.1 * 2 * (1 / math.sqrt(2) + 1 / math.sqrt(3) + 1 / math.sqrt(3.5))),
    # G = 4, 8, 12
    ("adagrad", None): ({"eps": 1e-300},
                        1 - 0.1 * 2 * (1 / 2 + 1 / math.sqrt(8) + 1 / math.sqrt(12))),
    # bias-corrected m_hat = 2 and v_hat = 4 at every step: each step is lr * 2 / (2 + eps)
    ("adam", None): ({"eps": 1e-8}, 1 - 3 * 0.1 * 2 / (2 + 1e-8)),
}


@pytest.mark.parametrize("case", list(PAPER), ids=str)
def test_three_steps_with_constant_gradient_match_paper_values(case):
    options, expected = PAPER[case]
    params = {"w": np.array([1.0])}
    opt = make_optimizer(case[0], params, 0.1, **options)
    for _ in range(3):
        opt.step({"w": np.array([2.0])})
    assert params["w"][0] == pytest.approx(expected, rel=1e-14)


def test_learning_rate_is_read_at_every_step():
    params = {"w": np.array([1.0])}
    opt = make_optimizer("sgd", params, 0.1, momentum=0.0)
    opt.step({"w": np.array([1.0])})
    opt.lr = 0.01
    opt.step({"w": np.array([1.0])})
    assert params["w"][0] == pytest.approx(1 - 0.1 - 0.01, rel=1e-15)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_leaves_the_gradients_alone(name):
    params = _params()
    grads = _grads(params, 1)[0]
    before = _copy(grads)
    make_optimizer(name, params, 0.1, weight_decay=0.1).step(grads)
    for k in grads:
        assert np.array_equal(grads[k], before[k])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_allocates_no_parameter_sized_arrays(name):
    params = {"w": np.zeros(200_000, np.float32)}     # 800 kB
    grads = {"w": np.full(200_000, 0.5, np.float32)}
    opt = make_optimizer(name, params, 0.1, weight_decay=0.01)
    opt.step(grads)                                   # any lazy buffers exist now
    tracemalloc.start()
    try:
        opt.step(grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000


# -- parity with torch.optim -------------------------------------------------------

TORCH_CASES = [
    ("sgd", {"momentum": 0.9}, "SGD", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.7, "nesterov": True, "weight_decay": 0.01},
     "SGD", {"momentum": 0.7, "nesterov": True, "weight_decay": 0.01}),
    ("rmsprop", {"alpha": 0.95, "eps": 1e-8}, "RMSprop", {"alpha": 0.95, "eps": 1e-8}),
    ("rmsprop", {"decay": 0.9, "eps": 1e-6, "weight_decay": 0.01},
     "RMSprop", {"alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01}),
    ("adam", {"betas": (0.9, 0.999), "eps": 1e-8}, "Adam", {"betas": (0.9, 0.999), "eps": 1e-8}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
     "AdamW", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("adagrad", {"eps": 1e-10}, "Adagrad", {"eps": 1e-10}),
    ("adagrad", {"eps": 1e-10, "weight_decay": 0.01},
     "Adagrad", {"eps": 1e-10, "weight_decay": 0.01}),
]


@pytest.mark.parametrize("name, options, torch_name, torch_options", TORCH_CASES)
def test_matches_torch_optim_over_20_steps(name, options, torch_name, torch_options):
    torch = pytest.importorskip("torch")
    params = _params(np.float64)
    torch_params = [torch.tensor(p, requires_grad=True) for p in params.values()]
    opt = make_optimizer(name, params, 0.01, **options)
    torch_opt = getattr(torch.optim, torch_name)(torch_params, lr=0.01, **torch_options)
    for i, grads in enumerate(_grads(params, 20)):
        lr = 0.01 * (1 + 0.5 * math.sin(i))        # a changing rate, as from a schedule
        opt.lr = lr
        for group in torch_opt.param_groups:
            group["lr"] = lr
        for tp, g in zip(torch_params, grads.values()):
            tp.grad = torch.from_numpy(g.copy())
        opt.step(grads)
        torch_opt.step()
    for p, tp in zip(params.values(), torch_params):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-11, atol=1e-13)


# -- minimising a quadratic ----------------------------------------------------------

@pytest.mark.parametrize("name, lr", [("sgd", 0.05), ("rmsprop", 0.05), ("adam", 0.05),
                                      ("adagrad", 0.5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minimises_a_quadratic(name, lr, dtype):
    """f(p) = 1/2 sum a (p - c)^2 with curvatures from 0.5 to 4."""
    rng = np.random.default_rng(5)
    a = np.linspace(0.5, 4.0, 20).astype(dtype)
    c = rng.normal(0, 1, 20).astype(dtype)
    params = {"p": rng.normal(0, 3, 20).astype(dtype)}
    grads = {"p": np.empty(20, dtype)}

    def loss():
        return float(0.5 * np.sum(a * (params["p"] - c) ** 2))

    start = loss()
    opt = make_optimizer(name, params, lr)
    schedule = Schedule("cosine", lr, total_steps=400)   # the adaptive ones settle as lr -> 0
    for step in range(400):
        np.multiply(a, params["p"] - c, out=grads["p"])
        opt.lr = schedule.lr_at(step)
        opt.step(grads)
    assert loss() < 1e-4 * start


# -- checkpoints ---------------------------------------------------------------------

NON_DEFAULT = {"sgd": {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01},
               "rmsprop": {"alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01},
               "adam": {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
               "adagrad": {"eps": 1e-6, "weight_decay": 0.01}}


def _through_files(tensors, meta):
    """What a checkpoint does to the state: safetensors for arrays, JSON for meta."""
    from safetensors.numpy import load, save
    return load(save(tensors)), json.loads(json.dumps(meta))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trip_continues_bit_for_bit(name, dtype):
    params_a = _params(dtype)
    grads = _grads(params_a, 10)
    a = make_optimizer(name, params_a, 0.03, **NON_DEFAULT[name])
    for g in grads[:5]:
        a.step(g)
    tensors, meta = _through_files(a.state_tensors(), a.state_meta())
    # B starts from defaults: the checkpoint must restore the hyper-parameters too.
    params_b = _copy(params_a)
    b = make_optimizer(meta["name"], params_b, meta["lr"])
    b.load_state(tensors, meta)
    assert b.step_count == 5 and b.hyper == a.hyper
    for g in grads[5:]:
        a.step(g)
        b.step(g)
    for k in params_a:
        assert params_a[k].tobytes() == params_b[k].tobytes()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_continuing_without_the_state_differs(name):
    """The control for the round trip: a fresh optimiser does not continue the run."""
    params_a = _params()
    grads = _grads(params_a, 10)
    a = make_optimizer(name, params_a, 0.03)
    for g in grads[:5]:
        a.step(g)
    params_b = _copy(params_a)
    b = make_optimizer(name, params_b, 0.03)
    for g in grads[5:]:
        a.step(g)
        b.step(g)
    assert not np.array_equal(params_a["out.bias"], params_b["out.bias"])


def test_state_names_and_arrays():
    params = _params(np.float32)
    opt = make_optimizer("adam", params, 0.01)
    opt.step(_grads(params, 1)[0])
    tensors = opt.state_tensors()
    assert set(tensors) == {"adam.m/weight_hh_l0", "adam.m/out.bias",
                            "adam.v/weight_hh_l0", "adam.v/out.bias"}
    for key, t in tensors.items():
        assert t.flags.c_contiguous and t.dtype == np.float32
        assert t.shape == params[key.split("/", 1)[1]].shape
    assert opt.state_meta() == {"name": "adam", "step_count": 1, "lr": 0.01, "beta1": 0.9,
                                "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    # Copies: changing them does not change the optimiser.
    tensors["adam.m/out.bias"][...] = 7
    assert not np.any(opt.state_tensors()["adam.m/out.bias"] == 7)


def _corrupt(change):
    def apply(tensors, meta):
        change(tensors, meta)
        return tensors, meta
    return apply


CORRUPTIONS = {
    "missing tensor": _corrupt(lambda t, m: t.pop("adam.v/out.bias")),
    "extra tensor": _corrupt(lambda t, m: t.update({"adam.m/other": np.zeros(3)})),
    "renamed tensor": _corrupt(lambda t, m: t.update({"adam.m/bias": t.pop("adam.m/out.bias")})),
    "wrong shape": _corrupt(lambda t, m: t.update({"adam.m/out.bias": np.zeros(6)})),
    "transposed": _corrupt(lambda t, m: t.update(
        {"adam.m/weight_hh_l0": np.ascontiguousarray(t["adam.m/weight_hh_l0"].T)})),
    "wrong dtype": _corrupt(lambda t, m: t.update(
        {"adam.m/out.bias": t["adam.m/out.bias"].astype(np.float32)})),
    "NaN": _corrupt(lambda t, m: t["adam.m/weight_hh_l0"].__setitem__((1, 2), np.nan)),
    "inf": _corrupt(lambda t, m: t["adam.v/out.bias"].__setitem__(0, np.inf)),
    "negative second moment": _corrupt(lambda t, m: t["adam.v/out.bias"].__setitem__(0, -1.0)),
    "other optimiser": _corrupt(lambda t, m: m.update(name="rmsprop")),
    "no metadata": _corrupt(lambda t, m: m.clear()),
    "negative step count": _corrupt(lambda t, m: m.update(step_count=-1)),
    "text step count": _corrupt(lambda t, m: m.update(step_count="5")),
    "NaN lr": _corrupt(lambda t, m: m.update(lr=float("nan"))),
    "beta out of range": _corrupt(lambda t, m: m.update(beta1=1.5)),
    "missing meta key": _corrupt(lambda t, m: m.pop("eps")),
    "unknown meta key": _corrupt(lambda t, m: m.update(momentum=0.9)),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_load_state_refuses_mismatches_and_changes_nothing(corruption):
    params = _params()
    grads = _grads(params, 3)
    source = make_optimizer("adam", _copy(params), 0.01)
    for g in grads:
        source.step(g)
    tensors, meta = CORRUPTIONS[corruption](source.state_tensors(), source.state_meta())
    target = make_optimizer("adam", params, 0.02)
    target.step(grads[0])
    before = target.state_tensors()
    with pytest.raises(ModelFileError):
        target.load_state(tensors, meta)
    assert target.step_count == 1 and target.lr == 0.02
    for key, value in target.state_tensors().items():
        assert np.array_equal(value, before[key])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_refuses_another_optimisers_state(name):
    params = _params()
    other = "sgd" if name != "sgd" else "adam"
    source = make_optimizer(other, _copy(params), 0.01)
    with pytest.raises(ModelFileError, match=other):
        make_optimizer(name, params, 0.01).load_state(source.state_tensors(),
                                                      source.state_meta())


# -- construction errors -------------------------------------------------------------

BAD_CONSTRUCTIONS = [
    ("adamax", 0.01, {}),
    ("adam", 0.0, {}),
    ("adam", -0.1, {}),
    ("adam", float("nan"), {}),
    ("adam", "0.01", {}),
    ("sgd", 0.01, {"momentum": 1.0}),
    ("sgd", 0.01, {"momentum": -0.1}),
    ("sgd", 0.01, {"momentum": 0.0, "nesterov": True}),
    ("sgd", 0.01, {"nesterov": "yes"}),
    ("sgd", 0.01, {"betas": (0.9, 0.99)}),
    ("adam", 0.01, {"betas": (0.9,)}),
    ("adam", 0.01, {"betas": (0.9, 1.0)}),
    ("adam", 0.01, {"eps": 0.0}),
    ("adam", 0.01, {"weight_decay": -1e-4}),
    ("rmsprop", 0.01, {"alpha": 0.9, "decay": 0.9}),
    ("rmsprop", 0.01, {"alpha": 1.0}),
    ("adagrad", 0.01, {"momentum": 0.9}),
]


@pytest.mark.parametrize("name, lr, options", BAD_CONSTRUCTIONS)
def test_invalid_optimiser_arguments_raise_usage_error(name, lr, options):
    with pytest.raises(UsageError):
        make_optimizer(name, _params(), lr, **options)


@pytest.mark.parametrize("params", [
    {},
    {"w": np.zeros(3, np.int32)},
    {"w": np.zeros((4, 4))[:, ::2]},
    {"w": [0.0, 1.0]},
])
def test_invalid_parameters_raise_usage_error(params):
    with pytest.raises(UsageError):
        make_optimizer("sgd", params, 0.01)


def test_none_options_mean_defaults_and_decay_is_alpha():
    opt = make_optimizer("sgd", _params(), 0.01, momentum=None, nesterov=None, betas=None)
    assert opt.hyper == {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    assert make_optimizer("rmsprop", _params(), 0.01).hyper["alpha"] == 0.95
    assert make_optimizer("rmsprop", _params(), 0.01, decay=0.9).hyper["alpha"] == 0.9


def test_setting_a_bad_learning_rate_raises_usage_error():
    opt = make_optimizer("adam", _params(), 0.01)
    with pytest.raises(UsageError):
        opt.lr = float("inf")
    opt.lr = 0.0                                      # allowed: a schedule may reach zero
    assert opt.lr == 0.0


# -- clipping ------------------------------------------------------------------------

def _norm64(grads):
    return float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())))


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-13)])
def test_clip_by_global_norm_keeps_direction_and_hits_max_norm(dtype, rtol):
    grads = {k: 10 * g for k, g in _grads(_params(dtype), 1)[0].items()}
    original = _copy(grads)
    norm, clipped = clip_by_global_norm(grads, 2.0)
    assert clipped
    assert norm == pytest.approx(_norm64(original), rel=rtol)
    assert global_norm(grads) == pytest.approx(2.0, rel=rtol)
    for k in grads:          # every element scaled by the same factor
        np.testing.assert_allclose(grads[k], original[k] * (2.0 / norm), rtol=rtol)


def test_clip_by_global_norm_is_a_no_op_below_the_limit():
    grads = _grads(_params(), 1)[0]
    original = _copy(grads)
    norm, clipped = clip_by_global_norm(grads, 100.0)
    assert not clipped and norm == pytest.approx(_norm64(original), rel=1e-14)
    for k in grads:
        assert np.array_equal(grads[k], original[k])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_by_global_norm_leaves_non_finite_gradients_for_the_caller(bad):
    grads = _grads(_params(), 1)[0]
    grads["out.bias"][2] = bad
    original = _copy(grads)
    norm, clipped = clip_by_global_norm(grads, 1.0)
    assert not math.isfinite(norm) and not clipped
    for k in grads:
        np.testing.assert_array_equal(grads[k], original[k])


def test_clip_by_global_norm_matches_torch():
    torch = pytest.importorskip("torch")
    grads = {k: 5 * g for k, g in _grads(_params(), 1)[0].items()}
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
               for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.from_numpy(g.copy())
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, 1.5)
    norm, _ = clip_by_global_norm(grads, 1.5)
    assert norm == pytest.approx(float(torch_norm), rel=1e-14)
    for t, g in zip(tensors, grads.values()):
        # torch divides by norm + 1e-6; norm here is ~20, hence rtol 1e-7.
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-7)


def test_global_norm_at_every_length():
    rng = np.random.default_rng(5)
    for n in list(range(1, 40)) + [1001]:
        for dtype in (np.float32, np.float64):
            g = rng.normal(0, 1, n).astype(dtype)
            exact = math.sqrt(math.fsum(float(v) ** 2 for v in g))
            assert global_norm({"g": g}) == pytest.approx(exact, rel=1e-13), (n, dtype)
    # a non-contiguous gradient is read as its values
    strided = np.arange(12.0).reshape(3, 4)[:, ::2]
    assert global_norm({"g": strided}) == pytest.approx(np.sqrt((strided ** 2).sum()))


def test_global_norm_accumulates_float32_in_float64():
    huge = {"a": np.full(10, 1e20, np.float32), "b": np.full((2, 3), -1e20, np.float32)}
    assert global_norm(huge) == pytest.approx(4e20, rel=1e-6)       # sqrt(16) * 1e20
    tiny = {"a": np.full(100, 1e-30, np.float32)}                  # squares underflow in f32
    assert global_norm(tiny) == pytest.approx(1e-29, rel=1e-6)
    assert global_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == 5.0


def test_clip_by_value_clamps_elements_and_turns_the_direction():
    grads = {"a": np.array([0.5, -3.0, 2.0]), "b": np.array([[0.1, 10.0]])}
    original = _copy(grads)
    assert clip_by_value(grads, 1.0)
    np.testing.assert_array_equal(grads["a"], [0.5, -1.0, 1.0])
    np.testing.assert_array_equal(grads["b"], [[0.1, 1.0]])
    before = np.concatenate([g.ravel() for g in original.values()])
    after = np.concatenate([g.ravel() for g in grads.values()])
    cosine = before @ after / (np.linalg.norm(before) * np.linalg.norm(after))
    assert cosine < 0.95          # unlike global-norm clipping, the direction changes


def test_clip_by_value_reports_no_clipping_within_the_limit():
    grads = {"a": np.array([0.5, -1.0, 1.0])}
    assert not clip_by_value(grads, 1.0)
    np.testing.assert_array_equal(grads["a"], [0.5, -1.0, 1.0])


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan"), float("inf")])
def test_clipping_limits_must_be_positive_and_finite(limit):
    with pytest.raises(UsageError):
        clip_by_global_norm({"a": np.ones(3)}, limit)
    with pytest.raises(UsageError):
        clip_by_value({"a": np.ones(3)}, limit)


# -- schedules -----------------------------------------------------------------------

SCHEDULE_VALUES = [
    (Schedule("constant", 0.1), {0: 0.1, 1: 0.1, 10_000: 0.1}),
    (Schedule("cosine", 1.0, total_steps=10, min_lr_frac=0.1),
     {0: 1.0, 5: 0.55, 10: 0.1, 50: 0.1,
      2: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2))}),
    (Schedule("linear", 2.0, total_steps=10), {0: 2.0, 3: 1.4, 5: 1.0, 10: 0.0, 11: 0.0}),
    (Schedule("step", 1.0, decay_rate=0.5, decay_every=3),
     {0: 1.0, 2: 1.0, 3: 0.5, 5: 0.5, 6: 0.25, 30: 0.5 ** 10}),
    (Schedule("step", 1.0, decay_rate=0.5, decay_every=3, min_lr_frac=0.3),
     {3: 0.5, 6: 0.3, 100: 0.3}),
    # Warmup: (step + 1) / warmup of base, then the decay starts from base.
    (Schedule("constant", 1.0, warmup_steps=4), {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0}),
    (Schedule("cosine", 1.0, total_steps=14, warmup_steps=4),
     {0: 0.25, 3: 1.0, 4: 1.0, 9: 0.5, 14: 0.0}),
    (Schedule("linear", 1.0, total_steps=12, warmup_steps=2, min_lr_frac=0.5),
     {0: 0.5, 1: 1.0, 2: 1.0, 7: 0.75, 12: 0.5}),
    (Schedule("step", 0.1, warmup_steps=10, decay_rate=0.1, decay_every=100),
     {0: 0.01, 9: 0.1, 109: 0.1, 110: 0.01}),
]


@pytest.mark.parametrize("schedule, values", SCHEDULE_VALUES, ids=lambda x: str(x)[:60])
def test_schedule_values_at_chosen_steps(schedule, values):
    for step, expected in values.items():
        assert schedule.lr_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("schedule", [s for s, _ in SCHEDULE_VALUES], ids=lambda x: str(x)[:60])
def test_schedule_round_trips_through_json(schedule):
    again = Schedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert again == schedule
    assert [again.lr_at(s) for s in range(40)] == [schedule.lr_at(s) for s in range(40)]


@pytest.mark.parametrize("kwargs", [
    {"kind": "exponential", "base_lr": 0.1},
    {"kind": "constant", "base_lr": 0.0},
    {"kind": "constant", "base_lr": -0.1},
    {"kind": "constant", "base_lr": float("nan")},
    {"kind": "constant", "base_lr": 0.1, "warmup_steps": -1},
    {"kind": "constant", "base_lr": 0.1, "warmup_steps": 2.5},
    {"kind": "cosine", "base_lr": 0.1},
    {"kind": "linear", "base_lr": 0.1, "total_steps": 0},
    {"kind": "cosine", "base_lr": 0.1, "total_steps": 10, "warmup_steps": 10},
    {"kind": "step", "base_lr": 0.1},
    {"kind": "step", "base_lr": 0.1, "decay_every": 0},
    {"kind": "step", "base_lr": 0.1, "decay_every": 5, "decay_rate": 0.0},
    {"kind": "step", "base_lr": 0.1, "decay_every": 5, "decay_rate": 1.5},
    {"kind": "cosine", "base_lr": 0.1, "total_steps": 10, "min_lr_frac": 1.5},
])
def test_invalid_schedules_raise_usage_error(kwargs):
    with pytest.raises(UsageError):
        Schedule(**kwargs)


@pytest.mark.parametrize("d", [
    ["constant", 0.1],
    {"kind": "constant"},
    {"kind": "constant", "base_lr": 0.1, "gamma": 0.5},
])
def test_invalid_schedule_dicts_raise_usage_error(d):
    with pytest.raises(UsageError):
        Schedule.from_dict(d)


def test_negative_step_raises_usage_error():
    with pytest.raises(UsageError):
        Schedule("constant", 0.1).lr_at(-1)
