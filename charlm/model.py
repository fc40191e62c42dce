"""The recurrent language model: configuration, parameters, and the passes.

A model is a stack of recurrent layers (RNN, LSTM or GRU) over one-hot
characters, topped by a linear output layer and a softmax. The arithmetic is
done by the Cython kernels in charlm._kernels; this module owns the
parameters, the buffers and the order of the calls.

Parameter names and layouts follow PyTorch (``weight_ih_l0``, ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0`` ... and ``out.weight``, ``out.bias``), so weights
move to and from ``torch.nn.LSTM/GRU/RNN`` + ``torch.nn.Linear`` exactly.
"""

from dataclasses import asdict, dataclass

import numpy as np

from . import _kernels as K
from .errors import UsageError

CELLS = ("lstm", "gru", "rnn", "rnn-relu", "lstm-peephole")
GATES_PER_UNIT = {"lstm": 4, "gru": 3, "rnn": 1, "rnn-relu": 1, "lstm-peephole": 4}
LSTM_CELLS = ("lstm", "lstm-peephole")     # the cells with a cell state c
TORCH_CELLS = ("lstm", "gru", "rnn", "rnn-relu")   # those with a torch.nn twin
DTYPES = {"float32": np.float32, "float64": np.float64}
MAX_HIDDEN = 16384
MAX_LAYERS = 64
MAX_WORKSPACES = 3   # training, validation and sampling shapes
IGNORE = K.IGNORE_TARGET   # a target id that means "no loss at this position"


@dataclass(frozen=True)
class Config:
    """What defines a model's architecture (saved in every model file)."""

    vocab_size: int
    cell: str = "lstm"
    hidden: int = 128
    layers: int = 2
    dtype: str = "float32"

    def __post_init__(self):
        _require_int("vocab_size", self.vocab_size, 1, 2**31 - 1)
        _require_int("hidden", self.hidden, 1, MAX_HIDDEN)
        _require_int("layers", self.layers, 1, MAX_LAYERS)
        if self.cell not in CELLS:
            raise UsageError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose float32 or float64")

    @property
    def gates(self):
        """Rows of gate pre-activations per layer: G = gates_per_unit * hidden."""
        return GATES_PER_UNIT[self.cell] * self.hidden

    @property
    def has_cell_state(self):
        """True for the LSTMs, whose state is (h, c); the others carry h only."""
        return self.cell in LSTM_CELLS

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise UsageError("model config must be a JSON object")
        known = {"vocab_size", "cell", "hidden", "layers", "dtype"}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def _require_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}")


def parameter_shapes(config):
    """Name -> shape of every parameter, in PyTorch's layout and naming."""
    V, H, G = config.vocab_size, config.hidden, config.gates
    shapes = {}
    for layer in range(config.layers):
        inputs = V if layer == 0 else H
        shapes[f"weight_ih_l{layer}"] = (G, inputs)
        shapes[f"weight_hh_l{layer}"] = (G, H)
        shapes[f"bias_ih_l{layer}"] = (G,)
        shapes[f"bias_hh_l{layer}"] = (G,)
        if config.cell == "lstm-peephole":
            shapes[f"weight_peep_l{layer}"] = (3, H)     # [w_ci | w_cf | w_co]
    shapes["out.weight"] = (V, H)
    shapes["out.bias"] = (V,)
    return shapes


