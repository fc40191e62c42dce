"""Gradient-flow diagnostics: see the vanishing (and exploding) gradient in a model.

Backpropagation through time multiplies one Jacobian per step, so the
gradient of the loss at step t with respect to the state at step t-k shrinks
(or grows) roughly geometrically in k: tanh' <= 1 and sigmoid' <= 1/4 pull it
down, large recurrent weights push it up, and the LSTM's and GRU's gates can
hold an additive path open. This module measures that on a trained model and
a real text (`charlm gradients`):

- flow: the norm of d loss_t / d h_{t-k} per layer, and of d loss_t / d c_{t-k}
  for the LSTMs, for k = 0..K, averaged over windows at random positions;
- decay: the per-step factor fitted to log(norm) against k;
- saturation: how often each gate or unit sits where its derivative is ~0;
- the spectral norm of each recurrent matrix, and of each gate's block of it.

Design:
- The maths is charlm.reference's, not the kernels': plain numpy in float64
  whatever the model's dtype, one step at a time, with the cell chosen by the
  model's config. The reference's layer_backward reports the gradient
  arriving at every step through its `watch` hook, so one backward pass gives
  all K+1 gradients of a window at once: the loss is taken only at the last
  step of a window of K+1 steps, and recorded on the way back.
- A batch row is one window; the loss is the sum over rows (not the mean), so
  each row's gradient is exactly that window's own.
- What the derivatives are (tests/test_diagnostics.py checks both against
  finite differences of states perturbed between steps):
  d loss_t / d h_{t-k} is the total derivative through everything h_{t-k}
  feeds: the same layer at step t-k+1 and the layers above at step t-k.
  d loss_t / d c_{t-k} is the derivative with respect to the cell state
  carried into step t-k+1; h_{t-k} was computed from c_{t-k} before, so at
  k = 0 it is exactly 0 and the cell-state flow starts at k = 1.
- Each window starts after `burn_in` characters run from the zero state, so
  it starts from a typical state rather than from zeros.
- The decay factor is a least-squares fit over the part of the curve above
  NOISE_FLOOR times its largest value: below that, float64 round-off of the
  larger terms, and exact zeros (a ReLU switched off), say nothing about
  the rate.

The exploding case, and what clipping does to it, is exploding_chain() and
clipping_effect() at the end.
"""

import csv
import importlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from . import reference
from .errors import CharlmError, DataError, UsageError
from .model import parameter_shapes

DEFAULT_SPAN = 100
DEFAULT_WINDOWS = 64
DEFAULT_BURN_IN = 100
MAX_SPAN = 10_000
MAX_WINDOWS = 100_000
MAX_BURN_IN = 100_000
# A sigmoid output below this or above 1 - this, and a tanh output beyond
# TANH_FLAT in size, sit where the derivative is under ~0.05 (sigmoid' < 0.048,
# tanh' < 0.098): the flat regions that stop gradients.
SIGMOID_FLAT = 0.05
TANH_FLAT = 0.95
NOISE_FLOOR = 1e-12          # relative to a curve's largest value; see the docstring
WINDOW_MEMORY = 512 << 20    # bytes of forward caches per batch of windows
MAX_BATCH = 32
BURN_IN_CHUNK = 256          # burn-in steps run at a time (their caches are dropped)
PLOT_HINT = "pip install 'charlm[plot]'"

# The gate blocks of W_hh and of the pre-activations, in PyTorch's order.
GATE_NAMES = {"rnn": ("h",), "rnn-relu": ("h",), "gru": ("r", "z", "n"),
              "lstm": ("i", "f", "g", "o"), "lstm-peephole": ("i", "f", "g", "o")}


# ---------------------------------------------------------------------------
# The gradients of one batch of windows
# ---------------------------------------------------------------------------

@dataclass
class StateGradients:
    """d loss / d state for a batch of B windows, indexed by k = steps back.

    dh[layer, k, b]: d loss_b / d h^layer_{t-k}, shape (layers, K+1, B, H);
    dc likewise along the cell state, or None for cells without one.
    runs: the window's reference.LayerRun per layer (for saturation).
    loss: -log p(target_b | its history), shape (B,).
    """

    dh: np.ndarray
    dc: np.ndarray
    runs: list
    loss: np.ndarray


