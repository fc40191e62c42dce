"""The PyTorch twin of a charlm model, for the side-by-side benchmarks.

`rnn = nn.LSTM/GRU/RNN(V, H, L)` and `decoder = nn.Linear(H, V)` in a
ModuleDict, loaded strictly from `Model.torch_state_dict()`, so both
frameworks start from the very same weights.
"""


def torch_twin(model, torch, dtype=None):
    """A torch.nn.ModuleDict {"rnn", "decoder"} holding `model`'s weights."""
    c = model.config
    if c.cell in ("rnn", "rnn-relu"):
        nonlinearity = "relu" if c.cell == "rnn-relu" else "tanh"
        rnn = torch.nn.RNN(c.vocab_size, c.hidden, c.layers, nonlinearity=nonlinearity)
    else:
        rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[c.cell](
            c.vocab_size, c.hidden, c.layers)
    twin = torch.nn.ModuleDict({"rnn": rnn, "decoder": torch.nn.Linear(c.hidden, c.vocab_size)})
    twin = twin.to(dtype or getattr(torch, c.dtype))
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.torch_state_dict().items()},
                         strict=True)
    return twin
