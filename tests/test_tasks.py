"""The long-range tasks (`charlm task`): generators, chance, held-out set, CLI,
and the vanishing-gradient result itself: an LSTM remembers across a lag at
which a tanh RNN of the same size stays at chance."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from charlm.cli import main
from charlm.model import IGNORE, Config, Model
from charlm.tasks import (MAX_NONFINITE_STREAK, AddingTask, CopyTask, TaskOptions,
                          chance_accuracy, chance_loss, held_out_set, make_task, run_task,
                          train)


def invoke(*args):
    return CliRunner().invoke(main, ["task", *[str(a) for a in args]])


# -- generators ---------------------------------------------------------------------

@pytest.mark.parametrize("lag", [1, 2, 7, 40])
def test_copy_answer_is_exactly_the_symbol_lag_steps_back(lag):
    task = CopyTask(lag)
    x, y = task.sample(np.random.default_rng(lag), 500)
    assert x.shape == y.shape == (lag + 1, 500) and x.dtype == np.int32
    symbols = [task.vocab.index(c) for c in task.SYMBOLS]
    distractors = [task.vocab.index(c) for c in task.DISTRACTORS]
    assert np.isin(x[0], symbols).all()
    assert np.isin(x[1:lag], distractors).all()           # nothing else to remember
    assert (x[-1] == task.vocab.index("?")).all()
    assert (y[:-1] == IGNORE).all()                        # only the answer is scored
    assert np.array_equal(y[-1], x[-1 - lag])
    # every symbol turns up as an answer, about equally often
    counts = Counter(y[-1].tolist())
    assert sorted(counts) == symbols and min(counts.values()) > 30


@pytest.mark.parametrize("lag", [2, 3, 10, 25, 80])
def test_adding_answer_is_the_sum_of_the_two_marked_digits(lag):
    task = AddingTask(lag)
    x, y = task.sample(np.random.default_rng(lag), 400)
    assert x.shape == (lag + 1, 400)
    assert (x[-1] == task.vocab.index("=")).all() and (y[:-1] == IGNORE).all()
    text = ["".join(task.vocab[i] for i in column) for column in x.T]
    for b, sequence in enumerate(text):
        marked = [(t, task.MARKED.index(c)) for t, c in enumerate(sequence) if c in task.MARKED]
        assert len(marked) == 2, sequence
        (first, a_digit), (second, b_digit) = marked
        assert first < max(1, lag // 10) and lag // 2 <= second < lag
        assert all(c in task.DIGITS for t, c in enumerate(sequence[:-1])
                   if t not in (first, second))
        assert task.vocab[y[-1, b]] == "0123456789abcdefghi"[a_digit + b_digit]


def test_chance_is_the_best_constant_guess():
    copy, adding = make_task("copy", 5), make_task("adding", 5)
    assert chance_accuracy(copy) == pytest.approx(1 / 8)
    assert chance_loss(copy) == pytest.approx(math.log(8))
    # the sum of two uniform digits is triangular: P(s) = (10 - |s - 9|) / 100
    p = [(10 - abs(s - 9)) / 100 for s in range(19)]
    assert chance_accuracy(adding) == pytest.approx(0.10)
    assert chance_loss(adding) == pytest.approx(-sum(q * math.log(q) for q in p))
    # ... and a constant guess scores that on sampled answers: "9" is the best
    _, y = adding.sample(np.random.default_rng(0), 20000)
    answer, n = Counter(y[-1].tolist()).most_common(1)[0]
    assert adding.vocab[answer] == "9" and n / 20000 == pytest.approx(0.10, abs=0.01)


def test_held_out_set_is_fixed_by_the_seed_and_apart_from_training():
    task = CopyTask(12)
    x1, y1 = held_out_set(task, 3, 64)
    x2, y2 = held_out_set(task, 3, 64)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(held_out_set(task, 4, 64)[0], x1)
    # the training stream of the same seed draws other sequences
    from charlm.tasks import _streams
    assert not np.array_equal(task.sample(_streams(3)[0], 64)[0], x1)


def test_a_run_is_reproducible_and_reports_clipping():
    options = TaskOptions(lag=6, cell="gru", hidden=8, steps=20, batch_size=8,
                          eval_sequences=40, clip_norm=0.0, clip_value=1e-6)
    first, second = run_task(options), run_task(options)
    assert first.accuracy == second.accuracy and first.loss == second.loss
    assert first.steps_done == 20 and first.clipped_frac == 1.0   # every step hits 1e-6
    assert first.chance == 0.125 and 0.0 < first.loss < 10


def test_a_gradient_that_stays_non_finite_stops_training_and_is_reported():
    task = CopyTask(4)
    model = Model(Config(vocab_size=len(task.vocab), cell="rnn", hidden=4, layers=1))
    model.params["out.bias"][0] = np.inf
    log = train(model, task, TaskOptions(lag=4, steps=50, batch_size=4))
    assert log.stopped_early and log.skipped == MAX_NONFINITE_STREAK and not log.losses
    assert np.isinf(model.params["out.bias"][0])            # no update was applied


# -- the command ----------------------------------------------------------------------

def test_cli_prints_one_summary_line_or_json():
    result = invoke("copy", "--lag", 5, "--cell", "rnn", "--hidden", 16, "--steps", 30,
                    "--eval-sequences", 50)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("copy lag 5, rnn 1x16 (clip-norm 1): accuracy ")
    assert "(chance 0.125)" in lines[0] and "30 steps" in lines[0]
    result = invoke("adding", "--lag", 6, "--hidden", 8, "--steps", 10, "--eval-sequences",
                    20, "--clip-norm", 0, "--optimizer", "adam", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["task"] == "adding" and figures["chance"] == pytest.approx(0.1)
    assert figures["clip_norm"] == 0 and figures["steps_done"] == 10
    assert 0 <= figures["accuracy"] <= 1 and figures["seconds"] > 0


@pytest.mark.parametrize("args, words", [
    (["copy", "--lag", "0"], "--lag must be an integer in 1..2000"),
    (["copy", "--lag", "5000"], "--lag must be an integer in 1..2000"),
    (["adding", "--lag", "1"], "--lag must be an integer in 2..2000"),
    (["copy", "--hidden", "0"], "--hidden"),
    (["copy", "--steps", "-3"], "--steps"),
    (["copy", "--batch-size", "0"], "--batch-size"),
    (["copy", "--eval-sequences", "0"], "--eval-sequences"),
    (["copy", "--lr", "0"], "--lr"),
    (["copy", "--lr", "nan"], "--lr"),
    (["copy", "--clip-norm", "-1"], "--clip-norm"),
    (["copy", "--clip-value", "inf"], "--clip-value"),
    (["copy", "--cell", "transformer"], "--cell"),
    (["reverse"], "reverse"),
])
def test_cli_bad_options_give_one_line_and_exit_code_2(args, words):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert words in result.output and "Traceback" not in result.output


# -- the point ------------------------------------------------------------------------

def test_lstm_remembers_across_a_lag_where_a_tanh_rnn_stays_at_chance():
    """Copy at lag 40, same size (1 x 64), same budget: the LSTM's additive
    cell path carries the gradient back 40 steps; the tanh RNN's Jacobian
    product does not, and it learns nothing (about 10 s in all).

    The budget has margin: the LSTM solves this between steps 1,500 and 1,700
    for seed 0 in some builds (the rounding of another vector width or of the
    debug build changes the trajectory), so it gets 2,000."""
    budget = dict(task="copy", lag=40, hidden=64, steps=2000, eval_sequences=500, seed=0)
    lstm = run_task(TaskOptions(cell="lstm", **budget))
    rnn = run_task(TaskOptions(cell="rnn", **budget))
    assert lstm.accuracy > 0.95, lstm.summary()
    assert rnn.accuracy < 0.2, rnn.summary()         # chance is 0.125
    assert rnn.loss > 0.9 * rnn.chance_loss, rnn.summary()