def state_gradients(config, params, burn_in_ids, window_ids, targets):
    """Forward over burn-in and window, then one backward pass from the loss
    at the window's last step, recording the state gradients on the way.

    burn_in_ids: (burn, B) ids run from the zero state first (burn may be 0);
    window_ids: (K+1, B) the window's inputs; targets: (B,) the character
    after each window. Computed in float64.
    """
    p = _float64_params(config, params)
    window_ids, targets = np.asarray(window_ids), np.asarray(targets)
    h0, c0 = _burn_in(config, p, np.asarray(burn_in_ids), window_ids.shape[1])
    runs, logits = reference.forward(config, p, window_ids, h0, c0, None)
    log_probs = reference.log_softmax(logits[-1])              # (B, V)
    rows = np.arange(len(targets))
    d_logits = np.exp(log_probs)
    d_logits[rows, targets] -= 1                               # d(-log p)/d logits
    d_output = np.zeros_like(runs[-1].output)
    d_output[-1] = d_logits @ p["out.weight"]                  # logits = W_out h + b_out

    span = len(window_ids) - 1
    dh = np.zeros((config.layers,) + d_output.shape)
    dc = np.zeros_like(dh) if c0 is not None else None
    scratch = {name: np.zeros(shape) for name, shape in parameter_shapes(config).items()}
    for layer in reversed(range(config.layers)):
        def watch(t, dh_t, dc_t, layer=layer):
            dh[layer, span - t] = dh_t
            if dc is not None and dc_t is not None:
                dc[layer, span - t] = dc_t
        d_output, _, _ = reference.layer_backward(config.cell, p, scratch, layer, runs[layer],
                                                  d_output, watch=watch)
    return StateGradients(dh, dc, runs, -log_probs[rows, targets])


def _float64_params(config, params):
    shapes = parameter_shapes(config)
    if set(params) != set(shapes):
        raise ValueError("parameter names do not match the config")
    return {name: np.asarray(params[name], np.float64) for name in shapes}


def _burn_in(config, p, ids, batch):
    """The state after running `ids` (burn, B) from zeros: (h, c), (layers, B, H)."""
    shape = (config.layers, batch, config.hidden)
    h = np.zeros(shape)
    c = np.zeros(shape) if config.has_cell_state else None
    for start in range(0, len(ids), BURN_IN_CHUNK):
        runs, _ = reference.forward(config, p, ids[start:start + BURN_IN_CHUNK], h, c, None)
        h = np.stack([run.h[-1] for run in runs])
        if c is not None:
            c = np.stack([run.c[-1] for run in runs])
    return h, c


# ---------------------------------------------------------------------------
# Measuring over a text
# ---------------------------------------------------------------------------

@dataclass
class Decay:
    """A fitted per-step factor: norm_k ~ fitted_first * factor^(k - first_k)."""

    factor: float
    first_k: int             # the fit's range of k
    last_k: int
    below_1pct_at: int       # first k with norm < 1% of the norm at first_k (None: never)
    fitted_first: float      # the fitted line's norm at first_k

    def fitted(self, ks):
        """The fitted line's norms at the k values `ks`."""
        return self.fitted_first * self.factor ** (np.asarray(ks) - self.first_k)

    def describe(self):
        return describe_factor(self.factor)


@dataclass
class GradientReport:
    """Everything `charlm gradients` prints, for one model and text."""

    cell: str
    layers: int
    hidden: int
    span: int
    windows: int
    burn_in: int
    flow: dict               # (layer, "h" | "c") -> (K+1,) mean gradient norm
    decay: dict              # the same keys -> Decay, or None if nothing to fit
    saturation: list         # per layer: [(name, kind, fraction saturated)]
    spectral: list           # per layer: {"W_hh": norm, gate name: norm of its block}
    mean_loss: float         # nats, at the windows' last steps
    labels: dict = field(default_factory=dict)   # "model", "text": for the header

    @property
    def series(self):
        """The flow curves' keys in display order: per layer, h then c."""
        return sorted(self.flow, key=lambda key: (key[0], key[1] != "h"))


