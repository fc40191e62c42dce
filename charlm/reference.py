"""A plain-numpy reference for exactly the maths the Cython kernels implement.

This module is slow and obvious on purpose. It exists so that the tests can
check charlm._kernels against an independent, readable statement of the same
equations, and so that a reader can see the whole model on one page:

    RNN    h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),  act = tanh | relu
    LSTM   [i|f|g|o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, activated as
           i, f, o = sigmoid(.), g = tanh(.);
           c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)
    LSTM with peepholes: the same, but i and f also see w_ci * c_{t-1} and
           w_cf * c_{t-1}, and o sees w_co * c_t (weight_peep = [w_ci|w_cf|w_co])
    GRU    r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr),  z likewise,
           n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn)),
           h_t = (1 - z) * n + z * h_{t-1}
    output logits_t = W_out h_t(top layer) + b_out
    loss   mean over the scored positions of -log softmax(logits_t)[y_t]
           (all T*B of them, except where y_t is IGNORE = -1)

Layer 0 sees x_t as a one-hot vector over the vocabulary, so W_ih x_t is
column x_t of W_ih (a gather); each higher layer sees the h_t of the layer
below, after that layer's dropout mask if one is given.

Design:
- Everything is computed in float64, whatever the dtype of the parameters, so
  a float32 model can be compared against the exact maths.
- One layer at a time, one time step at a time, like the equations; no fused
  or batched-over-time tricks. Each op's backward sits right below its forward
  (in the style of llm.c), so every derivative can be checked against the line
  it differentiates.
- The same parameter dict as charlm.model (names and shapes from
  parameter_shapes, PyTorch's layout) and the same state layout: h and c are
  (layers, B, H).
- Truncated BPTT, as in the model: no gradient arrives from beyond the end of
  the chunk, and the gradient for the initial state is returned.
- Dropout is deterministic here: the caller passes the masks, one (T, B, H)
  array per layer, each multiplied into that layer's output (the top layer's
  before the output layer), which is where charlm.model applies its inverted
  dropout.

A batch of vectors is a (B, n) array of rows (PyTorch's convention), so the
textbook W v + b is written affine(W, v, b) = v @ W.T + b.
"""

from dataclasses import dataclass
from functools import partial

import numpy as np

from .model import IGNORE, parameter_shapes

__all__ = ["loss_and_grads", "log_probs"]


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def loss_and_grads(config, params, x, y, h0, c0=None, dropout_masks=None):
    """Forward and truncated-BPTT backward over one chunk, in float64.

    config: a charlm.model.Config; params: name -> array as in charlm.model.
    x, y: (T, B) int ids; y[t, b] is the character after x[t, b].
    h0, c0: the initial state, (layers, B, H); c0 only for the LSTM.
    dropout_masks: None, or one (T, B, H) array per layer (layer 0 first),
        multiplied into that layer's output.

    Returns (loss, grads, hT, cT, dh0, dc0): the mean loss in nats, a dict of
    float64 gradients under the parameter names, the final state, and
    dL/d(initial state); cT and dc0 are None except for the LSTM.
    """
    p, x, y, h0, c0 = _prepare(config, params, x, y, h0, c0, dropout_masks)
    layers, logits = forward(config, p, x, h0, c0, dropout_masks)
    loss, _ = cross_entropy(logits, y)
    grads = {name: np.zeros(shape) for name, shape in parameter_shapes(config).items()}

    d_logits = cross_entropy_backward(logits, y)
    # logits_t = W_out h_t + b_out, for the (dropped-out) top-layer output h_t
    top = layers[-1].output
    d_output = np.stack([affine_backward(d_logits[t], p["out.weight"], top[t],
                                         grads["out.weight"], grads["out.bias"])
                         for t in range(len(top))])

    dh0 = np.zeros_like(h0)
    dc0 = None if c0 is None else np.zeros_like(c0)
    for layer in reversed(range(config.layers)):
        run = layers[layer]
        if run.dropout_mask is not None:       # output = h * mask
            d_output = d_output * run.dropout_mask
        d_output, dh0[layer], dc = layer_backward(config.cell, p, grads, layer, run, d_output)
        if dc0 is not None:
            dc0[layer] = dc

    hT = np.stack([run.h[-1] for run in layers])
    cT = None if c0 is None else np.stack([run.c[-1] for run in layers])
    return loss, grads, hT, cT, dh0, dc0


