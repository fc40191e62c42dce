"""A single stream shared by a team of threads (charlm/_team.h): the
recurrences of evaluation, and sampling.

Each member owns a share of the units (and their rows of W_hh), so the
shares' edges, a narrower last strip of the GEMV and every cell's gather and
scatter of its gate blocks all show up as a difference from the one-thread
kernel, which must be matched to the last bit: every output is summed in the
same order either way.
"""

import threading

import numpy as np
import pytest

from charlm import _kernels as K
from charlm import evaluate, parallel, sampling
from charlm.model import Config, Model
from charlm.parallel import blas_threads, one_stream_team
from charlm.sampling import FusedSampler

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
        monkeypatch.setattr(parallel, "usable_cores", lambda: cores)
        assert not evaluate._pipeline_pays(model, cores)
        runs = K.team_runs()
        figures[cores] = evaluate.log_probs(model, ids, chunk=300)
        team_runs[cores] = K.team_runs() - runs
    assert team_runs == {1: 0, 2: 2 * 2}        # 2 layers x the 2 chunks of 300 steps
    assert figures[1].shape == (699,) and np.isfinite(figures[1]).all()
    np.testing.assert_array_equal(figures[2], figures[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [511, 512, 1300])
def test_chunk_projection_on_the_team_matches_one_thread(dtype, rows):
    """An upper layer's input projection over a single stream's chunk is
    shared out by rows while evaluating (one_stream_team): same bits as one
    thread; too few rows for two shares of 256 stay on one thread."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 200)).astype(dtype)
    W_ih = rng.standard_normal((520, 200)).astype(dtype)
    bias = rng.standard_normal(520).astype(dtype)
    alone, team = (np.full((rows, 520), np.nan, dtype) for _ in range(2))
    K.input_from_dense(x, W_ih, bias, alone)
    runs = K.team_runs()
    with one_stream_team(2):
        K.input_from_dense(x, W_ih, bias, team)
    assert K.team_runs() - runs == (rows >= 512)
    np.testing.assert_array_equal(team, alone)
    exact = x.astype(np.float64) @ W_ih.T.astype(np.float64) + bias
    np.testing.assert_allclose(team, exact, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-3 if dtype == np.float32 else 1e-10)


def test_long_chunks_score_the_same_on_one_or_two_cores(monkeypatch):
    """Chunks of 600 steps: the recurrences and the upper layer's projection
    run on the team on 2 cores; the figures are the one-thread figures."""
    model = Model(Config(vocab_size=13, cell="lstm", hidden=232, layers=2), seed=4)
    ids = np.random.default_rng(6).integers(0, 13, 1300).astype(np.int32)
    figures, team_runs = {}, {}
    for cores in (1, 2):
        monkeypatch.setattr(parallel, "usable_cores", lambda: cores)
        runs = K.team_runs()
        figures[cores] = evaluate.log_probs(model, ids, chunk=600)
        team_runs[cores] = K.team_runs() - runs
    assert team_runs == {1: 0, 2: 2 * 2 + 2}    # recurrences + layer 1's projections
    np.testing.assert_array_equal(figures[2], figures[1])


@pytest.mark.parametrize("hidden", [64, 232])           # the pipeline's size, the team's
def test_one_blas_thread_keeps_evaluation_on_one_thread(hidden, monkeypatch):
    """`charlm eval --threads 1` (BLAS limited to one thread) runs neither the
    pipeline's helper nor the team, and gives the same figures."""
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    model = Model(Config(vocab_size=13, cell="lstm", hidden=hidden, layers=2), seed=2)
    ids = np.random.default_rng(7).integers(0, 13, 700).astype(np.int32)
    on_two = evaluate.log_probs(model, ids, chunk=300)
    runs, threads_before = K.team_runs(), threading.active_count()
    started = []
    monkeypatch.setattr(evaluate.threading, "Thread",
                        lambda *a, **k: started.append(1) or threading.Thread(*a, **k))
    with blas_threads(1):
        on_one = evaluate.log_probs(model, ids, chunk=300)
    assert K.team_runs() == runs and not started
    assert threading.active_count() == threads_before
    np.testing.assert_array_equal(on_one, on_two)


# ---------------------------------------------------------------------------
# Sampling one stream on a team (sample_steps_team)
# ---------------------------------------------------------------------------

def _sampling_model(cell, H, dtype, seed=0):
    """A model with non-zero biases and peepholes, so every term is exercised."""
    model = Model(Config(vocab_size=23, cell=cell, hidden=H, layers=2, dtype=dtype), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.params.items():
        if "bias" in name or "peep" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    return model


def _sample_in_calls(sampler, calls, decoding, seed=0):
    """ids and probs over several calls (odd lengths: the team's double-buffered
    state must come back to the caller right after each)."""
    rng = np.random.default_rng(seed)
    prev, ids, probs = np.array([3], np.int32), [], []
    for steps in calls:
        p = np.zeros((steps, 1, 23))
        ids.append(sampler.run(prev, rng.random((steps, 1)), probs=p, **decoding))
        probs.append(p)
        prev = ids[-1][-1]
    return np.concatenate(ids), np.concatenate(probs)


SAMPLING_DECODINGS = [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8),
                      dict(argmax=True)]


@pytest.mark.parametrize("cell", ["lstm", "lstm-peephole", "gru", "rnn", "rnn-relu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_team_sampler_draws_what_one_thread_draws(cell, dtype, threads):
    """Same ids, distributions and final state to the last bit (the matrices
    are small enough for sample_steps's own GEMV: the same sums)."""
    model = _sampling_model(cell, 64, dtype)
    for decoding in SAMPLING_DECODINGS:
        state = model.zero_state(1)
        state.h[...] = np.random.default_rng(1).normal(0, 0.5, state.h.shape)
        alone = FusedSampler(model, state)
        team = FusedSampler(model, state)
        alone._shares = None
        team._shares = sampling._team_shares(model, threads)
        assert len(team._shares) == threads
        expected = _sample_in_calls(alone, [1, 6, 9], decoding)
        got = _sample_in_calls(team, [1, 6, 9], decoding)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=str(decoding))
        np.testing.assert_array_equal(got[1], expected[1], err_msg=str(decoding))
        np.testing.assert_array_equal(team.h, alone.h)
        np.testing.assert_array_equal(team.c, alone.c)


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gru_team_draws_what_one_thread_draws(layers, threads, dtype):
    """The GRU team's W_hh products done early, in one order: the same sums,
    so the same ids and state as one thread, over calls of odd and even
    lengths."""
    model = Model(Config(vocab_size=23, cell="gru", hidden=64, layers=layers, dtype=dtype),
                  seed=layers)
    rng = np.random.default_rng(7)
    for name, p in model.params.items():
        if "bias" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    state = model.zero_state(1)
    state.h[...] = rng.normal(0, 0.5, state.h.shape)
    alone, team = FusedSampler(model, state), FusedSampler(model, state)
    alone._shares = None
    team._shares = sampling._team_shares(model, threads)
    team._mirrored, team._split_output = False, False
    expected = _sample_in_calls(alone, [1, 2, 7, 10], dict(temperature=1.3))
    got = _sample_in_calls(team, [1, 2, 7, 10], dict(temperature=1.3))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(team.h, alone.h)


@pytest.mark.parametrize("cell", ["lstm", "lstm-peephole", "gru", "rnn", "rnn-relu"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_mirrored_teams_draw_what_one_thread_draws(cell, layers):
    """In mirrored orders, every other character's matrices read in reverse
    (each sum from its last term to its first) and an LSTM's or RNN's W_hh h
    done ahead as a sum of its own, a team differs from one thread by
    round-off only (the same ids), and not at all from another team, whatever
    its threads or the lengths of its calls (calls that start on odd
    characters among them)."""
    model = Model(Config(vocab_size=23, cell=cell, hidden=64, layers=layers,
                         dtype="float64"), seed=layers)
    rng = np.random.default_rng(5)
    for name, p in model.params.items():
        if "bias" in name or "peep" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    state = model.zero_state(1)
    state.h[...] = rng.normal(0, 0.5, state.h.shape)
    alone = FusedSampler(model, state)
    alone._shares = None
    expected = _sample_in_calls(alone, [1, 2, 7, 10], dict(temperature=1.3))
    teams = []
    for threads, calls in [(2, [1, 2, 7, 10]), (3, [20]), (2, [5, 15])]:
        team = FusedSampler(model, state)
        team._shares = sampling._team_shares(model, threads)
        team._mirrored = True
        teams.append((team, _sample_in_calls(team, calls, dict(temperature=1.3))))
    for team, got in teams:
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(team.h, alone.h, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got[1], teams[0][1][1])
        np.testing.assert_array_equal(team.h, teams[0][0].h)
        np.testing.assert_array_equal(team.c, teams[0][0].c)
    assert not np.array_equal(teams[0][1][1], expected[1])   # the other sums did run


@pytest.mark.parametrize("cell", ["lstm", "lstm-peephole", "gru", "rnn", "rnn-relu"])
@pytest.mark.parametrize("threads", [2, 3])
def test_team_with_a_split_output_layer_draws_what_one_thread_draws(cell, threads):
    """The logits summed from the shares' parts: equal to one thread's to
    round-off (the same ids, so the same state)."""
    model = _sampling_model(cell, 64, "float64", seed=threads)
    state = model.zero_state(1)
    state.h[...] = np.random.default_rng(2).normal(0, 0.5, state.h.shape)
    alone, team = FusedSampler(model, state), FusedSampler(model, state)
    alone._shares = None
    team._shares = sampling._team_shares(model, threads)
    team._split_output = True
    for decoding in SAMPLING_DECODINGS:
        expected = _sample_in_calls(alone, [1, 8, 11], decoding)
        got = _sample_in_calls(team, [1, 8, 11], decoding)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=str(decoding))
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-15)
        assert not np.array_equal(got[1], expected[1]) or decoding.get("argmax")
    np.testing.assert_array_equal(team.h, alone.h)


def test_which_teams_stream_their_weights():
    """Shares of more than 1 MB of weight matrices: they take the mirrored
    orders and the split output layer; so do output layers over 128 KB."""
    assert not K.team_streams(128, 2, 3, 64, 4)       # GRU 2x128: 3 x 128x192 floats, 288 KB
    assert K.team_streams(256, 2, 3, 128, 4)          # GRU 2x256: 1.2 MB
    assert K.team_streams(512, 1, 3, 256, 4)          # GRU 1x512: 1.5 MB
    assert not K.team_streams(256, 1, 3, 128, 4)      # 393 KB
    assert not K.team_streams(128, 2, 4, 64, 4)       # LSTM 2x128: 384 KB
    assert K.team_streams(512, 2, 1, 256, 4)          # RNN 2x512: 1.5 MB
    # ... and a large output layer is split even when the rest fits
    assert not K.team_splits_output(65, 128, False, 4)      # 33 KB
    assert not K.team_splits_output(200, 128, False, 4)     # 100 KB
    assert K.team_splits_output(500, 128, False, 4)         # 250 KB
    assert K.team_splits_output(65, 128, True, 4)


def test_team_sampler_follows_the_model_past_the_size_limit():
    """A GRU whose W_hh sample_steps sends to BLAS: the team's own GEMV sums
    in another order, so the distributions agree to round-off."""
    model = _sampling_model("gru", 420, "float64")
    assert model.params["weight_hh_l0"].nbytes > 512 * 1024
    alone, team = FusedSampler(model, model.zero_state(1)), FusedSampler(model, model.zero_state(1))
    alone._shares, team._shares = None, sampling._team_shares(model, 2)
    expected = _sample_in_calls(alone, [5], dict(argmax=True))
    got = _sample_in_calls(team, [5], dict(argmax=True))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(team.h, alone.h, rtol=0, atol=1e-12)


def test_which_models_are_sampled_by_a_team(monkeypatch):
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    threads = sampling._team_threads
    assert threads(Config(vocab_size=65, cell="lstm", hidden=128, layers=3)) == 2  # 1.25 MB
    assert threads(Config(vocab_size=65, cell="gru", hidden=256, layers=2)) == 2
    assert threads(Config(vocab_size=65, cell="lstm", hidden=128, layers=2)) == 2  # 768 KB
    assert threads(Config(vocab_size=65, cell="lstm", hidden=128, layers=1)) == 1  # 256 KB
    assert threads(Config(vocab_size=65, cell="rnn", hidden=512, layers=2)) == 2   # 3 MB
    assert threads(Config(vocab_size=65, cell="rnn-relu", hidden=384, layers=2)) == 2
    assert threads(Config(vocab_size=65, cell="rnn", hidden=256, layers=2)) == 1   # 768 KB
    with blas_threads(1):                                  # the user asked for one thread
        assert threads(Config(vocab_size=65, cell="gru", hidden=256, layers=2)) == 1
    monkeypatch.setattr(parallel, "usable_cores", lambda: 1)
    assert threads(Config(vocab_size=65, cell="gru", hidden=256, layers=2)) == 1


def test_team_sampler_checks_its_shares():
    model = _sampling_model("lstm", 64, "float32")
    sampler = FusedSampler(model, model.zero_state(1))
    shares = sampling._team_shares(model, 2)
    args = (sampler._weights[-2], sampler._weights[-1], sampler.h, sampler.c,
            np.array([0], np.int32), np.zeros((2, 1)), np.zeros((2, 1), np.int32))
    swapped = [shares[1], shares[0]]
    with pytest.raises(ValueError, match="cover the units"):
        K.sample_steps_team("lstm", swapped, *args)
    with pytest.raises(ValueError, match="cover the units"):
        K.sample_steps_team("lstm", shares[:1], *args)
    narrow = [shares[0][:2] + (shares[0][2][:, :-1].copy(),) + shares[0][3:], shares[1]]
    with pytest.raises(ValueError, match="W_ihT must be"):
        K.sample_steps_team("lstm", narrow, *args)
    with pytest.raises(ValueError, match="1 to 4 shares"):
        K.sample_steps_team("lstm", shares * 3, *args)
    with pytest.raises(ValueError, match="prev_ids"):
        K.sample_steps_team("lstm", shares, *args[:4], np.array([99], np.int32), *args[5:])


def test_a_long_prime_for_one_stream_of_a_large_model_runs_on_the_team(monkeypatch):
    """As evaluation scores one stream (BLAS on one thread, the recurrence on
    the team, the settings restored after), and draws what the reference
    sampler draws from the same seed."""
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    model = Model(Config(vocab_size=23, cell="gru", hidden=420, layers=1, dtype="float64"))
    assert model.params["weight_hh_l0"].nbytes > 512 * 1024
    prime = np.arange(300) % 23      # past OWN_GEMV_MIN_STEPS, where the team takes it
    blas_before, runs_before = K.blas_runs_on_one_thread(), K.team_runs()
    fused = np.array(list(sampling.generate_ids(model, prime, 6, np.random.default_rng(3))))
    assert K.team_runs() > runs_before
    assert K.blas_runs_on_one_thread() == blas_before
    reference = list(sampling.generate_ids_reference(model, prime, 6, np.random.default_rng(3)))
    np.testing.assert_array_equal(fused, np.array(reference))