def measure(config, params, ids, span=DEFAULT_SPAN, windows=DEFAULT_WINDOWS,
            burn_in=DEFAULT_BURN_IN, seed=0):
    """The GradientReport of a model on a 1-D array of ids.

    Windows of span + 1 steps (plus the target after them) start at
    positions drawn with numpy's generator from `seed`; each is preceded by
    up to `burn_in` characters (fewer if the text is short).
    """
    check_options(span, windows, burn_in, seed)
    ids = np.asarray(ids)
    needed = span + 2
    if len(ids) < needed:
        raise UsageError(f"the text has {len(ids):,} characters; --span {span} needs at "
                         f"least {needed:,}: pass a longer --text or a smaller --span")
    burn_in = min(burn_in, len(ids) - needed)
    starts = np.random.default_rng(seed).choice(
        len(ids) - needed - burn_in + 1, size=windows,
        replace=windows > len(ids) - needed - burn_in + 1)

    sums, counts, losses = {}, _SaturationCounts(config.cell, config.layers), []
    offsets = np.arange(burn_in + needed)[:, None]
    for batch in np.array_split(starts, math.ceil(windows / _batch_size(config, span))):
        text = ids[batch[None, :] + offsets].astype(np.int64)       # (burn + K + 2, B)
        grads = state_gradients(config, params, text[:burn_in], text[burn_in:-1], text[-1])
        for key, norms in _norms(grads).items():
            sums[key] = sums.get(key, 0) + norms.sum(axis=-1)
        counts.add(grads.runs)
        losses.append(grads.loss)
    flow = {key: total / windows for key, total in sums.items()}
    return GradientReport(
        cell=config.cell, layers=config.layers, hidden=config.hidden, span=span,
        windows=windows, burn_in=burn_in, flow=flow,
        decay={key: fit_decay(curve) for key, curve in flow.items()},
        saturation=counts.fractions(), spectral=spectral_norms(config, params),
        mean_loss=float(np.concatenate(losses).mean()))