def log_probs(config, params, x, y, h0, c0=None):
    """log p(y[t, b] | x[:t+1, b], initial state) in nats, as (T, B) float64 (no dropout)."""
    p, x, y, h0, c0 = _prepare(config, params, x, y, h0, c0, None)
    _, logits = forward(config, p, x, h0, c0, None)
    return cross_entropy(logits, y)[1]


# ---------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------

@dataclass
class LayerRun:
    """One layer's forward pass over the chunk, kept for its backward pass."""

    inputs: np.ndarray          # (T, B) ids for layer 0, else (T, B, H) from below
    h: list                     # h[0] = initial state ... h[T] = final, each (B, H)
    c: list                     # the same for the LSTM's cell state, else all None
    step_caches: list           # what each time step's backward needs
    dropout_mask: np.ndarray    # (T, B, H) or None
    output: np.ndarray          # (T, B, H): h[1:] times the dropout mask


def forward(config, p, x, h0, c0, dropout_masks):
    """Every layer bottom-up, then the output layer: (list of LayerRun, logits (T, B, V))."""
    layers, inputs = [], x
    for layer in range(config.layers):
        c_init = None if c0 is None else c0[layer]
        run = layer_forward(config.cell, p, layer, inputs, h0[layer], c_init)
        if dropout_masks is not None:
            run.dropout_mask = np.asarray(dropout_masks[layer], np.float64)
            run.output = run.output * run.dropout_mask
        layers.append(run)
        inputs = run.output
    logits = np.stack([affine(p["out.weight"], h_t, p["out.bias"]) for h_t in inputs])
    return layers, logits


# ---------------------------------------------------------------------------
# One layer over the chunk
# ---------------------------------------------------------------------------

def layer_forward(cell, p, layer, inputs, h0, c0):
    """Runs one layer through time from (h0, c0); returns its LayerRun."""
    W_ih, b_ih, W_hh, b_hh = _layer_weights(p, layer)
    step = _bind_peepholes(cell, CELL_STEPS[cell][0], p, layer)
    h, c, caches = [h0], [c0], []
    for x_t in inputs:
        if layer == 0:
            a_x = embed(W_ih, x_t, b_ih)        # W_ih x_t + b_ih, x_t one-hot
        else:
            a_x = affine(W_ih, x_t, b_ih)       # W_ih x_t + b_ih
        a_h = affine(W_hh, h[-1], b_hh)         # W_hh h_{t-1} + b_hh
        h_t, c_t, cache = step(a_x, a_h, h[-1], c[-1])
        h.append(h_t)
        c.append(c_t)
        caches.append(cache)
    return LayerRun(inputs, h, c, caches, None, np.stack(h[1:]))


