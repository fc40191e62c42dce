"""Gradient-flow diagnostics (charlm.diagnostics, `charlm gradients`, `--record-decay`)
and the exploding-gradient example.

The decay is checked against theory on constructed weights where the
Jacobian of one step is known exactly, and the state gradients against
finite differences of a forward pass written here independently.
"""

import csv
import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from charlm import diagnostics, reference
from charlm.cli import main
from charlm.model import CELLS, Config, parameter_shapes
from charlm.optim import clip_by_global_norm
from charlm.train import output_paths

TEXT = "the cat sat on the mat; the dog sat on the log.\n" * 60   # 2,940 characters


def constructed_rnn(cell, a, V=5, H=4, input_scale=0.0, bias=0.0, seed=0):
    """A one-layer RNN with W_hh = a * I and every input and bias weight
    input_scale * U(0.5, 1) plus `bias`: the one-step Jacobian is a * act'."""
    config = Config(vocab_size=V, cell=cell, hidden=H, layers=1, dtype="float64")
    rng = np.random.default_rng(seed)
    params = {"weight_ih_l0": input_scale * rng.uniform(0.5, 1, (H, V)),
              "weight_hh_l0": a * np.eye(H),
              "bias_ih_l0": np.full(H, float(bias)), "bias_hh_l0": np.zeros(H),
              "out.weight": rng.normal(0, 1, (V, H)), "out.bias": np.zeros(V)}
    return config, params


def random_ids(n, V=5, seed=1):
    return np.random.default_rng(seed).integers(0, V, n)


# --- decay against theory -------------------------------------------------------

@pytest.mark.parametrize("a", [0.8, 1.1])
def test_a_linear_rnn_decays_by_exactly_a_per_step(a):
    """ReLU with every pre-activation positive is the identity, so one step
    back multiplies the gradient by W_hh^T = a I: exactly a per step (and
    growth for a > 1, the exploding side)."""
    config, params = constructed_rnn("rnn-relu", a, input_scale=1.0, bias=0.1)
    report = diagnostics.measure(config, params, random_ids(400), span=20, windows=8,
                                 burn_in=10)
    flow = report.flow[0, "h"]
    np.testing.assert_allclose(flow[1:] / flow[:-1], a, rtol=1e-9)
    assert report.decay[0, "h"].factor == pytest.approx(a, rel=1e-9)
    assert (report.decay[0, "h"].first_k, report.decay[0, "h"].last_k) == (0, 20)
    assert {name: frac for name, _, frac in report.saturation[0]} == {"h": 0.0}
    assert report.spectral[0]["W_hh"] == pytest.approx(a, rel=1e-12)
    if a < 1:
        assert report.decay[0, "h"].describe() == "0.8 per step: down to 1% after 21 steps"
        assert report.decay[0, "h"].below_1pct_at is None        # 0.8^20 = 1.15%
    else:
        assert report.decay[0, "h"].describe() == "1.1 per step: grows 100-fold in 49 steps"


def tanh_fixed_point(a, b):
    h = 0.0
    for _ in range(10_000):
        h = math.tanh(a * h + b)
    return h


@pytest.mark.parametrize("bias", [0.0, 2.0])
def test_a_tanh_rnn_near_saturation_decays_faster(bias):
    """With no input, h settles at h* = tanh(a h* + b), and one step back
    multiplies the gradient by a * (1 - h*^2): a near zero (b = 0), far less
    when the units are saturated (b = 2)."""
    a = 0.9
    config, params = constructed_rnn("rnn", a, bias=bias)
    report = diagnostics.measure(config, params, random_ids(500), span=30, windows=4,
                                 burn_in=200)
    expected = a * (1 - tanh_fixed_point(a, bias) ** 2)
    assert report.decay[0, "h"].factor == pytest.approx(expected, rel=1e-9)
    saturation = report.saturation[0][0][2]
    if bias:
        assert expected < 0.1 and saturation == 1.0
    else:
        assert expected == a and saturation == 0.0