def check_options(span, windows, burn_in, seed=0):
    """UsageError unless the measurement options are whole numbers in range."""
    for name, value, low, high in (("--span", span, 1, MAX_SPAN),
                                   ("--windows", windows, 1, MAX_WINDOWS),
                                   ("--burn-in", burn_in, 0, MAX_BURN_IN)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not low <= value <= high:
            raise UsageError(f"{name} must be an integer from {low} to {high:,}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")


def _batch_size(config, span):
    """Windows per backward pass, so the forward caches stay within WINDOW_MEMORY."""
    per_window = (span + 1) * config.layers * (config.gates + 4 * config.hidden) * 8
    return int(min(MAX_BATCH, max(1, WINDOW_MEMORY // per_window)))


def _norms(grads):
    """(layer, "h" | "c") -> (K+1, B) norms of each window's state gradient."""
    norms = {}
    for layer in range(len(grads.dh)):
        norms[layer, "h"] = np.linalg.norm(grads.dh[layer], axis=-1)
        if grads.dc is not None:
            norms[layer, "c"] = np.linalg.norm(grads.dc[layer], axis=-1)
    return norms


def fit_decay(norms, floor=NOISE_FLOOR):
    """The per-step factor of a flow curve (norms[k], k = 0..K), or None.

    A least-squares line through log(norm) against k, over the stretch from
    the first k whose norm is above floor * max to the last one before the
    curve first drops below it again; the factor is exp(slope).
    """
    norms = np.asarray(norms, np.float64)
    if not np.isfinite(norms).all() or norms.max(initial=0) <= 0:
        return None
    above = norms > floor * norms.max()
    first = int(np.argmax(above))
    last = first
    while last + 1 < len(norms) and above[last + 1]:
        last += 1
    if last == first:
        return None
    ks = np.arange(first, last + 1)
    slope, intercept = np.polyfit(ks, np.log(norms[first:last + 1]), 1)
    below = np.flatnonzero(norms[first:] < 0.01 * norms[first])
    return Decay(float(np.exp(slope)), first, last,
                 int(first + below[0]) if len(below) else None,
                 float(np.exp(intercept + slope * first)))


def describe_factor(factor):
    """'0.83 per step: down to 1% after 25 steps' (or how it grows)."""
    if factor is None:
        return "n/a (no gradient above the noise floor)"
    if factor <= 0:
        return "0 per step: gone after 1 step"
    if factor < 1:
        steps = math.ceil(math.log(0.01) / math.log(factor))
        return f"{_factor_text(factor)} per step: down to 1% after {_steps(steps)}"
    if factor > 1 + 1e-9:
        steps = math.ceil(math.log(100) / math.log(factor))
        return f"{_factor_text(factor)} per step: grows 100-fold in {_steps(steps)}"
    return "1 per step: no decay"


def _steps(count):
    return "1 step" if count <= 1 else f"{count:,} steps"


def _factor_text(factor):
    """Three significant digits, but never rounded to exactly 1."""
    text = f"{factor:.3g}"
    return f"{factor:.6g}" if text == "1" else text


class _SaturationCounts:
    """Counts of saturated outputs per layer and nonlinearity, over all steps seen."""

    def __init__(self, cell, layers):
        self.cell = cell
        self.counts = [{} for _ in range(layers)]    # name -> [kind, saturated, total]

    def add(self, runs):
        for layer, run in enumerate(runs):
            for cache in run.step_caches:
                for name, kind, values in activations(self.cell, cache):
                    entry = self.counts[layer].setdefault(name, [kind, 0, 0])
                    entry[1] += int(np.count_nonzero(saturated(kind, values)))
                    entry[2] += values.size

    def fractions(self):
        return [[(name, kind, hits / total) for name, (kind, hits, total) in layer.items()]
                for layer in self.counts]


def activations(cell, cache):
    """[(name, kind, values)] of the squashing nonlinearities in one reference
    step cache; kind is sigmoid, tanh or relu (values: its pre-activation)."""
    if cell == "rnn":
        return [("h", "tanh", cache[1])]
    if cell == "rnn-relu":
        return [("h", "relu", cache[0])]
    if cell == "gru":
        r, z, n = cache[:3]
        return [("r", "sigmoid", r), ("z", "sigmoid", z), ("n", "tanh", n)]
    # lstm and lstm-peephole: both caches start with the gates, end with tanh(c)
    (i, f, g, o), tanh_c = cache[:4], cache[-1]
    return [("i", "sigmoid", i), ("f", "sigmoid", f), ("g", "tanh", g),
            ("o", "sigmoid", o), ("tanh(c)", "tanh", tanh_c)]


def saturated(kind, values):
    """Where a nonlinearity's derivative is ~0 (relu: exactly 0)."""
    if kind == "sigmoid":
        return (values < SIGMOID_FLAT) | (values > 1 - SIGMOID_FLAT)
    if kind == "tanh":
        return np.abs(values) > TANH_FLAT
    return values <= 0


def spectral_norms(config, params):
    """Per layer {"W_hh": largest singular value of W_hh, gate: of its (H, H) block}."""
    names = GATE_NAMES[config.cell]
    result = []
    for layer in range(config.layers):
        W = np.asarray(params[f"weight_hh_l{layer}"], np.float64)
        norms = {"W_hh": _largest_singular_value(W)}
        if len(names) > 1:
            for name, block in zip(names, np.split(W, len(names))):
                norms[name] = _largest_singular_value(block)
        result.append(norms)
    return result


def _largest_singular_value(matrix):
    """sqrt of the largest eigenvalue of the Gram matrix M^T M: exact to
    round-off for the largest singular value, and several times faster than
    a full SVD of a (4H, H) matrix."""
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return float(np.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))


# ---------------------------------------------------------------------------
# During training: the decay factor at each evaluation
# ---------------------------------------------------------------------------

TRAINING_SPAN = 50
TRAINING_WINDOWS = 16
TRAINING_BURN_IN = 50


def training_record(model, ids, seed=0):
    """The decay factors for the metrics log, measured on `ids` (the
    validation text) with a short span: {"decay_span": K, "decay_h": [per
    layer], "decay_c": [...] for the LSTMs}; {} if the text is too short.

    The same windows (from `seed`) at every evaluation, so a change between
    two records is the model's, not the sample's. Factors that cannot be
    fitted are None, which the JSON log writes as null.
    """
    span = min(TRAINING_SPAN, len(ids) - 2)
    if span < 1:
        return {}
    burn_in = min(TRAINING_BURN_IN, len(ids) - span - 2)
    report = measure(model.config, model.params, ids, span, TRAINING_WINDOWS, burn_in, seed)
    record = {"decay_span": span}
    for state in ("h", "c"):
        factors = [report.decay.get((layer, state)) for layer in range(report.layers)]
        if any((layer, state) in report.flow for layer in range(report.layers)):
            record[f"decay_{state}"] = [None if d is None else round(d.factor, 6)
                                        for d in factors]
    return record


def format_training_record(record):
    """'decay h 0.912 0.950 c 0.990 0.995' (per layer) for the evaluation line."""
    parts = ["decay"]
    for state in ("h", "c"):
        factors = record.get(f"decay_{state}")
        if factors:
            parts.append(state + " " + " ".join("n/a" if f is None else f"{f:.3f}"
                                                for f in factors))
    return " ".join(parts)


# ---------------------------------------------------------------------------
# Output: table, terminal chart, CSV, PNG
# ---------------------------------------------------------------------------

def shown_ks(span):
    """The k values of the table and chart: 0, 1, 2, 3, 5, then round steps to K."""
    step = _round_step(span / 10)
    ks = {k for k in (0, 1, 2, 3, 5) if k <= span}
    ks.update(range(step, span + 1, step))
    ks.add(span)
    return sorted(ks)


def _round_step(x):
    """The smallest of 1, 2, 5, 10, 20, 50... that is >= x."""
    magnitude = 10 ** math.floor(math.log10(max(x, 1)))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= x)


def format_report(report, unicode=True, chart_width=40):
    """The text `charlm gradients` prints: header, table, chart, decay,
    saturation and spectral norms."""
    r = report
    lines = []
    if r.labels.get("model"):
        lines.append(f"model: {r.labels['model']} ({r.cell}, {r.layers} layer(s) x {r.hidden})")
    if r.labels.get("text"):
        lines.append(f"text:  {r.labels['text']}")
    lines.append(f"{r.windows} windows of {r.span + 1} steps at random positions, each after "
                 f"{r.burn_in} characters of burn-in; loss at the last step only "
                 f"(mean {r.mean_loss:.3f} nats)")
    lines += ["", "Gradient flow through time: mean over windows of |d loss_t / d h_{t-k}| "
                  "(h)" + (" and |d loss_t / d c_{t-k}| (c)" if _has_c(r) else "")]
    lines += _table(r)
    lines += ["", "Decay per step (least-squares fit of log norm on k):"]
    for key in r.series:
        d = r.decay[key]
        detail = "" if d is None else (
            f"  [fit over k = {d.first_k}..{d.last_k}; measured: "
            + (f"below 1% at k = {d.below_1pct_at}]" if d.below_1pct_at is not None
               else f"still above 1% at k = {r.span}]"))
        lines.append(f"  {_label(key):<10} {describe_factor(d and d.factor)}{detail}")
    lines += ["", "Chart: the same norms on a log scale"]
    lines += _chart(r, unicode, chart_width)
    lines += ["", (f"Saturation: share of outputs in the flat regions (sigmoid < {SIGMOID_FLAT} "
                   f"or > {1 - SIGMOID_FLAT}, |tanh| > {TANH_FLAT}, relu switched off)")]
    for layer, gates in enumerate(r.saturation):
        lines.append(f"  layer {layer}: " + "  ".join(f"{name} {100 * frac:.1f}%"
                                                      for name, _, frac in gates))
    lines += ["", "Spectral norm of the recurrent matrix W_hh (largest singular value)"
                  + (", and of each gate's block:" if len(GATE_NAMES[r.cell]) > 1 else ":")]
    for layer, norms in enumerate(r.spectral):
        blocks = ", ".join(f"{name} {value:.3g}" for name, value in norms.items()
                           if name != "W_hh")
        lines.append(f"  layer {layer}: {norms['W_hh']:.4g}" + (f"  ({blocks})" if blocks else ""))
    return "\n".join(lines)


def _has_c(report):
    return any(state == "c" for _, state in report.flow)


def _label(key):
    return f"layer {key[0]} {key[1]}"


def _table(report):
    header = "      k" + "".join(f"{_label(key):>12}" for key in report.series)
    rows = [header]
    for k in shown_ks(report.span):
        rows.append(f"{k:>7}" + "".join(f"{_number(report.flow[key][k]):>12}"
                                         for key in report.series))
    return rows


def _number(value, digits=3):
    """Scientific notation, but an exact 0 as plain 0 (the cell state at k = 0)."""
    return "0" if value == 0 else f"{value:.{digits}e}"


def _chart(report, unicode, width):
    """Horizontal bars, one block per series; length ~ log10(norm) on a scale
    shared by all series, so equal slopes look equal."""
    ks = shown_ks(report.span)
    values = np.array([[report.flow[key][k] for k in ks] for key in report.series])
    positive = values[values > 0]
    if not len(positive):
        return ["  (every gradient is 0)"]
    top = math.log10(positive.max())
    bottom = max(math.log10(positive.min()), top + math.log10(NOISE_FLOOR)) - 0.5
    lines = [f"  scale: {10 ** bottom:.1e} (empty) to {10 ** top:.1e} (full)"]
    for key, row in zip(report.series, values):
        lines.append(f"  {_label(key)}")
        for k, value in zip(ks, row):
            fill = 0.0 if value <= 0 else (math.log10(value) - bottom) / (top - bottom)
            lines.append(f"    {k:>5} {_bar(min(max(fill, 0.0), 1.0), width, unicode)} "
                         f"{_number(value, 2)}")
    return lines


_EIGHTHS = " ▏▎▍▌▋▊▉"


def _bar(fraction, width, unicode):
    """A bar of fraction * width cells, in eighths of a cell with unicode."""
    if not unicode:
        return ("#" * round(fraction * width)).ljust(width)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def can_draw_blocks(stream=None):
    """Whether `stream` (default stdout) can print the unicode block characters."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        ("█" + _EIGHTHS).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def write_csv(report, path):
    """One row per k: k, then the mean norm of each series (layer0_h, layer0_c, ...)."""
    columns = [f"layer{layer}_{state}" for layer, state in report.series]
    try:
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["k"] + columns)
            for k in range(report.span + 1):
                writer.writerow([k] + [repr(float(report.flow[key][k])) for key in report.series])
    except OSError as error:
        raise DataError(f"{path}: cannot write the CSV: {error.strerror or error}") from None


def require_matplotlib():
    """The matplotlib module, or a UsageError naming the extra to install."""
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError(f"--plot needs matplotlib, which is not installed: "
                         f"{PLOT_HINT}") from None


def write_plot(report, path):
    """A PNG of the flow curves on a log scale, with their fitted decay lines."""
    require_matplotlib()
    # The object-oriented API with the Agg canvas: no pyplot global state and
    # no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ks = np.arange(report.span + 1)
    for key in report.series:
        curve = report.flow[key]
        shown = curve > 0
        line, = axes.semilogy(ks[shown], curve[shown], label=_plot_label(report, key))
        d = report.decay[key]
        if d is not None:
            fit_ks = np.arange(d.first_k, d.last_k + 1)
            axes.semilogy(fit_ks, d.fitted(fit_ks), linestyle="--", linewidth=0.8,
                          color=line.get_color())
    axes.set_xlabel("k (steps back from the loss)")
    axes.set_ylabel("mean |d loss_t / d state_{t-k}|")
    title = f"gradient flow: {report.cell}, {report.layers} x {report.hidden}"
    if report.labels.get("model"):
        title += f" ({os.path.basename(report.labels['model'])})"
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise DataError(f"{path}: cannot write the plot: {error.strerror or error}") from None


def _plot_label(report, key):
    d = report.decay[key]
    return _label(key) + ("" if d is None else f": {_factor_text(d.factor)} per step")


# ---------------------------------------------------------------------------
# The `charlm gradients` command
# ---------------------------------------------------------------------------

def gradients_command(model_path, text_path=None, span=DEFAULT_SPAN, windows=DEFAULT_WINDOWS,
                      burn_in=DEFAULT_BURN_IN, seed=0, plot=None, csv_path=None,
                      encoding=None, errors=None, echo=print):
    """What `charlm gradients` does; returns the GradientReport.

    Options are checked, and matplotlib looked for, before the (long)
    measurement, so a mistake costs no waiting.
    """
    from .lm import load
    check_options(span, windows, burn_in, seed)
    if plot is not None:
        require_matplotlib()
    for path in (plot, csv_path):
        if path is not None:
            _check_writable_dir(path)
    lm = load(model_path)
    ids, text_label = _text_ids(lm, model_path, text_path, encoding, errors)
    report = measure(lm.config, lm.model.params, ids, span, windows, burn_in, seed)
    report.labels = {"model": os.fspath(model_path), "text": text_label}
    echo(format_report(report, unicode=can_draw_blocks()))
    if csv_path is not None:
        write_csv(report, csv_path)
        echo(f"\nper-k numbers written to {csv_path}")
    if plot is not None:
        write_plot(report, plot)
        echo(f"plot written to {plot}")
    return report


def _check_writable_dir(path):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DataError(f"{path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise DataError(f"{path}: the directory {directory} is not writable")


def _text_ids(lm, model_path, text_path, encoding, errors):
    """(ids, description) of --text, or else of the model's own validation text."""
    from .data import read_text
    if text_path is not None:
        text = "".join(read_text(text_path, encoding or "utf-8", errors or "strict"))
        ids, skipped = lm.vocab.encode_with_count(text, "skip")
        note = f", {skipped:,} characters outside the model's vocabulary skipped" if skipped else ""
        return ids, f"{text_path} ({len(ids):,} characters{note})"
    if encoding is not None or errors is not None:
        raise UsageError("--encoding and --errors are for a --text file; the model's own "
                         "validation text is read as it was for training")
    ids, corpus_path = validation_ids(lm, model_path)
    return ids, (f"the model's validation text: the last part of {corpus_path} "
                 f"({len(ids):,} characters)")


def validation_ids(lm, model_path):
    """(ids, corpus path) of the validation part of the text the model was
    trained on, re-read from its file and checked against the fingerprint in
    the model's metadata; UsageError asking for --text when that fails."""
    from .data import prepare_corpus
    corpus = lm.meta.get("corpus")
    train = lm.meta.get("train")
    if not isinstance(corpus, dict) or not isinstance(train, dict) \
            or not isinstance(corpus.get("path"), str):
        raise UsageError(f"{model_path} does not record the text it was trained on; "
                         f"pass --text FILE")
    path = corpus["path"]
    if not os.path.isfile(path):
        raise UsageError(f"{model_path} was trained on {path}, which no longer exists; "
                         f"pass --text FILE")
    if not train.get("val_frac"):
        raise UsageError(f"{model_path} was trained without a validation split; "
                         f"pass --text FILE")
    with tempfile.TemporaryDirectory(prefix="charlm-gradients-") as workdir:
        try:
            prepared = prepare_corpus(path, workdir, train.get("encoding", "utf-8"),
                                      train.get("errors", "strict"), train["val_frac"])
        except CharlmError as error:
            raise UsageError(f"cannot re-read the model's training text: {error}; "
                             f"pass --text FILE") from None
        if prepared.fingerprint != corpus.get("fingerprint"):
            raise UsageError(f"{path} has changed since {model_path} was trained on it; "
                             f"pass --text FILE")
        return np.array(prepared.val_ids), path


# ---------------------------------------------------------------------------
# The exploding case
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExplodingChain:
    """A chain of sigmoid units and the gradient of its output.

    weights, biases, pre_activations, outputs: one value per layer, layer 1 first.
    grads: {"weight": d y_L / d w_l, "bias": d y_L / d b_l}, arrays of one
    value per layer: the form charlm.optim's clipping functions take.
    """

    weights: np.ndarray
    biases: np.ndarray
    pre_activations: np.ndarray
    outputs: np.ndarray
    grads: dict


def exploding_chain(layers, weight=100.0, x=1.0):
    """The classic exploding-gradient example, computed exactly.

    y_0 = x, z_l = w y_{l-1} + b_l, y_l = sigmoid(z_l) for l = 1..layers,
    and the loss is y_L. Every weight is w = 100 and each bias is chosen as
    b_l = -w y_{l-1}, so every pre-activation z_l is 0, where sigmoid' is at
    its largest, 1/4. Going back one layer multiplies the gradient by
    d y_l / d y_{l-1} = sigmoid'(0) w = 25, so the gradient for the first
    layer's parameters is 25^(L-1) times the last layer's. (In float64 every
    number here is exact: sigmoid(0) = 1/2 and 25 are representable.)

    >>> chain = exploding_chain(4)
    >>> chain.grads["bias"].tolist()            # 25^3, 25^2, 25, 1, times 1/4
    [3906.25, 156.25, 6.25, 0.25]
    """
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise UsageError(f"layers must be a positive integer, got {layers!r}")
    weights = np.full(layers, float(weight))
    biases, z, y = np.empty(layers), np.empty(layers), np.empty(layers)
    previous = float(x)
    for layer in range(layers):
        biases[layer] = -weights[layer] * previous
        z[layer] = weights[layer] * previous + biases[layer]
        y[layer] = reference.sigmoid(z[layer])
        previous = y[layer]
    # Backward: d y_L / d z_l, from the top down.
    d_z = np.empty(layers)
    d_y = 1.0
    for layer in reversed(range(layers)):
        d_z[layer] = reference.sigmoid_backward(d_y, y[layer])
        d_y = d_z[layer] * weights[layer]           # z_l = w y_{l-1} + b_l
    inputs = np.concatenate([[float(x)], y[:-1]])
    grads = {"weight": d_z * inputs, "bias": d_z.copy()}
    return ExplodingChain(weights, biases, z, y, grads)


def cosine(a, b):
    """The cosine of the angle between two gradients (dicts of arrays, same keys)."""
    dot = sum(float(np.vdot(a[name], b[name])) for name in a)
    norm_a = math.sqrt(sum(float(np.vdot(g, g)) for g in a.values()))
    norm_b = math.sqrt(sum(float(np.vdot(g, g)) for g in b.values()))
    return dot / (norm_a * norm_b)


def clipping_effect(grads, max_norm=1.0, max_value=1.0):
    """What each clipping does to a gradient (a dict of arrays; not changed).

    Returns {"norm": the norm before, "norm_clipped": after clipping by
    global norm to max_norm, "norm_clip_cosine": its cosine with the
    original, "value_clipped": the norm after clipping each element to
    [-max_value, max_value], "value_clip_cosine": its cosine}.
    Norm clipping rescales the whole vector, so its cosine is 1; value
    clipping flattens the large elements and not the small ones, so it turns
    the vector.
    """
    from .optim import clip_by_global_norm, clip_by_value, global_norm
    by_norm = {name: np.array(g, np.float64) for name, g in grads.items()}
    by_value = {name: np.array(g, np.float64) for name, g in grads.items()}
    norm, _ = clip_by_global_norm(by_norm, max_norm)
    clip_by_value(by_value, max_value)
    return {"norm": norm, "norm_clipped": global_norm(by_norm),
            "norm_clip_cosine": cosine(grads, by_norm),
            "value_clipped": global_norm(by_value),
            "value_clip_cosine": cosine(grads, by_value)}