def layer_backward(cell, p, grads, layer, run, dh_out, watch=None):
    """Truncated BPTT through one layer.

    dh_out (T, B, H): dL/dh_t arriving from above (before the recurrence).
    Accumulates the layer's parameter gradients into `grads`.
    watch: None, or a function called at each step t (going backwards) as
        watch(t, dL/dh_t in total, dL/dc_t carried back from step t+1 or None);
        charlm.diagnostics records the gradient flow through time with it.
    Returns (dL/d inputs as (T, B, H), or None for layer 0; dL/dh_0; dL/dc_0 or None).
    """
    W_ih, b_ih, W_hh, b_hh = _layer_weights(p, layer)
    dW_ih, db_ih, dW_hh, db_hh = _layer_weights(grads, layer)
    step_backward = _bind_peepholes(cell, CELL_STEPS[cell][1], p, layer, grads)
    T = len(run.step_caches)
    # Truncation: nothing flows back from beyond the end of the chunk.
    dh_next = np.zeros_like(run.h[0])
    dc_next = None if run.c[0] is None else np.zeros_like(run.c[0])
    d_inputs = [None] * T
    for t in reversed(range(T)):
        dh = dh_out[t] + dh_next                # h_t feeds the layer above and step t+1
        if watch is not None:
            watch(t, dh, dc_next)
        da_x, da_h, dh_prev, dc_next = step_backward(dh, dc_next, run.step_caches[t])
        # a_h = W_hh h_{t-1} + b_hh
        dh_next = dh_prev + affine_backward(da_h, W_hh, run.h[t], dW_hh, db_hh)
        # a_x = W_ih x_t + b_ih
        if layer == 0:
            embed_backward(da_x, run.inputs[t], dW_ih, db_ih)
        else:
            d_inputs[t] = affine_backward(da_x, W_ih, run.inputs[t], dW_ih, db_ih)
    d_inputs = None if layer == 0 else np.stack(d_inputs)
    return d_inputs, dh_next, dc_next


def _bind_peepholes(cell, step, p, layer, grads=None):
    """The peephole LSTM's steps also take the layer's peephole weights (and,
    going backward, the gradient to accumulate them into)."""
    if cell != "lstm-peephole":
        return step
    name = f"weight_peep_l{layer}"
    if grads is None:
        return partial(step, peep=p[name])
    return partial(step, peep=p[name], dpeep=grads[name])


def _layer_weights(arrays, layer):
    """(W_ih, b_ih, W_hh, b_hh) of one layer, from params or from grads."""
    return (arrays[f"weight_ih_l{layer}"], arrays[f"bias_ih_l{layer}"],
            arrays[f"weight_hh_l{layer}"], arrays[f"bias_hh_l{layer}"])


# ---------------------------------------------------------------------------
# Affine maps. Backward functions accumulate (+=) into the parameter
# gradients, since a weight is used at every time step, and return the
# gradient for their input.
# ---------------------------------------------------------------------------

def affine(W, v, b):
    """W v + b for every row v: (B, In) -> (B, Out), W (Out, In)."""
    return v @ W.T + b


def affine_backward(d_out, W, v, dW, db):
    """dW += d_out^T v, db += sum of d_out rows; returns dL/dv = d_out W."""
    dW += d_out.T @ v
    db += d_out.sum(axis=0)
    return d_out @ W


def embed(W, ids, b):
    """W x + b for one-hot x = e_id: column `id` of W, for each id of the batch."""
    return W[:, ids].T + b


def embed_backward(d_out, ids, dW, db):
    """Each gathered column receives the gradient of the rows that gathered it."""
    for d_row, token in zip(d_out, ids):
        dW[:, token] += d_row
    db += d_out.sum(axis=0)


# ---------------------------------------------------------------------------
# Cells: one time step. A step takes a_x = W_ih x_t + b_ih and
# a_h = W_hh h_{t-1} + b_hh separately (the GRU needs them apart) and returns
# (h_t, c_t, cache). Its backward takes dL/dh_t and dL/dc_t and returns
# (dL/da_x, dL/da_h, dL/dh_{t-1} by any path other than a_h, dL/dc_{t-1}).
# ---------------------------------------------------------------------------

def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def sigmoid_backward(dy, y):
    """y = sigmoid(a): dy/da = y (1 - y)."""
    return dy * y * (1 - y)


def tanh_backward(dy, y):
    """y = tanh(a): dy/da = 1 - y^2."""
    return dy * (1 - y * y)


def relu_backward(dy, a):
    """y = max(a, 0): dy/da = 1 where a > 0, else 0 (also at 0, as the kernels)."""
    return dy * (a > 0)


