"""Parity with torch.nn.LSTM/GRU/RNN + nn.Linear given the same weights.

The loss, every parameter gradient, the final state and the gradient for the
initial state must agree with PyTorch's autograd: in float64 to ~1e-10, in
float32 to single-precision round-off. Skipped when PyTorch is not installed.
"""

import numpy as np
import pytest

from charlm.model import TORCH_CELLS, Config, Model, torch_key

torch = pytest.importorskip("torch")

TORCH_MODULES = {
    "lstm": lambda V, H, L: torch.nn.LSTM(V, H, L),
    "gru": lambda V, H, L: torch.nn.GRU(V, H, L),
    "rnn": lambda V, H, L: torch.nn.RNN(V, H, L, nonlinearity="tanh"),
    "rnn-relu": lambda V, H, L: torch.nn.RNN(V, H, L, nonlinearity="relu"),
}


def _setup(cell, layers, dtype, V=11, H=16, T=7, B=5, seed=3):
    config = Config(vocab_size=V, cell=cell, hidden=H, layers=layers, dtype=dtype)
    model = Model(config, seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if "bias" in name:
            p[...] = rng.normal(0, 0.3, p.shape)
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = model.zero_state(B)
    state.h[...] = rng.normal(0, 0.5, state.h.shape)
    if state.c is not None:
        state.c[...] = rng.normal(0, 0.5, state.c.shape)
    return model, x, y, state


class _TorchLM(torch.nn.Module):
    """The module torch_state_dict() is laid out for: rnn + decoder."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.rnn = TORCH_MODULES[c.cell](c.vocab_size, c.hidden, c.layers)
        self.decoder = torch.nn.Linear(c.hidden, c.vocab_size)


def _torch_module(model):
    c = model.config
    tdtype = torch.float64 if c.dtype == "float64" else torch.float32
    module = _TorchLM(c).to(tdtype)
    state_dict = {k: torch.from_numpy(v) for k, v in model.torch_state_dict().items()}
    module.load_state_dict(state_dict, strict=True)   # every key present, no extra
    return module, tdtype


def _torch_run(model, x, y, state):
    c = model.config
    module, tdtype = _torch_module(model)
    rnn, out = module.rnn, module.decoder
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(x).long(), c.vocab_size).to(tdtype)
    h0 = torch.from_numpy(state.h.copy()).requires_grad_()
    if c.cell == "lstm":
        c0 = torch.from_numpy(state.c.copy()).requires_grad_()
        hidden, (hT, cT) = rnn(one_hot, (h0, c0))
    else:
        c0 = cT = None
        hidden, hT = rnn(one_hot, h0)
    logits = out(hidden).reshape(-1, c.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long().reshape(-1))
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    return loss.item(), grads, hT, cT, h0.grad, None if c0 is None else c0.grad


@pytest.mark.parametrize("dtype,rtol,atol", [("float64", 1e-9, 1e-12), ("float32", 2e-4, 2e-6)])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_matches_pytorch(cell, layers, dtype, rtol, atol):
    model, x, y, state = _setup(cell, layers, dtype)
    state_grad = model.zero_state(x.shape[1])
    loss, grads, final = model.loss_and_grads(x, y, state, state_grad=state_grad)
    t_loss, t_grads, hT, cT, dh0, dc0 = _torch_run(model, x, y, state)

    assert loss == pytest.approx(t_loss, rel=rtol)
    assert {torch_key(name) for name in grads} == set(t_grads)
    for name in grads:
        np.testing.assert_allclose(grads[name], t_grads[torch_key(name)], rtol=rtol, atol=atol,
                                   err_msg=name)
    np.testing.assert_allclose(final.h, hT.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(state_grad.h, dh0.numpy(), rtol=rtol, atol=atol)
    if cell == "lstm":
        np.testing.assert_allclose(final.c, cT.detach().numpy(), rtol=rtol, atol=atol)
        np.testing.assert_allclose(state_grad.c, dc0.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_torch_state_dict_round_trips_through_a_torch_module(cell):
    model, x, y, state = _setup(cell, 2, "float64")
    module, _ = _torch_module(model)
    back = Model.from_torch_state_dict(module.state_dict(), cell, dtype="float64")
    assert back.config == model.config
    for name, p in model.params.items():
        np.testing.assert_array_equal(back.params[name], p)
    # and the log-probabilities of the reloaded model are the original's
    np.testing.assert_array_equal(back.log_probs(x, y, state)[0], model.log_probs(x, y, state)[0])
