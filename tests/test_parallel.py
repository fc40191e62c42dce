"""Data parallelism over the batch (charlm.parallel): the sharded step must be
the unsharded step, up to rounding."""

import numpy as np
import pytest

from charlm.model import CELLS, IGNORE, Config, Model, State
from charlm.parallel import DataParallel, usable_cores, worker_count


def _chunk(rng, V, T, B):
    x = rng.integers(0, V, size=(T, B)).astype(np.int32)
    y = rng.integers(0, V, size=(T, B)).astype(np.int32)
    return x, y


def _random_state(model, rng, B):
    s = model.zero_state(B)
    s.h[...] = rng.uniform(-0.5, 0.5, s.h.shape)
    if s.c is not None:
        s.c[...] = rng.uniform(-0.5, 0.5, s.c.shape)
    return s


def _whole_batch(model, x, y, state):
    loss, grads, final = model.loss_and_grads(x, y, state)
    return loss, {k: v.copy() for k, v in grads.items()}, final


def _two_workers(model, x, y, state):
    with DataParallel(model, 2) as parallel:
        return parallel.loss_and_grads(x, y, state)


def _assert_same_step(sharded, whole):
    """Same loss and every gradient, up to float64 rounding."""
    (p_loss, p_grads), (loss, grads) = sharded[:2], whole[:2]
    assert p_loss == pytest.approx(loss, rel=1e-12)
    for name in grads:
        np.testing.assert_allclose(p_grads[name], grads[name], rtol=1e-10, atol=1e-14,
                                   err_msg=name)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("workers,B", [(2, 6), (2, 5), (3, 7), (4, 4)])
def test_sharded_step_equals_the_whole_batch(cell, workers, B):
    rng = np.random.default_rng(0)
    model = Model(Config(vocab_size=11, cell=cell, hidden=9, layers=2, dtype="float64"), seed=3)
    x, y = _chunk(rng, 11, 5, B)
    state = _random_state(model, rng, B)
    loss, grads, final = _whole_batch(model, x, y, state)
    with DataParallel(model, workers) as parallel:
        p_loss, p_grads, p_final = parallel.loss_and_grads(x, y, state)
    _assert_same_step((p_loss, p_grads), (loss, grads))
    np.testing.assert_allclose(p_final.h, final.h, rtol=1e-12, atol=1e-15)
    if final.c is not None:
        np.testing.assert_allclose(p_final.c, final.c, rtol=1e-12, atol=1e-15)


def test_shards_are_weighted_by_the_positions_they_score():
    """With IGNORE targets the shards score different numbers of positions;
    the loss is still the mean over every scored position of the batch."""
    rng = np.random.default_rng(1)
    model = Model(Config(vocab_size=7, cell="lstm", hidden=6, layers=1, dtype="float64"))
    x, y = _chunk(rng, 7, 4, 6)
    y[:, :3] = IGNORE                   # the first shard scores one position,
    y[2, 0] = 3                         # the second all twelve
    state = model.zero_state(6)
    _assert_same_step(_two_workers(model, x, y, state), _whole_batch(model, x, y, state))


def test_a_shard_that_scores_nothing_adds_nothing():
    rng = np.random.default_rng(2)
    model = Model(Config(vocab_size=7, cell="gru", hidden=6, layers=1, dtype="float64"))
    x, y = _chunk(rng, 7, 4, 4)
    y[:, :2] = IGNORE
    state = model.zero_state(4)
    sharded = _two_workers(model, x, y, state)
    assert np.isfinite(sharded[0])
    _assert_same_step(sharded, _whole_batch(model, x, y, state))


def test_replicas_see_parameter_updates():
    """The optimiser updates the model's arrays in place; the workers must use them."""
    rng = np.random.default_rng(3)
    model = Model(Config(vocab_size=5, cell="rnn", hidden=4, layers=1, dtype="float64"))
    x, y = _chunk(rng, 5, 3, 4)
    state = model.zero_state(4)
    with DataParallel(model, 2) as parallel:
        before, _, _ = parallel.loss_and_grads(x, y, state)
        for p in model.params.values():
            p *= 0.5
        after, _, _ = parallel.loss_and_grads(x, y, state)
    assert after != before
    assert after == pytest.approx(model.loss(x, y, state)[0], rel=1e-12)


def test_dropout_is_reproducible_for_a_seed():
    rng = np.random.default_rng(4)
    model = Model(Config(vocab_size=9, cell="lstm", hidden=8, layers=2, dtype="float64"))
    x, y = _chunk(rng, 9, 5, 6)
    state = model.zero_state(6)
    with DataParallel(model, 2) as parallel:
        runs = [parallel.loss_and_grads(x, y, state, dropout=0.3,
                                        rng=np.random.default_rng(seed))[0]
                for seed in (7, 7, 8)]
        plain = parallel.loss_and_grads(x, y, state)[0]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != plain


def test_more_workers_than_streams_and_a_single_stream():
    rng = np.random.default_rng(5)
    model = Model(Config(vocab_size=6, cell="gru", hidden=5, layers=1, dtype="float64"))
    for B in (1, 2):
        x, y = _chunk(rng, 6, 3, B)
        state = model.zero_state(B)
        loss, _, final = _whole_batch(model, x, y, state)
        with DataParallel(model, 8) as parallel:
            p_loss, _, p_final = parallel.loss_and_grads(x, y, state)
        assert p_loss == pytest.approx(loss, rel=1e-12)
        assert p_final.h.shape == final.h.shape


def test_worker_count():
    assert worker_count(3, 64) == 3
    assert worker_count(8, 2) == 2
    assert worker_count(0, 1000) == min(usable_cores(), 1000)
    assert worker_count(0, 1) == 1
