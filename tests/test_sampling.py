"""The fused sampling kernel: its maths, its randomness, its filters.

The kernel's per-step distribution must equal softmax(Model.next_logits) of
the training forward (and PyTorch's) for the same prefix; the draws must be
reproducible from a seed and agree with the plain-numpy reference; and
temperature, top-k, top-p and argmax must mean what sampling.probabilities
says, both exactly (the distribution the kernel reports) and empirically
(the ids it draws).
"""

import itertools

import numpy as np
import pytest

from charlm import _kernels as K
from charlm.errors import UsageError
from charlm.model import CELLS, TORCH_CELLS, Config, Model
from charlm.sampling import (MAX_BLOCK, FusedSampler, generate_id_blocks, generate_ids,
                             generate_ids_reference, probabilities)


def _model(cell, layers=2, V=13, H=8, dtype="float64", seed=0):
    """A model with non-zero biases, so that every bias term is exercised."""
    model = Model(Config(vocab_size=V, cell=cell, hidden=H, layers=layers, dtype=dtype),
                  seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.params.items():
        if "bias" in name or "peep" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    return model


def _random_state(model, batch, seed=1):
    rng = np.random.default_rng(seed)
    state = model.zero_state(batch)
    state.h[...] = rng.normal(0, 0.5, state.h.shape)
    if state.c is not None:
        state.c[...] = rng.normal(0, 0.5, state.c.shape)
    return state


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _fixed_logits_model(logits, batch):
    """A 1-layer model whose output ignores the state: logits = out.bias."""
    logits = np.asarray(logits, np.float64)
    model = Model(Config(vocab_size=logits.size, cell="rnn", hidden=2, layers=1,
                         dtype="float64"))
    model.params["out.weight"][...] = 0
    model.params["out.bias"][...] = logits
    return FusedSampler(model, model.zero_state(batch))


def _draw_many(logits, n, seed=0, **decoding):
    """n independent draws (one step at batch n), and the kernel's distribution."""
    sampler = _fixed_logits_model(logits, n)
    probs = np.empty((1, n, len(logits)))
    ids = sampler.run(np.zeros(n, np.int32), np.random.default_rng(seed).random((1, n)),
                      probs=probs, **decoding)
    return ids[0], probs[0, 0]


# --- the maths: the same distribution as the training forward ----------------------

@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_step_probabilities_equal_training_forward(cell, layers):
    model = _model(cell, layers)
    B, steps = 3, 6
    state = _random_state(model, B)
    prev = np.array([0, 5, 12], np.int32)
    sampler = FusedSampler(model, state)
    probs = np.empty((steps, B, model.config.vocab_size))
    ids = sampler.run(prev, np.random.default_rng(2).random((steps, B)), probs=probs)

    fed = np.vstack([prev, ids])          # fed[t] is the input of step t
    for t in range(steps):
        logits, final = model.next_logits(fed[:t + 1], state)
        np.testing.assert_allclose(probs[t], _softmax(logits), rtol=0, atol=1e-12)
    # the state left behind is the forward's after feeding prev and ids[:-1]
    np.testing.assert_allclose(sampler.state.h, final.h, rtol=0, atol=1e-12)
    if model.config.has_cell_state:
        np.testing.assert_allclose(sampler.state.c, final.c, rtol=0, atol=1e-12)
    assert not np.array_equal(probs[0], probs[-1])   # the state did move


@pytest.mark.parametrize("cell, hidden", [("lstm", 37), ("gru", 50), ("rnn", 150),
                                          ("lstm", 190)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_one_steps_equal_training_forward(cell, hidden, dtype):
    """At batch 1 the small matrices go through the own GEMV (_gemv.h), laid
    out in strips: widths here give whole strips, a narrower last strip of a
    few vectors and single columns (G = 148, 150), and a narrower strip alone
    (V = 13). The 190-unit LSTM's W_hh and
    W_ih are over the size limit and keep BLAS, while its W_out does not."""
    model = _model(cell, 2, H=hidden, dtype=dtype)
    c, itemsize = model.config, np.dtype(dtype).itemsize
    if hidden == 190:
        assert not K.sampler_stores_transposed(c.gates, hidden, itemsize)
    else:
        assert K.sampler_stores_transposed(c.gates, hidden, itemsize)
    assert K.sampler_stores_transposed(c.vocab_size, hidden, itemsize)
    state, prev, steps = _random_state(model, 1), np.array([5], np.int32), 6
    sampler = FusedSampler(model, state)
    probs = np.empty((steps, 1, c.vocab_size))
    ids = sampler.run(prev, np.random.default_rng(2).random((steps, 1)), probs=probs)

    tolerance = 1e-12 if dtype == "float64" else 2e-5
    fed = np.vstack([prev, ids])
    for t in range(steps):
        logits, final = model.next_logits(fed[:t + 1], state)
        np.testing.assert_allclose(probs[t], _softmax(logits.astype(np.float64)),
                                   rtol=0, atol=tolerance)
    np.testing.assert_allclose(sampler.state.h, final.h, rtol=0, atol=tolerance)


def _strip_and_lanes(itemsize):
    strip = K.gemv_strip_widths(10**6, itemsize)[0]     # a whole strip: 8 vectors
    return strip, strip // 8


@pytest.mark.parametrize("itemsize", [4, 8])
def test_gemv_strips_widen_the_last(itemsize):
    """Whole strips, the last one widened by the columns left over while it
    fits the registers (16 vectors with AVX-512, 14 otherwise), so that no
    strip of a few vectors runs on its own."""
    strip, lanes = _strip_and_lanes(itemsize)
    max_vecs = 16 if lanes * itemsize == 64 else 14
    for N in range(1, 5 * strip):
        widths = K.gemv_strip_widths(N, itemsize)
        assert sum(widths) == N and all(w == strip for w in widths[:-1]), (N, widths)
        last = widths[-1]
        fits = strip + N % strip       # the last whole strip and what is left
        if N < strip or N % strip == 0:
            assert last == min(N, strip)
        elif -(-fits // lanes) <= max_vecs:
            assert last == fits > strip, (N, widths)
        else:
            assert last == N % strip, (N, widths)


def _gemv_widths(itemsize):
    strip, lanes = _strip_and_lanes(itemsize)
    return sorted({1, lanes - 1, lanes, lanes + 1, 65, strip - 1, strip, strip + 1,
                   strip + 4 * lanes, strip + 7 * lanes + lanes - 1, 2 * strip - 1,
                   2 * strip, 2 * strip + 5, 3 * strip + 4 * lanes + 3})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("K_in", [1, 2, 37])
def test_gemv_matches_numpy_and_each_column_alone(dtype, K_in):
    """y += x @ W.T through the strip layout, for widths with and without
    whole vectors, leftover vectors and single columns: as numpy computes
    it, and every column bit for bit as the same column laid out alone (a
    team member's share must not change a sum), in either strip order; read
    in reverse, each column summed from the last input to the first: bit for
    bit the forward sum of the inputs taken in reverse."""
    rng = np.random.default_rng(K_in)
    for N in _gemv_widths(np.dtype(dtype).itemsize):
        W = rng.standard_normal((N, K_in)).astype(dtype)
        x = rng.standard_normal(K_in).astype(dtype)
        y0 = rng.standard_normal(N).astype(dtype)
        laid_out = K.gemv_layout_of(W)
        results = {}
        for order in K.GEMV_ORDERS:
            y = y0.copy()
            K.gemv_laid_out(x, laid_out, y, order)
            results[order] = y
        np.testing.assert_array_equal(results["forwards"], results["strips backwards"])
        expected = y0.astype(np.float64) + W.astype(np.float64) @ x.astype(np.float64)
        tolerance = 1e-12 if dtype == "float64" else 1e-5
        for y in results.values():
            np.testing.assert_allclose(y, expected, rtol=tolerance, atol=tolerance)
        inputs_reversed = y0.copy()
        K.gemv_laid_out(x[::-1].copy(), K.gemv_layout_of(W[:, ::-1].copy()), inputs_reversed)
        np.testing.assert_array_equal(results["reversed"], inputs_reversed)
        for n in {0, N // 2, N - 1}:
            alone = y0[n:n + 1].copy()
            K.gemv_laid_out(x, K.gemv_layout_of(W[n:n + 1]), alone)
            assert alone[0] == results["forwards"][n], (N, n)


def test_sampler_layout_depends_on_the_batch():
    """Small matrices: laid out in strips for one stream (the same values,
    reordered), transposed for several; large ones as they are."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((300, 37)).astype(np.float32)
    np.testing.assert_array_equal(K.sampler_layout(W, 3), W.T)
    laid_out = K.sampler_layout(W, 1)
    assert laid_out.shape == (37, 300) and not np.array_equal(laid_out, W.T)
    np.testing.assert_array_equal(np.sort(laid_out, axis=None), np.sort(W, axis=None))
    large = rng.standard_normal((600, 300)).astype(np.float32)      # 720 KB
    np.testing.assert_array_equal(K.sampler_layout(large, 1), large)


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_step_probabilities_equal_pytorch(cell):
    torch = pytest.importorskip("torch")
    model = _model(cell, layers=2)
    c = model.config
    modules = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU,
               "rnn": lambda V, H, L: torch.nn.RNN(V, H, L, nonlinearity="tanh"),
               "rnn-relu": lambda V, H, L: torch.nn.RNN(V, H, L, nonlinearity="relu")}
    rnn = modules[cell](c.vocab_size, c.hidden, c.layers).double()
    decoder = torch.nn.Linear(c.hidden, c.vocab_size).double()
    weights = model.torch_state_dict()
    rnn.load_state_dict({k[len("rnn."):]: torch.from_numpy(v) for k, v in weights.items()
                         if k.startswith("rnn.")})
    decoder.load_state_dict({k[len("decoder."):]: torch.from_numpy(v)
                             for k, v in weights.items() if k.startswith("decoder.")})

    steps, prev = 5, np.array([3, 7], np.int32)
    sampler = FusedSampler(model, model.zero_state(2))
    probs = np.empty((steps, 2, c.vocab_size))
    ids = sampler.run(prev, np.random.default_rng(0).random((steps, 2)), probs=probs)

    fed = torch.from_numpy(np.vstack([prev, ids[:-1]]).astype(np.int64))
    with torch.no_grad():
        hidden, _ = rnn(torch.nn.functional.one_hot(fed, c.vocab_size).double())
        expected = torch.softmax(decoder(hidden), dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-12)


def test_float32_probabilities_match_training_forward():
    model = _model("lstm", 2, dtype="float32")
    prev = np.array([4], np.int32)
    probs = np.empty((4, 1, model.config.vocab_size))
    ids = FusedSampler(model, model.zero_state(1)).run(
        prev, np.random.default_rng(0).random((4, 1)), probs=probs)
    logits, _ = model.next_logits(np.vstack([prev, ids[:-1]]), model.zero_state(1))
    np.testing.assert_allclose(probs[-1], _softmax(logits.astype(np.float64)),
                               rtol=1e-5, atol=1e-7)


# --- randomness: seeds, the reference, batches --------------------------------------

DECODINGS = [dict(), dict(temperature=0.6), dict(top_k=4), dict(top_p=0.7),
             dict(temperature=1.4, top_k=6, top_p=0.8), dict(argmax=True)]


@pytest.mark.parametrize("decoding", DECODINGS, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_fused_draws_equal_reference_draws(cell, decoding):
    model = _model(cell, layers=2)
    fused = list(generate_ids(model, [1, 2, 3], 150, np.random.default_rng(7), batch=2,
                              **decoding))
    reference = list(generate_ids_reference(model, [1, 2, 3], 150,
                                            np.random.default_rng(7), batch=2, **decoding))
    assert len(fused) == 150 and all(ids.shape == (2,) for ids in fused)
    np.testing.assert_array_equal(np.array(fused), np.array(reference))


def test_same_seed_same_ids_other_seed_other_ids():
    model = _model("gru", layers=2)

    def run(seed):
        return np.array(list(generate_ids(model, [0], 300, np.random.default_rng(seed))))

    np.testing.assert_array_equal(run(1), run(1))
    assert (run(1) != run(2)).mean() > 0.5


def test_uniform_draws_are_used_in_order_and_first_id_comes_alone():
    """Streaming: the first id needs one step of uniforms; in total the fused
    path consumes exactly what the reference does (length * batch doubles)."""
    model = _model("lstm")
    rng = np.random.default_rng(3)
    stream = generate_ids(model, [1], 100, rng, batch=2)
    next(stream)
    expected = np.random.default_rng(3)
    expected.random((1, 2))
    assert rng.bit_generator.state == expected.bit_generator.state
    list(stream)
    expected.random((99, 2))
    assert rng.bit_generator.state == expected.bit_generator.state


def test_batch_streams_differ_and_each_matches_a_batch_of_one():
    model = _model("lstm", layers=2)
    N, steps = 4, 40
    uniforms = np.random.default_rng(5).random((steps, N))
    prev = np.full(N, 2, np.int32)
    together = FusedSampler(model, model.zero_state(N)).run(prev, uniforms)
    assert len({tuple(together[:, b]) for b in range(N)}) == N
    for b in range(N):
        alone = FusedSampler(model, model.zero_state(1)).run(prev[:1], uniforms[:, b:b + 1])
        np.testing.assert_array_equal(alone[:, 0], together[:, b])


def test_blocks_do_not_change_the_text():
    """Splitting the steps into calls (as generate_ids does) changes nothing."""
    model = _model("rnn", layers=2)
    uniforms = np.random.default_rng(0).random((50, 1))
    whole = FusedSampler(model, model.zero_state(1)).run(np.array([1], np.int32), uniforms)
    sampler, prev, parts = FusedSampler(model, model.zero_state(1)), np.array([1], np.int32), []
    for a, b in [(0, 1), (1, 3), (3, 7), (7, 50)]:
        parts.append(sampler.run(prev, uniforms[a:b]))
        prev = parts[-1][-1]
    np.testing.assert_array_equal(np.vstack(parts), whole)


@pytest.mark.parametrize("batch", [1, 3])
def test_id_blocks_double_up_to_the_largest_and_hold_the_steps(batch):
    """generate_id_blocks: blocks of 1, 2, 4, ... MAX_BLOCK steps, the last cut
    to the length; together, the steps generate_ids yields from the same seed."""
    model = _model("gru", V=11, H=6, dtype="float32")
    length = 2 * MAX_BLOCK + 5
    blocks = list(generate_id_blocks(model, [1, 2], length, np.random.default_rng(4),
                                     temperature=0.9, batch=batch))
    sizes, expected, produced, size = [len(b) for b in blocks], [], 0, 1
    while produced < length:
        expected.append(min(size, length - produced))
        produced += expected[-1]
        size = min(2 * size, MAX_BLOCK)
    assert sizes == expected and expected[-1] < MAX_BLOCK
    assert all(b.shape == (len(b), batch) and b.dtype == np.int32 for b in blocks)
    steps = list(generate_ids(model, [1, 2], length, np.random.default_rng(4),
                              temperature=0.9, batch=batch))
    np.testing.assert_array_equal(np.concatenate(blocks), np.stack(steps))
    with pytest.raises(ValueError, match="prime"):      # checked at the call, not later
        generate_id_blocks(model, [11], 5, np.random.default_rng(0))


def test_unbounded_length_and_given_state_left_untouched():
    model = _model("lstm")
    state = _random_state(model, 1)
    before = state.copy()
    ids = list(itertools.islice(generate_ids(model, [1, 2], 0, np.random.default_rng(0),
                                             state=state), 200))
    assert len(ids) == 200
    np.testing.assert_array_equal(state.h, before.h)
    np.testing.assert_array_equal(state.c, before.c)
    reference = list(itertools.islice(generate_ids_reference(
        model, [1, 2], 0, np.random.default_rng(0), state=state), 200))
    np.testing.assert_array_equal(np.array(ids), np.array(reference))


# --- the filters: exact distributions ----------------------------------------------

LOGITS = np.array([0.3, -1.0, 2.0, 0.9, 1.7, -0.4, 0.0, 1.1])


@pytest.mark.parametrize("decoding", [
    dict(), dict(temperature=0.5), dict(temperature=2.5, top_k=3), dict(top_p=0.8),
    dict(temperature=0.7, top_k=5, top_p=0.9), dict(top_k=1)], ids=str)
def test_draws_follow_the_filtered_softmax(decoding):
    n = 200_000
    ids, kernel_p = _draw_many(LOGITS, n, **decoding)
    expected = probabilities(LOGITS[None], **decoding)[0]
    np.testing.assert_allclose(kernel_p, expected, rtol=0, atol=1e-15)
    freq = np.bincount(ids, minlength=len(LOGITS)) / n
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-12), (freq, expected)


def test_top_k_never_emits_an_id_outside_the_top_k():
    logits = np.random.default_rng(0).normal(0, 1, 50)
    ids, p = _draw_many(logits, 50_000, top_k=5)
    top5 = set(np.argsort(-logits)[:5])
    assert set(ids) == top5
    assert set(np.flatnonzero(p)) == top5


@pytest.mark.parametrize("top_p,kept", [(0.45, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}),
                                        (0.97, {1, 3, 2, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    p = np.array([0.02, 0.5, 0.15, 0.3, 0.03])
    ids, kernel_p = _draw_many(np.log(p), 20_000, top_p=top_p)
    assert set(np.flatnonzero(kernel_p)) == kept
    assert set(ids) == kept
    np.testing.assert_allclose(kernel_p[sorted(kept)], p[sorted(kept)] / p[sorted(kept)].sum(),
                               rtol=1e-12)


def test_ties_keep_every_tied_id_for_top_k_and_lower_ids_first_for_top_p():
    _, p = _draw_many([1.0, 0.0, 1.0, 1.0], 1, top_k=2)
    np.testing.assert_allclose(p, [1 / 3, 0, 1 / 3, 1 / 3])
    _, p = _draw_many([0.0, 0.0, 0.0, 0.0], 1, top_p=0.5)
    np.testing.assert_allclose(p, [0.5, 0.5, 0, 0])
    for logits, decoding in [([1.0, 0.0, 1.0, 1.0], dict(top_k=2)),
                             ([0.0, 0.0, 0.0, 0.0], dict(top_p=0.5))]:
        np.testing.assert_allclose(_draw_many(logits, 1, **decoding)[1],
                                   probabilities(np.array([logits]), **decoding)[0])


@pytest.mark.parametrize("decoding", [dict(top_p=0.9), dict(top_k=2000),
                                      dict(top_k=2500, top_p=0.95, temperature=0.8)], ids=str)
def test_large_vocabulary_filters_match_numpy(decoding):
    """V = 3000 with flat logits: the nucleus holds thousands of ids, so the
    kernel's select-then-sort has to widen its guess several times."""
    logits = np.random.default_rng(1).normal(0, 0.3, 3000)
    ids, p = _draw_many(logits, 2000, **decoding)
    expected = probabilities(logits[None], **decoding)[0]
    assert 64 * 4 < np.count_nonzero(expected) < 3000
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-15)
    assert np.all(expected[ids] > 0)


def test_argmax_is_deterministic_and_reads_no_randomness():
    model = _model("gru")
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    a = np.array(list(generate_ids(model, [3], 60, rng, argmax=True)))
    assert rng.bit_generator.state == state
    b = np.array(list(generate_ids(model, [3], 60, np.random.default_rng(9), argmax=True)))
    np.testing.assert_array_equal(a, b)
    ids, p = _draw_many(LOGITS, 100, argmax=True)
    assert np.all(ids == LOGITS.argmax()) and p[LOGITS.argmax()] == 1


@pytest.mark.parametrize("temperature", [1e-3, 1e-300])
def test_small_temperature_approaches_argmax(temperature):
    ids, p = _draw_many(LOGITS, 10_000, temperature=temperature)
    assert np.all(ids == LOGITS.argmax())
    assert p[LOGITS.argmax()] == 1
    warm, _ = _draw_many(LOGITS, 10_000, temperature=0.1)
    assert 0.9 < np.mean(warm == LOGITS.argmax()) < 1


# --- validation ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [[1, 13], [-1], [0, 2, 99]])
def test_out_of_range_prime_ids_raise_value_error_at_the_call(bad):
    model = _model("lstm")
    with pytest.raises(ValueError, match="out of range"):
        generate_ids(model, bad, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="out of range"):
        generate_ids_reference(model, bad, 10, np.random.default_rng(0))


def test_the_kernel_checks_ids_shapes_and_options_itself():
    model = _model("lstm")
    sampler = FusedSampler(model, model.zero_state(2))
    u = np.zeros((3, 2))
    with pytest.raises(ValueError, match="prev id out of range"):
        sampler.run(np.array([0, 13], np.int32), u)
    with pytest.raises(ValueError, match="uniforms and ids"):
        sampler.run(np.array([0, 1], np.int32), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="probs"):
        sampler.run(np.array([0, 1], np.int32), u, probs=np.zeros((3, 2, 5)))
    with pytest.raises(ValueError, match="temperature"):
        sampler.run(np.array([0, 1], np.int32), u, temperature=0.0)
    with pytest.raises(ValueError, match="W_hh"):
        weights = list(sampler._weights)
        weights[2] = weights[2][:1]
        K.sample_steps("lstm", *weights, sampler.h, sampler.c, np.zeros(2, np.int32), u,
                       np.empty((3, 2), np.int32))
    with pytest.raises(ValueError):     # a float32 state for a float64 model
        K.sample_steps("lstm", *sampler._weights, sampler.h.astype(np.float32),
                       sampler.c.astype(np.float32), np.zeros(2, np.int32), u,
                       np.empty((3, 2), np.int32))


def test_bad_options_and_states_are_refused():
    model = _model("lstm")
    rng = np.random.default_rng(0)
    for options in [dict(temperature=0), dict(top_k=0), dict(top_p=1.5), dict(batch=0)]:
        with pytest.raises(UsageError):
            generate_ids(model, [1], 5, rng, **options)
    with pytest.raises(UsageError, match="prime"):
        generate_ids(model, [], 5, rng)
    with pytest.raises(ValueError, match="streams"):
        generate_ids(model, [1], 5, rng, batch=2, state=model.zero_state(3))
