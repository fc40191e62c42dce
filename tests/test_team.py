"""A single stream's recurrence shared by a team of threads (charlm/_team.h).

Each member owns a share of the units (and their rows of W_hh), so the
shares' edges, a narrower last strip of the GEMV and every cell's gather and
scatter of its gate blocks all show up as a difference from the one-thread
kernel, which must be matched to the last bit: every output is summed in the
same order either way.
"""

import numpy as np
import pytest

from charlm import _kernels as K
from charlm import evaluate
from charlm.model import Config, Model
from charlm.parallel import blas_threads, one_stream_team

STEPS = 260     # over the kernels' minimum for laying W_hh out (256)

# The smallest hidden sizes whose W_hh is over the 512 KB limit, and one that
# shares into widths that are no multiple of a strip or a vector.
HIDDEN = {
    ("lstm", np.float32): [184, 200], ("lstm", np.float64): [136],
    ("gru", np.float32): [216], ("gru", np.float64): [150, 170],
    ("rnn", np.float32): [370], ("rnn", np.float64): [260],
}


def _arrays(cell, H, dtype, rng):
    """Inputs and NaN-filled outputs of one forward kernel, B = 1."""
    blocks = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    G = blocks * H
    a = {
        "gates": rng.standard_normal((STEPS, 1, G)).astype(dtype),
        "W_hh": (rng.standard_normal((G, H)) / np.sqrt(H)).astype(dtype),
        "h": np.full((STEPS + 1, 1, H), np.nan, dtype),
    }
    a["h"][0] = rng.standard_normal((1, H))
    if cell == "lstm":
        a["c"] = np.full((STEPS + 1, 1, H), np.nan, dtype)
        a["c"][0] = rng.standard_normal((1, H))
        a["tanh_c"] = np.full((STEPS, 1, H), np.nan, dtype)
    if cell == "gru":
        a["b_hh"] = rng.standard_normal(G).astype(dtype)
        a["hn"] = np.full((STEPS, 1, H), np.nan, dtype)
        a["hh"] = np.zeros((1, G), dtype)
    return a


def _forward(cell, a, variant, threads):
    with one_stream_team(threads):
        if cell == "lstm":
            peep = a["peep"] if variant == "peephole" else None
            K.lstm_forward(a["gates"], a["W_hh"], a["h"], a["c"], a["tanh_c"], peep)
        elif cell == "gru":
            K.gru_forward(a["gates"], a["W_hh"], a["b_hh"], a["h"], a["hn"], a["hh"])
        else:
            K.rnn_forward(variant == "relu", a["gates"], a["W_hh"], a["h"])
    return a


CASES = [("lstm", "plain"), ("lstm", "peephole"), ("gru", "plain"),
         ("rnn", "tanh"), ("rnn", "relu")]


@pytest.mark.parametrize("cell,variant", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_team_matches_one_thread_to_the_last_bit(cell, variant, dtype, threads):
    for H in HIDDEN[cell, dtype]:
        rng = np.random.default_rng(H)
        alone = _arrays(cell, H, dtype, rng)
        if variant == "peephole":
            alone["peep"] = rng.standard_normal((3, H)).astype(dtype)
        team = {name: value.copy() for name, value in alone.items()}
        with blas_threads(1):        # one thread: the own GEMV, the team's order of sums
            _forward(cell, alone, variant, threads=1)
            runs = K.team_runs()
            _forward(cell, team, variant, threads=threads)
            assert K.team_runs() == runs + 1
        for name, value in alone.items():
            if name == "hh":            # gru_forward's scratch, not an output
                continue
            assert np.isfinite(value).all(), f"{name} not all written (H={H})"
            np.testing.assert_array_equal(team[name], value, err_msg=f"{name}, H={H}")


def test_team_setting_is_clamped_and_restored():
    before = K.set_one_stream_threads(1)
    try:
        with one_stream_team(64):
            assert K.set_one_stream_threads(1) == 4       # CHARLM_TEAM_MAX
            K.set_one_stream_threads(4)
        assert K.set_one_stream_threads(0) == 1
        assert K.set_one_stream_threads(1) == 1           # 0 means one thread
    finally:
        K.set_one_stream_threads(before)


@pytest.mark.parametrize("cell,hidden", [("lstm", 232), ("gru", 264)])
def test_scores_do_not_depend_on_the_cores(cell, hidden, monkeypatch):
    """A model over the pipeline's limit: a team on 2 cores, one thread on 1;
    chunks long enough for the team and a ragged last one too short for it."""
    model = Model(Config(vocab_size=13, cell=cell, hidden=hidden, layers=2), seed=3)
    assert model.params["weight_hh_l0"].nbytes > evaluate.PIPELINE_MAX_WEIGHT_BYTES
    ids = np.random.default_rng(5).integers(0, 13, 700).astype(np.int32)
    figures, team_runs = {}, {}
    for cores in (1, 2):
        monkeypatch.setattr(evaluate, "usable_cores", lambda: cores)
        assert not evaluate._pipeline_pays(model)
        runs = K.team_runs()
        figures[cores] = evaluate.log_probs(model, ids, chunk=300)
        team_runs[cores] = K.team_runs() - runs
    assert team_runs == {1: 0, 2: 2 * 2}        # 2 layers x the 2 chunks of 300 steps
    assert figures[1].shape == (699,) and np.isfinite(figures[1]).all()
    np.testing.assert_array_equal(figures[2], figures[1])