def test_saturated_tanh_decays_faster_than_near_zero_on_the_same_weights():
    """The same random tanh RNN (W_hh = 0.95 times an orthogonal matrix, small
    random inputs), driven near zero and, by biases of +-2.5, near saturation."""
    H, V = 8, 5
    config = Config(vocab_size=V, cell="rnn", hidden=H, layers=1, dtype="float64")
    rng = np.random.default_rng(4)
    base = {"weight_ih_l0": rng.normal(0, 0.05, (H, V)),
            "weight_hh_l0": 0.95 * np.linalg.qr(rng.normal(size=(H, H)))[0],
            "bias_hh_l0": np.zeros(H), "out.weight": rng.normal(0, 1, (V, H)),
            "out.bias": np.zeros(V)}
    signs = rng.choice([-1.0, 1.0], H)
    reports = [diagnostics.measure(config, dict(base, bias_ih_l0=bias * signs),
                                   random_ids(500), span=20, windows=8, burn_in=50)
               for bias in (0.0, 2.5)]
    near_zero, saturated = (r.decay[0, "h"].factor for r in reports)
    assert saturated < 0.1 and 0.8 < near_zero < 0.95
    assert reports[0].saturation[0][0][2] == 0.0 and reports[1].saturation[0][0][2] > 0.9


def test_spectral_norms_of_each_gate_block():
    """Stacked orthogonal blocks scaled by 1..4: each block's norm is its
    scale, and W^T W = (1 + 4 + 9 + 16) I, so the whole has norm sqrt(30)."""
    H = 6
    config = Config(vocab_size=4, cell="lstm", hidden=H, layers=1, dtype="float64")
    rng = np.random.default_rng(0)
    blocks = [s * np.linalg.qr(rng.normal(size=(H, H)))[0] for s in (1, 2, 3, 4)]
    params = {name: np.zeros(shape) for name, shape in parameter_shapes(config).items()}
    params["weight_hh_l0"] = np.concatenate(blocks)
    norms = diagnostics.spectral_norms(config, params)[0]
    assert norms == pytest.approx({"W_hh": math.sqrt(30), "i": 1, "f": 2, "g": 3, "o": 4},
                                  rel=1e-12)


# --- the state gradients against finite differences -------------------------------

def perturbed_loss(config, p, inputs, target, layer_at, t_at, delta_h, delta_c):
    """Sum over rows of -log p(target | inputs), with delta_h (delta_c) added to
    layer `layer_at`'s h (c) right after step t_at computes it: written here
    step by step from the reference's cell steps, independently of the
    diagnostics' backward pass."""
    batch = inputs.shape[1]
    layer_inputs = list(inputs)
    for layer in range(config.layers):
        W_ih, b_ih = p[f"weight_ih_l{layer}"], p[f"bias_ih_l{layer}"]
        W_hh, b_hh = p[f"weight_hh_l{layer}"], p[f"bias_hh_l{layer}"]
        step = reference.CELL_STEPS[config.cell][0]
        if config.cell == "lstm-peephole":
            step = partial(step, peep=p[f"weight_peep_l{layer}"])
        h = np.zeros((batch, config.hidden))
        c = np.zeros_like(h) if config.has_cell_state else None
        outputs = []
        for t, x_t in enumerate(layer_inputs):
            a_x = W_ih[:, x_t].T + b_ih if layer == 0 else x_t @ W_ih.T + b_ih
            h, c, _ = step(a_x, h @ W_hh.T + b_hh, h, c)
            if (layer, t) == (layer_at, t_at):
                h = h + delta_h
                if c is not None:
                    c = c + delta_c
            outputs.append(h)
        layer_inputs = outputs
    logits = layer_inputs[-1] @ p["out.weight"].T + p["out.bias"]
    return -reference.log_softmax(logits)[np.arange(batch), target].sum()