def rnn_step(a_x, a_h, h_prev, c_prev, relu):
    a = a_x + a_h
    h = np.maximum(a, 0) if relu else np.tanh(a)
    return h, None, (a, h)


def rnn_step_backward(dh, dc, cache, relu):
    a, h = cache
    da = relu_backward(dh, a) if relu else tanh_backward(dh, h)
    # a = a_x + a_h: both receive da. h_{t-1} enters only through a_h.
    return da, da, 0, None


def lstm_step(a_x, a_h, h_prev, c_prev):
    a_i, a_f, a_g, a_o = np.split(a_x + a_h, 4, axis=1)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), np.tanh(a_g), sigmoid(a_o)
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, (i, f, g, o, c_prev, tanh_c)


def lstm_step_backward(dh, dc, cache):
    i, f, g, o, c_prev, tanh_c = cache
    # h = o * tanh(c); c also flows on to step t+1 (the incoming dc)
    do = dh * tanh_c
    dc = dc + tanh_backward(dh * o, tanh_c)
    # c = f * c_prev + i * g
    df, dc_prev = dc * c_prev, dc * f
    di, dg = dc * g, dc * i
    da = np.concatenate([sigmoid_backward(di, i), sigmoid_backward(df, f),
                         tanh_backward(dg, g), sigmoid_backward(do, o)], axis=1)
    # a = a_x + a_h: both receive da. h_{t-1} enters only through a_h.
    return da, da, 0, dc_prev


def gru_step(a_x, a_h, h_prev, c_prev):
    ax_r, ax_z, ax_n = np.split(a_x, 3, axis=1)
    ah_r, ah_z, ah_n = np.split(a_h, 3, axis=1)
    r = sigmoid(ax_r + ah_r)
    z = sigmoid(ax_z + ah_z)
    n = np.tanh(ax_n + r * ah_n)
    h = (1 - z) * n + z * h_prev
    return h, None, (r, z, n, ah_n, h_prev)


def gru_step_backward(dh, dc, cache):
    r, z, n, ah_n, h_prev = cache
    # h = (1 - z) * n + z * h_prev
    dn = dh * (1 - z)
    dz = dh * (h_prev - n)
    dh_prev = dh * z
    # n = tanh(ax_n + r * ah_n)
    da_n = tanh_backward(dn, n)
    dr = da_n * ah_n
    dah_n = da_n * r
    # r = sigmoid(ax_r + ah_r), z = sigmoid(ax_z + ah_z)
    da_r = sigmoid_backward(dr, r)
    da_z = sigmoid_backward(dz, z)
    da_x = np.concatenate([da_r, da_z, da_n], axis=1)
    da_h = np.concatenate([da_r, da_z, dah_n], axis=1)
    return da_x, da_h, dh_prev, None


def lstm_peephole_step(a_x, a_h, h_prev, c_prev, peep):
    w_ci, w_cf, w_co = peep
    a_i, a_f, a_g, a_o = np.split(a_x + a_h, 4, axis=1)
    i = sigmoid(a_i + w_ci * c_prev)
    f = sigmoid(a_f + w_cf * c_prev)
    g = np.tanh(a_g)
    c = f * c_prev + i * g
    o = sigmoid(a_o + w_co * c)
    tanh_c = np.tanh(c)
    h = o * tanh_c
    return h, c, (i, f, g, o, c_prev, c, tanh_c)


def lstm_peephole_step_backward(dh, dc, cache, peep, dpeep):
    i, f, g, o, c_prev, c, tanh_c = cache
    w_ci, w_cf, w_co = peep
    # h = o * tanh(c), o = sigmoid(a_o + w_co * c)
    da_o = sigmoid_backward(dh * tanh_c, o)
    dc = dc + tanh_backward(dh * o, tanh_c) + da_o * w_co
    dpeep[2] += (da_o * c).sum(axis=0)
    # c = f * c_prev + i * g, i = sigmoid(a_i + w_ci * c_prev), f likewise
    da_i = sigmoid_backward(dc * g, i)
    da_f = sigmoid_backward(dc * c_prev, f)
    da_g = tanh_backward(dc * i, g)
    dc_prev = dc * f + da_i * w_ci + da_f * w_cf
    dpeep[0] += (da_i * c_prev).sum(axis=0)
    dpeep[1] += (da_f * c_prev).sum(axis=0)
    da = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
    # a = a_x + a_h: both receive da. h_{t-1} enters only through a_h.
    return da, da, 0, dc_prev


