"""Single-stream evaluation in two threads (charlm.evaluate._pipelined).

The pipeline must give the very figures of the plain sequential loop, carry
each stage's state across chunks and pieces, pass an error from the helper
thread to the caller, and never leave its helper thread running.
"""

import threading
from unittest import mock

import numpy as np
import pytest

from charlm import evaluate, parallel
from charlm.model import Config, Model


def _sequential(model, ids, chunk):
    with mock.patch.object(parallel, "usable_cores", lambda: 1):
        return evaluate.log_probs(model, ids, chunk)


def _pipelined(model, ids, chunk):
    with mock.patch.object(parallel, "usable_cores", lambda: 2):
        assert evaluate._pipeline_pays(model, parallel.one_stream_thread_count())
        return evaluate.log_probs(model, ids, chunk)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_same_figures_as_the_sequential_loop(cell, layers):
    """Bit for bit, over chunks with a ragged last one, as one array and as pieces."""
    model = Model(Config(vocab_size=11, cell=cell, hidden=24, layers=layers), seed=layers)
    ids = np.random.default_rng(layers).integers(0, 11, 1000).astype(np.int32)
    expected = _sequential(model, ids, chunk=96)
    assert expected.shape == (999,)
    np.testing.assert_array_equal(_pipelined(model, ids, chunk=96), expected)
    def pieces():       # chunked piece by piece: other chunk boundaries
        return iter([ids[:1], ids[1:200], ids[200:201], ids[201:]])
    np.testing.assert_array_equal(_pipelined(model, pieces(), chunk=96),
                                  _sequential(model, pieces(), chunk=96))


def test_an_error_in_the_helper_thread_reaches_the_caller():
    """A bad id is found by the lower stage, in the helper thread."""
    model = Model(Config(vocab_size=5, cell="lstm", hidden=8, layers=2))
    ids = np.zeros(500, np.int32)
    ids[300] = 7                                    # outside [0, 5)
    before = threading.active_count()
    with pytest.raises(ValueError, match="id out of range"):
        _pipelined(model, ids, chunk=64)
    assert threading.active_count() == before


def test_abandoning_the_generator_stops_the_helper():
    model = Model(Config(vocab_size=5, cell="gru", hidden=8, layers=2))
    ids = np.zeros(5000, np.int32)
    before = threading.active_count()
    with mock.patch.object(parallel, "usable_cores", lambda: 2):
        chunks = evaluate.chunked_log_probs(model, ids, chunk=32)
        first = next(chunks)
        assert threading.active_count() == before + 1
        chunks.close()
    assert first.shape == (32,)
    assert threading.active_count() == before


def test_large_models_are_not_pipelined():
    """Weights past the limit no longer fit near one core: a team of threads
    shares each step instead (see test_team.py)."""
    assert evaluate._pipeline_pays(Model(Config(vocab_size=5, cell="lstm", hidden=200, layers=1)), 2)
    assert not evaluate._pipeline_pays(Model(Config(vocab_size=5, cell="lstm", hidden=256, layers=1)), 2)
    assert not evaluate._pipeline_pays(Model(Config(vocab_size=5, cell="lstm", hidden=64, layers=2)), 1)