@pytest.mark.parametrize("cell", CELLS)
def test_state_gradients_match_finite_differences(cell):
    V, H, layers, burn, span, batch = 5, 3, 2, 3, 4, 2
    config = Config(vocab_size=V, cell=cell, hidden=H, layers=layers, dtype="float64")
    rng = np.random.default_rng(3)
    p = {name: rng.normal(0, 0.8, shape) for name, shape in parameter_shapes(config).items()}
    inputs = rng.integers(0, V, (burn + span + 1, batch))
    target = rng.integers(0, V, batch)
    grads = diagnostics.state_gradients(config, p, inputs[:burn], inputs[burn:], target)
    assert grads.dh.shape == (layers, span + 1, batch, H)
    assert (grads.dc is None) == (not config.has_cell_state)

    eps, worst = 1e-6, 0.0
    for layer in range(layers):
        for k in range(span + 1):
            t = burn + span - k
            for state, analytic in (("h", grads.dh), ("c", grads.dc)):
                if analytic is None:
                    continue
                for index in np.ndindex(batch, H):
                    delta = np.zeros((batch, H))
                    delta[index] = eps
                    zero = np.zeros((batch, H))
                    up, down = ((delta * s, zero) if state == "h" else (zero, delta * s)
                                for s in (1, -1))
                    numeric = (perturbed_loss(config, p, inputs, target, layer, t, *up)
                               - perturbed_loss(config, p, inputs, target, layer, t, *down)
                               ) / (2 * eps)
                    value = analytic[layer, k][index]
                    worst = max(worst, abs(numeric - value) / (1e-8 + 1e-6 * abs(value)))
    assert worst < 1
    if grads.dc is not None:     # carried into the next step: nothing at k = 0
        assert not grads.dc[:, 0].any() and grads.dc[:, 1].any()
    np.testing.assert_allclose(
        grads.loss, [perturbed_loss(config, p, inputs[:, [b]], target[[b]], 0, -1, 0, 0)
                     for b in range(batch)], rtol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm-peephole"])
def test_the_report_is_the_mean_norm_over_windows(cell):
    config = Config(vocab_size=5, cell=cell, hidden=4, layers=2, dtype="float32")
    rng = np.random.default_rng(5)
    params = {name: rng.normal(0, 0.5, shape).astype(np.float32)
              for name, shape in parameter_shapes(config).items()}
    ids = random_ids(60)
    report = diagnostics.measure(config, params, ids, span=6, windows=3, burn_in=4, seed=2)
    starts = np.random.default_rng(2).choice(60 - 8 - 4 + 1, size=3, replace=False)
    text = ids[starts[None, :] + np.arange(4 + 8)[:, None]]
    grads = diagnostics.state_gradients(config, params, text[:4], text[4:-1], text[-1])
    np.testing.assert_allclose(report.flow[1, "h"],
                               np.linalg.norm(grads.dh[1], axis=-1).mean(axis=-1), rtol=1e-12)
    names = [name for name, _, _ in report.saturation[0]]
    assert names == (["r", "z", "n"] if cell == "gru" else ["i", "f", "g", "o", "tanh(c)"])
    assert set(report.flow) == ({(0, "h"), (1, "h")} if cell == "gru"
                                else {(0, "h"), (0, "c"), (1, "h"), (1, "c")})


# --- the fit and its wording --------------------------------------------------------

def test_fit_uses_the_part_above_the_noise_floor():
    curve = np.array([0.0, 2.0, 1.0, 0.5, 0.25, 1e-14, 3e-15, 0.1])
    decay = diagnostics.fit_decay(curve)
    assert (decay.first_k, decay.last_k) == (1, 4)
    assert decay.factor == pytest.approx(0.5, rel=1e-12)
    np.testing.assert_allclose(decay.fitted([1, 4]), [2.0, 0.25], rtol=1e-12)
    assert diagnostics.fit_decay(np.zeros(5)) is None
    assert diagnostics.fit_decay(np.array([1.0, 0.0, 0.0])) is None
    assert diagnostics.fit_decay(np.array([1.0, np.nan])) is None


@pytest.mark.parametrize("factor, text", [
    (0.83, "0.83 per step: down to 1% after 25 steps"),
    (0.99991, "0.99991 per step: down to 1% after 51,167 steps"),
    (0.001, "0.001 per step: down to 1% after 1 step"),
    (1.0, "1 per step: no decay"),
    (None, "n/a (no gradient above the noise floor)"),
])
def test_describe_factor(factor, text):
    assert diagnostics.describe_factor(factor) == text


def test_bad_measurement_options_are_usage_errors():
    config, params = constructed_rnn("rnn", 0.5)
    for options in ({"span": 0}, {"span": -1}, {"span": 10**9}, {"windows": 0},
                    {"burn_in": -1}, {"span": 2.5}):
        with pytest.raises(diagnostics.UsageError):
            diagnostics.measure(config, params, random_ids(100), **options)
    with pytest.raises(diagnostics.UsageError, match="needs at least 52"):
        diagnostics.measure(config, params, random_ids(51), span=50)


# --- the exploding case -------------------------------------------------------------

def test_the_exploding_chain_multiplies_the_gradient_by_25_per_layer():
    chain = diagnostics.exploding_chain(10)
    assert not chain.pre_activations.any()
    assert (chain.outputs == 0.5).all()
    bias_grads = chain.grads["bias"]
    assert bias_grads[-1] == 0.25
    assert (bias_grads[:-1] / bias_grads[1:] == 25).all()         # exactly, in float64
    assert bias_grads[0] == 0.25 * 25.0 ** 9
    np.testing.assert_array_equal(chain.grads["weight"],
                                  bias_grads * np.r_[1.0, np.full(9, 0.5)])


def test_norm_clipping_keeps_the_direction_and_value_clipping_turns_it():
    grads = diagnostics.exploding_chain(10).grads
    effect = diagnostics.clipping_effect(grads, max_norm=1.0, max_value=1.0)
    assert effect["norm"] > 25.0 ** 9 * 0.25
    assert effect["norm_clipped"] == pytest.approx(1.0, rel=1e-12)
    assert effect["norm_clip_cosine"] == pytest.approx(1.0, abs=1e-12)
    # 9 of the 10 weight and 9 of the 10 bias gradients exceed 1 and become 1,
    # so the clipped vector points equally along 18 axes, while the original
    # points along the first layer's two: cosine ~ 2 / sqrt(2 * 18) = 1/3.
    original = np.concatenate([grads["weight"], grads["bias"]])
    value_clipped = np.r_[np.ones(9), 0.125, np.ones(9), 0.25]
    expected = original @ value_clipped / np.linalg.norm(original) / np.linalg.norm(value_clipped)
    assert effect["value_clip_cosine"] == pytest.approx(expected, rel=1e-12)
    assert 0.33 < expected < 0.35
    assert effect["value_clipped"] == pytest.approx(np.linalg.norm(value_clipped), rel=1e-12)
    clipped = {name: g.copy() for name, g in grads.items()}
    clip_by_global_norm(clipped, 1.0)
    assert diagnostics.cosine(grads, clipped) == pytest.approx(1.0, abs=1e-12)
    assert grads["bias"][0] == 0.25 * 25.0 ** 9                  # the input is not changed


# --- the command line ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(train_tiny):
    root, out, trainer = train_tiny(TEXT, cell="lstm", layers=2, hidden=8, max_steps=20,
                                    eval_every=10, record_decay=True)
    return root, out, trainer


def invoke(*args):
    return CliRunner().invoke(main, ["gradients", *(str(a) for a in args)])


def test_gradients_prints_the_table_on_the_validation_text(trained):
    root, out, trainer = trained
    result = invoke(out, "--span", 12, "--windows", 5, "--burn-in", 20)
    assert result.exit_code == 0, result.output
    val_ids = np.array(trainer.corpus.val_ids)
    report = diagnostics.measure(trainer.model.config, trainer.model.params, val_ids,
                                 span=12, windows=5, burn_in=20)
    text = result.output
    assert f"the model's validation text: the last part of {root / 'corpus.txt'}" in text
    assert f"({len(val_ids):,} characters)" in text
    assert "layer 0 h   layer 0 c   layer 1 h   layer 1 c" in text
    row_12 = next(line for line in text.splitlines() if line.startswith("     12 "))
    assert row_12.split()[1:] == [f"{report.flow[key][12]:.3e}" for key in report.series]
    layer_1_h = report.decay[1, "h"]
    assert f"layer 1 h  {layer_1_h.describe()}" in text
    assert "█" in text and "Saturation" in text and "tanh(c)" in text
    assert f"layer 0: {report.spectral[0]['W_hh']:.4g}" in text


def test_gradients_writes_the_csv(trained, tmp_path):
    _, out, trainer = trained
    path = tmp_path / "flow.csv"
    result = invoke(out, "--span", 8, "--windows", 3, "--csv", path, "--seed", 4)
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == ["k", "layer0_h", "layer0_c", "layer1_h", "layer1_c"]
    assert [int(row[0]) for row in rows[1:]] == list(range(9))
    report = diagnostics.measure(trainer.model.config, trainer.model.params,
                                 np.array(trainer.corpus.val_ids), span=8, windows=3, seed=4)
    assert [float(row[3]) for row in rows[1:]] == list(report.flow[1, "h"])
    assert float(rows[1][2]) == 0.0 < float(rows[2][2])            # c at k = 0, k = 1


def test_gradients_on_a_given_text(trained, tmp_path):
    _, out, _ = trained
    other = tmp_path / "other.txt"
    other.write_text("the dog sat on the cat.\n" * 10 + "ZZZ", encoding="utf-8")
    result = invoke(out, "--text", other, "--span", 5, "--windows", 2)
    assert result.exit_code == 0, result.output
    assert f"text:  {other} (240 characters, 3 characters outside the model's vocabulary " \
           f"skipped)" in result.output


def test_gradients_plot(trained, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, _ = trained
    path = tmp_path / "flow.png"
    result = invoke(out, "--span", 6, "--windows", 2, "--plot", path)
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {path}" in result.output


def test_plot_without_matplotlib_is_one_line_naming_the_extra(trained, tmp_path, monkeypatch):
    _, out, _ = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import fails
    result = invoke(out, "--plot", tmp_path / "flow.png")
    assert result.exit_code == 2
    assert result.output == ("charlm: error: --plot needs matplotlib, which is not "
                             "installed: pip install 'charlm[plot]'\n")
    assert not (tmp_path / "flow.png").exists()


@pytest.mark.parametrize("args, words", [
    (["--span", "0"], "--span must be an integer from 1 to 10,000, got 0"),
    (["--span", "-5"], "--span must be an integer from 1 to 10,000, got -5"),
    (["--span", "1000000000"], "--span must be an integer from 1 to 10,000"),
    (["--windows", "0"], "--windows must be"),
    (["--burn-in", "-1"], "--burn-in must be"),
    (["--span", "5000"], "--span 5000 needs at least 5,002"),
    (["--encoding", "latin-1"], "--encoding and --errors are for a --text file"),
])
def test_bad_options_are_one_line_with_exit_code_2(trained, args, words):
    _, out, _ = trained
    result = invoke(out, *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("charlm: error: ") and words in result.output
    assert result.output.count("\n") == 1


def test_a_changed_or_missing_training_text_asks_for_text(train_tiny):
    root, out, _ = train_tiny(TEXT[:800], cell="rnn", layers=1, max_steps=2)
    (root / "corpus.txt").write_text(TEXT[:799] + "!", encoding="utf-8")
    result = invoke(out, "--span", 5)
    assert result.exit_code == 2
    assert "has changed since" in result.output and "pass --text FILE" in result.output
    (root / "corpus.txt").unlink()
    result = invoke(out, "--span", 5)
    assert result.exit_code == 2 and "no longer exists; pass --text FILE" in result.output


# --- during training ------------------------------------------------------------------

def test_the_decay_factor_is_recorded_at_each_evaluation(trained):
    _, out, trainer = trained
    metrics = Path(output_paths(str(out))["metrics"]).read_text()
    records = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    for r in records:
        assert r["decay_span"] == 50
        assert len(r["decay_h"]) == len(r["decay_c"]) == 2
        assert all(0 < f < 2 for f in r["decay_h"] + r["decay_c"])
        # already there: the norm before clipping and the share of steps clipped
        assert r["grad_norm_mean"] > 0 and 0 <= r["clipped_frac"] <= 1
    # the last record measured the final weights: measure them again
    again = diagnostics.training_record(trainer.model, trainer.corpus.val_ids, seed=0)
    assert {k: records[-1][k] for k in again} == again


def test_record_decay_from_the_command_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, [
        "train", str(corpus), "--out", str(out), "--cell", "gru", "--layers", "1",
        "--hidden", "8", "--batch-size", "4", "--seq-length", "8", "--max-steps", "3",
        "--eval-every", "3", "--sample-every", "0", "--no-progress", "--record-decay"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("step"))
    record = json.loads(Path(output_paths(str(out))["metrics"]).read_text())
    assert line.endswith(f"| decay h {record['decay_h'][0]:.3f}")
    assert "decay_c" not in record