CELL_STEPS = {
    "rnn": (partial(rnn_step, relu=False), partial(rnn_step_backward, relu=False)),
    "rnn-relu": (partial(rnn_step, relu=True), partial(rnn_step_backward, relu=True)),
    "lstm": (lstm_step, lstm_step_backward),
    "gru": (gru_step, gru_step_backward),
    "lstm-peephole": (lstm_peephole_step, lstm_peephole_step_backward),
}


# ---------------------------------------------------------------------------
# Softmax cross-entropy
# ---------------------------------------------------------------------------

def log_softmax(logits):
    """Stable: shift by the row maximum before exponentiating."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits, y):
    """(mean of -log p(y) over the scored positions, log p(y) per position,
    0 where y is IGNORE) for logits (T, B, V), y (T, B)."""
    scored = y != IGNORE
    picked = np.where(scored, y, 0)[..., None]
    target_log_probs = np.take_along_axis(log_softmax(logits), picked, axis=-1)[..., 0]
    target_log_probs = np.where(scored, target_log_probs, 0.0)
    return float(-target_log_probs.sum() / max(scored.sum(), 1)), target_log_probs


def cross_entropy_backward(logits, y):
    """dL/dlogits for the mean loss: (softmax - one_hot(y)) / n_scored, 0 where unscored."""
    scored = y != IGNORE
    picked = np.where(scored, y, 0)[..., None]
    d_logits = np.exp(log_softmax(logits))
    np.put_along_axis(d_logits, picked,
                      np.take_along_axis(d_logits, picked, axis=-1) - 1, axis=-1)
    return d_logits * scored[..., None] / max(scored.sum(), 1)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------

def _prepare(config, params, x, y, h0, c0, dropout_masks):
    """Validates shapes and ids; returns float64 params and states, int ids."""
    shapes = parameter_shapes(config)
    if set(params) != set(shapes):
        raise ValueError("parameter names do not match the config")
    p = {}
    for name, shape in shapes.items():
        p[name] = np.asarray(params[name], np.float64)
        if p[name].shape != shape:
            raise ValueError(f"parameter {name} must have shape {shape}, got {p[name].shape}")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be non-empty (T, B) arrays, got {x.shape} and {y.shape}")
    for ids, low in ((x, 0), (y, IGNORE)):
        in_range = ids.min() >= low and ids.max() < config.vocab_size
        if not np.issubdtype(ids.dtype, np.integer) or not in_range:
            raise ValueError(f"ids must be integers in [0, {config.vocab_size})")
    T, B = x.shape
    state_shape = (config.layers, B, config.hidden)
    h0 = np.asarray(h0, np.float64)
    if h0.shape != state_shape:
        raise ValueError(f"h0 must be {state_shape}, got {h0.shape}")
    if config.has_cell_state:
        c0 = None if c0 is None else np.asarray(c0, np.float64)
        if c0 is None or c0.shape != state_shape:
            raise ValueError(f"the LSTM needs c0 of shape {state_shape}")
    elif c0 is not None:
        raise ValueError(f"a {config.cell} has no cell state; pass c0=None")
    if dropout_masks is not None:
        if len(dropout_masks) != config.layers or any(
                np.shape(mask) != (T, B, config.hidden) for mask in dropout_masks):
            raise ValueError(f"dropout_masks must be {config.layers} arrays of shape "
                             f"{(T, B, config.hidden)}")
    return p, x, y, h0, c0