def init_parameters(config, seed=0):
    """Xavier-uniform input and output weights, orthogonal recurrent weights,
    zero biases, and an LSTM forget-gate bias of 1.

    Xavier (Glorot) keeps the variance of activations and gradients roughly
    constant from layer to layer at the start; each gate block is its own
    (H, inputs) matrix, so the limit is computed per block. Each recurrent
    gate block is an orthogonal (H, H) matrix: all its singular values are 1,
    so at the start repeated multiplication through time neither shrinks nor
    blows up the gradient (the vanishing/exploding-gradient story, avoided at
    step 0). The forget bias of 1 starts the LSTM remembering, which helps
    gradients flow early on (Jozefowicz et al., 2015). Peephole weights start
    at 0: the peephole LSTM starts as the plain one and learns how much to
    look at its cell state.
    """
    rng = np.random.default_rng(seed)
    dtype = config.np_dtype
    H = config.hidden
    params = {}
    for name, shape in parameter_shapes(config).items():
        if len(shape) == 1 or name.startswith("weight_peep"):
            params[name] = np.zeros(shape, dtype)
        elif name.startswith("weight_hh"):
            blocks = [_orthogonal(rng, H) for _ in range(shape[0] // H)]
            params[name] = np.concatenate(blocks).astype(dtype)
        else:
            rows, cols = shape
            block_rows = H if name.startswith("weight_") else rows
            limit = np.sqrt(6.0 / (block_rows + cols))
            params[name] = rng.uniform(-limit, limit, shape).astype(dtype)
    if config.has_cell_state:
        for layer in range(config.layers):
            params[f"bias_ih_l{layer}"][H:2 * H] = 1.0
    # on cache lines, as every array the kernels stream (K.aligned_empty)
    return {name: K.aligned_copy(p) for name, p in params.items()}


def _orthogonal(rng, n):
    """A random (n, n) orthogonal matrix: Q of the QR of a Gaussian matrix,
    with the signs fixed so that Q is uniformly distributed (Haar)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@dataclass
class State:
    """The recurrent state carried between chunks: h (and c for LSTM), (layers, B, H)."""

    h: np.ndarray
    c: np.ndarray = None

    def copy(self):
        return State(self.h.copy(), None if self.c is None else self.c.copy())


class _LayerCache:
    """What one layer's forward pass keeps for its backward pass."""

    def __init__(self, config, T, B):
        H, G, dtype = config.hidden, config.gates, config.np_dtype
        # on cache lines (K.aligned_empty): the kernels' vector loads and
        # stores on an array 16 bytes off the line each touched two lines
        self.gates = K.aligned_empty((T, B, G), dtype)  # activated gates (or pre-activations)
        self.h = K.aligned_empty((T + 1, B, H), dtype)  # h[0] = initial state
        self.output = self.h[1:]  # what the next layer sees
        self.dropout_mask = None
        # backward buffers, allocated with the forward ones and reused
        # dL/d(gate pre-activations); the LSTM's backward writes them over its gates
        self.dgates = self.gates if config.has_cell_state else K.aligned_empty((T, B, G), dtype)
        self.dh_carry = K.aligned_empty((B, H), dtype)  # dL/dh flowing back through time
        self.d_input = K.aligned_empty((T * B, H), dtype)  # dL/d(layer input) (unused for layer 0)
        if config.has_cell_state:
            self.c = K.aligned_empty((T + 1, B, H), dtype)
            self.tanh_c = K.aligned_empty((T, B, H), dtype)
            self.dc_carry = K.aligned_empty((B, H), dtype)
        if config.cell == "gru":
            self.hn = K.aligned_empty((T, B, H), dtype)
            self.hh = K.aligned_empty((B, G), dtype)
            self.dgates_h = K.aligned_empty((T, B, G), dtype)  # dL/d(W_hh h + b_hh)


@dataclass
class _Workspace:
    """Every buffer the passes over a (T, B) chunk need."""

    caches: list
    logits: np.ndarray      # (T*B, V), overwritten by dlogits in training
    d_top: np.ndarray       # (T*B, H): dL/d(top layer's output)
    W_ihT: np.ndarray       # (V, G): the first layer's input weights, transposed for the gather
    dW_ihT: np.ndarray      # (V, G): the scatter-added first-layer gradient


class Model:
    """A character-level recurrent language model.

    Example:
        >>> from charlm.model import Config, Model
        >>> m = Model(Config(vocab_size=5, cell="lstm", hidden=8, layers=2))
        >>> x = np.zeros((4, 3), np.int32); y = np.ones((4, 3), np.int32)
        >>> loss, grads, state = m.loss_and_grads(x, y, m.zero_state(3))
    """

    def __init__(self, config, params=None, seed=0):
        self.config = config
        self.params = init_parameters(config, seed) if params is None else params
        self._check_params()
        self.grads = {k: K.aligned_zeros(v.shape, v.dtype) for k, v in self.params.items()}
        self._workspaces = {}
        self._current = None

    def replica(self):
        """A Model that shares this one's parameter arrays but has its own
        gradient and workspace buffers, for passes run on another thread."""
        return Model(self.config, self.params)

    # -- state ---------------------------------------------------------------

    def zero_state(self, batch_size):
        """The all-zero initial state for `batch_size` streams."""
        c = self.config
        shape = (c.layers, batch_size, c.hidden)
        h = np.zeros(shape, c.np_dtype)
        return State(h, np.zeros(shape, c.np_dtype) if c.has_cell_state else None)

    @property
    def num_parameters(self):
        return int(sum(p.size for p in self.params.values()))

    # -- exchange with PyTorch -------------------------------------------------

    def torch_state_dict(self):
        """The parameters under the keys of a torch module with
        ``rnn = nn.LSTM(V, H, L)`` (or nn.GRU, or nn.RNN with the same
        nonlinearity) and ``decoder = nn.Linear(H, V)``, as numpy copies.

        Load them with ``module.load_state_dict({k: torch.from_numpy(v) ...})``;
        for one-hot inputs the module then gives the same log-probabilities.
        """
        if self.config.cell not in TORCH_CELLS:
            raise UsageError(f"a {self.config.cell} has no PyTorch counterpart")
        return {torch_key(name): p.copy() for name, p in self.params.items()}

    @classmethod
    def from_torch_state_dict(cls, state_dict, cell, dtype="float32"):
        """The inverse of torch_state_dict: a Model from numpy (or torch CPU)
        arrays under ``rnn.*`` and ``decoder.*`` keys. The sizes are read from
        the shapes; the keys and shapes must then match exactly."""
        if cell not in TORCH_CELLS:
            raise UsageError(f"a {cell} has no PyTorch counterpart")
        arrays = {key: np.asarray(value) for key, value in state_dict.items()}
        if "decoder.weight" not in arrays or arrays["decoder.weight"].ndim != 2:
            raise UsageError("state dict lacks a 2-D decoder.weight")
        vocab_size, hidden = arrays["decoder.weight"].shape
        layers = sum(1 for key in arrays if key.startswith("rnn.weight_hh_l"))
        config = Config(vocab_size=vocab_size, cell=cell, hidden=hidden,
                        layers=layers, dtype=dtype)
        expected = {torch_key(name): shape for name, shape in parameter_shapes(config).items()}
        if set(arrays) != set(expected):
            raise UsageError(f"state dict keys do not match a {layers}-layer {cell}: "
                             f"expected {sorted(expected)}")
        params = {}
        for name in parameter_shapes(config):
            value = arrays[torch_key(name)]
            if value.shape != expected[torch_key(name)]:
                raise UsageError(f"{torch_key(name)} has shape {value.shape}, "
                                 f"expected {expected[torch_key(name)]}")
            params[name] = K.aligned_copy(np.asarray(value, dtype=config.np_dtype))
        return cls(config, params)

    # -- passes --------------------------------------------------------------

    def loss_and_grads(self, x, y, state, dropout=0.0, rng=None, state_grad=None):
        """Forward and truncated-BPTT backward over one chunk.

        x, y: (T, B) int ids; y[t, b] is the character after x[t, b], or
            IGNORE (-1): no loss there (the mean is over the scored positions).
        state: the State at the start of the chunk (not modified).
        dropout: inverted-dropout probability on every layer's output
            (training only); rng: a numpy Generator for the masks.
        state_grad: if a State is given, it receives dL/d(initial state).

        Returns (mean loss in nats, grads, final State). `grads` is the
        model's own buffer dict (name -> array), overwritten by the next call.
        """
        x, y = self._check_chunk(x, y, state)
        caches = self._forward(x, state, dropout, rng)
        logits = self._logits(caches[-1].output)
        loss = K.softmax_cross_entropy(logits, y.reshape(-1))   # logits -> dlogits
        self._backward(x, caches, logits, state_grad)
        return loss, self.grads, self._final_state(caches)

    def loss(self, x, y, state):
        """Forward only: (mean loss in nats, final State)."""
        x, y = self._check_chunk(x, y, state)
        caches = self._forward(x, state, 0.0, None)
        logp = self._target_log_probs(caches[-1].output, y)
        scored = max(int(np.count_nonzero(y != IGNORE)), 1)
        return float(-logp.sum() / scored), self._final_state(caches)

    def log_probs(self, x, y, state):
        """Forward only: (log p(y[t,b] | history) in nats as (T, B) float64,
        0 where y is IGNORE; final State)."""
        x, y = self._check_chunk(x, y, state)
        caches = self._forward(x, state, 0.0, None)
        logp = self._target_log_probs(caches[-1].output, y)
        return logp.reshape(y.shape), self._final_state(caches)

    def next_logits(self, x, state):
        """Forward only, for sampling: x (T, B) ids -> (logits of the last step
        as a new (B, V) array, final State)."""
        x, _ = self._check_chunk(x, x, state)
        caches = self._forward(x, state, 0.0, None)
        B = x.shape[1]
        return self._logits(caches[-1].output)[-B:].copy(), self._final_state(caches)

    # -- forward -------------------------------------------------------------

    def _forward(self, x, state, dropout, rng):
        T, B = x.shape
        caches = self._workspace(T, B)
        self._forward_layers(x, state, caches, range(len(caches)), None, dropout, rng)
        return caches

    def _forward_layers(self, x, state, caches, layers, below, dropout=0.0, rng=None):
        """Forward through `layers` (consecutive indices); `below` is the output
        of the layer under the first one (None when that is layer 0, which reads x)."""
        for layer in layers:
            cache = caches[layer]
            self._project_inputs(layer, x, below, cache)
            self._recur(layer, state, cache)
            cache.dropout_mask = None
            below = cache.h[1:]
            if dropout > 0.0:
                cache.dropout_mask = _dropout_mask(rng, below.shape, dropout, below.dtype)
                below = below * cache.dropout_mask
            cache.output = below

    # A forward-only pass in two stages, lower layers and upper layers plus the
    # output, so that two threads can overlap consecutive chunks of one stream
    # (charlm.evaluate): while the upper stage scores chunk k, the lower stage
    # runs chunk k+1. Each stage reads and updates only its own layers of its
    # own State. The lower stage owns the workspace; the upper one is handed it.

    def forward_lower(self, x, y, state, split):
        """Layers [0, split) over chunk x (T, B), state updated in place for
        those layers. Validates x, y and state for both stages. Returns what
        forward_upper takes: (workspace, a copy of layer split-1's output, y)."""
        x, y = self._check_chunk(x, y, state)
        T, B = x.shape
        caches = self._workspace(T, B)
        workspace = self._current
        self._forward_layers(x, state, caches, range(split), None)
        _keep_final_state(state, caches, range(split))
        # a copy: the next chunk's lower stage overwrites this layer's h
        return workspace, caches[split - 1].output.copy(), y

    def forward_upper(self, handed, state, split):
        """Layers [split, L), the output layer and the log-probabilities of y
        (as log_probs returns them) for a chunk forward_lower has run; state is
        updated in place for those layers."""
        workspace, below, y = handed
        caches = workspace.caches
        self._forward_layers(None, state, caches, range(split, len(caches)), below)
        _keep_final_state(state, caches, range(split, len(caches)))
        # with no upper layers, the top output is the copy handed over: the
        # lower stage may already be writing the next chunk into its layer
        top_output = caches[-1].output if split < len(caches) else below
        logp = self._target_log_probs(top_output, y, workspace.logits)
        return logp.reshape(y.shape)

    def _project_inputs(self, layer, x, below, cache):
        """cache.gates = W_ih x + bias for all T*B rows (bias: see projection_bias)."""
        p = self.params
        N = x.size if below is None else below.shape[0] * below.shape[1]
        bias = self.projection_bias(layer)
        gates = cache.gates.reshape(N, -1)
        if layer == 0:
            W_ihT = self._current.W_ihT             # (V, G): rows to gather
            np.copyto(W_ihT, p["weight_ih_l0"].T)   # into a kept buffer: no allocation per chunk
            K.input_from_ids(x.reshape(-1), W_ihT, bias, gates)
        else:
            K.input_from_dense(_rows(below), p[f"weight_ih_l{layer}"], bias, gates)

    def projection_bias(self, layer):
        """b_ih + b_hh folded together, except for the GRU, whose b_hn sits inside r*(.)."""
        b_ih = self.params[f"bias_ih_l{layer}"]
        if self.config.cell == "gru":
            return b_ih
        return b_ih + self.params[f"bias_hh_l{layer}"]

    def _recur(self, layer, state, cache):
        cell, W_hh = self.config.cell, self.params[f"weight_hh_l{layer}"]
        cache.h[0] = state.h[layer]
        if self.config.has_cell_state:
            cache.c[0] = state.c[layer]
            K.lstm_forward(cache.gates, W_hh, cache.h, cache.c, cache.tanh_c,
                           self.params.get(f"weight_peep_l{layer}"))
        elif cell == "gru":
            b_hh = self.params[f"bias_hh_l{layer}"]
            K.gru_forward(cache.gates, W_hh, b_hh, cache.h, cache.hn, cache.hh)
        else:
            K.rnn_forward(cell == "rnn-relu", cache.gates, W_hh, cache.h)

    def _logits(self, top_output, logits=None):
        """logits (T*B, V) of the top layer's output (T, B, H), into `logits`
        (default: the current workspace's buffer)."""
        if logits is None:
            logits = self._current.logits
        K.output_forward(_rows(top_output), self.params["out.weight"],
                         self.params["out.bias"], logits)
        return logits

    def _target_log_probs(self, top_output, y, logits=None):
        logits = self._logits(top_output, logits)
        logp = np.empty(y.size, np.float64)
        K.target_log_probs(logits, y.reshape(-1), logp)
        return logp

    def _final_state(self, caches):
        h = np.stack([cache.h[-1] for cache in caches])
        c = np.stack([cache.c[-1] for cache in caches]) if self.config.has_cell_state else None
        return State(h, c)

    # -- backward ------------------------------------------------------------

    def _backward(self, x, caches, dlogits, state_grad):
        """Gradients into self.grads, top layer first."""
        top = caches[-1]
        d_output = self._current.d_top
        K.output_backward(_rows(top.output), self.params["out.weight"], dlogits,
                          self.grads["out.weight"], self.grads["out.bias"], d_output)
        for layer in range(len(caches) - 1, -1, -1):
            d_output = self._backward_layer(layer, x, caches, d_output, state_grad)

    def _backward_layer(self, layer, x, caches, d_output, state_grad):
        """Backward through one layer; returns dL/d(layer's input) for the layer below."""
        cache, g, p = caches[layer], self.grads, self.params
        T, B = x.shape
        dh_out = d_output.reshape(T, B, -1)
        if cache.dropout_mask is not None:
            dh_out = dh_out * cache.dropout_mask
        N = x.size
        db = g[f"bias_ih_l{layer}"]
        # Above layer 0 the BPTT loop adds dW_ih and dL/d(input) as it goes.
        d_below = below = None
        if layer > 0:
            d_below = cache.d_input
            below = (_rows(caches[layer - 1].output), p[f"weight_ih_l{layer}"],
                     g[f"weight_ih_l{layer}"], d_below)
        dgates, dgates_h = self._backward_recurrence(layer, cache, dh_out, state_grad, below)
        if layer == 0:
            dW_ihT = self._current.dW_ihT
            K.input_from_ids_backward(x.reshape(-1), dgates.reshape(N, -1), dW_ihT, db)
            np.copyto(g["weight_ih_l0"], dW_ihT.T)
        else:
            K.bias_gradient(dgates.reshape(N, -1), db)
        if dgates_h is None:            # LSTM/RNN: both biases enter the sum equally
            g[f"bias_hh_l{layer}"][...] = db
        return d_below

    def _backward_recurrence(self, layer, cache, dh_out, state_grad, below=None):
        """Runs the cell's BPTT kernel (with `below`, see lstm_backward); returns
        (dgates for W_ih, dgates for W_hh or None)."""
        cell, g, p = self.config.cell, self.grads, self.params
        W_hh, dW_hh = p[f"weight_hh_l{layer}"], g[f"weight_hh_l{layer}"]
        # Truncated BPTT: no gradient arrives from beyond the chunk's end.
        dh_carry, dgates, dgates_h = cache.dh_carry, cache.dgates, None
        dh_carry[...] = 0
        if self.config.has_cell_state:
            dc_carry = cache.dc_carry
            dc_carry[...] = 0
            peep = f"weight_peep_l{layer}"
            K.lstm_backward(dgates, W_hh, cache.h, cache.c, cache.tanh_c, dh_out,
                            dh_carry, dc_carry, dW_hh, p.get(peep), g.get(peep), below)
            if state_grad is not None:
                state_grad.c[layer] = dc_carry
        elif cell == "gru":
            dgates_h = cache.dgates_h
            K.gru_backward(cache.gates, cache.hn, W_hh, cache.h, dh_out, dh_carry,
                           dgates, dgates_h, dW_hh, g[f"bias_hh_l{layer}"], below)
        else:
            K.rnn_backward(cell == "rnn-relu", cache.h, W_hh, dh_out, dh_carry, dgates, dW_hh,
                           below)
        if state_grad is not None:
            state_grad.h[layer] = dh_carry
        return dgates, dgates_h

    # -- plumbing ------------------------------------------------------------

    def _workspace(self, T, B):
        """Per-layer buffers for a (T, B) chunk, kept for the few shapes in use
        (training, validation and sampling chunks) and reused."""
        key = (T, B)
        if key not in self._workspaces:
            if len(self._workspaces) >= MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
            c = self.config
            self._workspaces[key] = _Workspace(
                [_LayerCache(c, T, B) for _ in range(c.layers)],
                logits=K.aligned_empty((T * B, c.vocab_size), c.np_dtype),
                d_top=K.aligned_empty((T * B, c.hidden), c.np_dtype),
                W_ihT=K.aligned_empty((c.vocab_size, c.gates), c.np_dtype),
                dW_ihT=K.aligned_empty((c.vocab_size, c.gates), c.np_dtype))
        self._current = self._workspaces[key]
        return self._current.caches

    def _check_chunk(self, x, y, state):
        x = np.ascontiguousarray(x, dtype=np.int32)
        y = np.ascontiguousarray(y, dtype=np.int32)
        if x.ndim != 2 or x.shape != y.shape or x.size == 0:
            raise ValueError(f"x and y must be non-empty (T, B) arrays, got {x.shape} and {y.shape}")
        c = self.config
        expected = (c.layers, x.shape[1], c.hidden)
        if state.h.shape != expected or (c.has_cell_state and state.c.shape != expected):
            raise ValueError(f"state must be {expected}")
        return x, y

    def _check_params(self):
        shapes = parameter_shapes(self.config)
        if set(shapes) != set(self.params):
            raise ValueError("parameter names do not match the config")
        for name, shape in shapes.items():
            p = self.params[name]
            if p.shape != shape or p.dtype != self.config.np_dtype or not p.flags.c_contiguous:
                raise ValueError(f"parameter {name} must be a contiguous {shape} {self.config.dtype} array")


def _keep_final_state(state, caches, layers):
    """state.h[l] (and c[l]) = the last step of each of `layers`, in place."""
    for layer in layers:
        state.h[layer] = caches[layer].h[-1]
        if state.c is not None:
            state.c[layer] = caches[layer].c[-1]


def torch_key(name):
    """charlm's parameter name -> the key in a torch module of ``rnn`` + ``decoder``."""
    if name.startswith("out."):
        return "decoder." + name[len("out."):]
    return "rnn." + name


def _rows(a):
    """View a (T, B, H) array as (T*B, H) rows, contiguous."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def _dropout_mask(rng, shape, p, dtype):
    """Inverted dropout: keep with probability 1-p and scale by 1/(1-p),
    so that nothing needs rescaling at evaluation time."""
    keep = 1.0 - p
    return (rng.random(shape) < keep).astype(dtype) / dtype.type(keep)
