"""Drawing text from a model: temperature, top-k, top-p and argmax decoding.

The decoding distribution for one step is softmax(logits / temperature),
optionally restricted to the k most likely ids (top-k; ids tied with the k-th
are kept too) and then to the smallest most-likely set whose probability
reaches p (top-p, nucleus; ties in order of id), renormalised. argmax takes
the most likely id instead (the first of equals).

`generate_ids` primes the model with all but the last prime id (one batched
forward), then hands over to the fused Cython kernel `sample_steps`: per
character, one pass through every layer, the output layer, the filtering and
the draw, with no Python in between. The kernel runs in blocks of steps
(1, 2, 4, ... up to MAX_BLOCK), so the first character appears at once and
later ones come in small bursts, each yielded as soon as its block is done
(`generate_id_blocks` yields the blocks themselves).

Randomness: each block's uniforms come from the caller's numpy Generator,
`rng.random((steps, batch))`, in step-major order, and the kernel draws by
inverse CDF. The Generator's stream does not depend on how it is split into
calls, so the same seed gives the same text whatever the block sizes, and
the pure-Python `generate_ids_reference` (one Model.next_logits per step,
kept as the readable reference and the benchmark baseline) draws the same
ids from the same seed.
"""

import contextlib
import math

import numpy as np

from . import _kernels as K
from .errors import UsageError
from .model import State
from .parallel import one_stream_on_team, one_stream_thread_count

# Largest number of characters per kernel call: long enough that the Python
# between calls, and a team's start (waking its helper threads, ~60 us),
# cost little, short enough that streaming output flows (1,024 characters
# take a 2x512 LSTM about 0.1 s). With 64, a 2x128 GRU's team sampled at
# 5.9 us per character, against 3.5 with 1,024.
MAX_BLOCK = 1024


def default_prime_ids(vocab):
    """What sampling starts from when no prime is given: a newline when the
    vocabulary has one (text then starts as at the start of a line), else id 0."""
    if "\n" in vocab.chars:
        return vocab.encode("\n")
    return np.zeros(1, np.int32)


def check_decoding(temperature=1.0, top_k=None, top_p=None):
    """UsageError unless the decoding options are in range."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k < 2**31):
        raise UsageError(f"top-k must be a positive integer, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UsageError(f"top-p must be in (0, 1], got {top_p!r}")


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """The decoding distribution for each row of logits (B, V), as float64.

    The numpy statement of what the kernel computes (see the module docstring).
    """
    z = np.asarray(logits, np.float64)
    # subtract the max first, so that a tiny temperature cannot overflow
    p = np.exp((z - z.max(axis=1, keepdims=True)) / temperature)
    p /= p.sum(axis=1, keepdims=True)
    if top_k is not None and top_k < p.shape[1]:
        # keep the k largest: zero everything below the k-th largest value
        kth = -np.partition(-p, top_k - 1, axis=1)[:, top_k - 1:top_k]
        p = np.where(p >= kth, p, 0.0)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=1, kind="stable")   # ties: lower id first
        sorted_p = np.take_along_axis(p, order, axis=1)
        # keep an id if the mass before it (in descending order) is below p
        before = np.cumsum(sorted_p, axis=1) - sorted_p
        keep_sorted = before < top_p * sorted_p.sum(axis=1, keepdims=True)
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
    return p / p.sum(axis=1, keepdims=True)


def draw(p, rng):
    """One id per row of p (B, V), by inverse-CDF sampling: the first id whose
    cumulative probability exceeds u ~ U[0, 1) (the last id with probability,
    should round-off leave u past the end)."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random((p.shape[0], 1)) * cdf[:, -1:]
    last_positive = p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)
    return np.minimum((cdf <= u).sum(axis=1), last_positive)


class FusedSampler:
    """The kernel `sample_steps` bound to one model's weights and a running
    state for B streams.

    >>> s = FusedSampler(model, model.zero_state(1))            # doctest: +SKIP
    >>> ids = s.run(np.array([3], np.int32), rng.random((10, 1)))  # doctest: +SKIP
    """

    def __init__(self, model, state):
        """state: the State to start from (copied; the caller's is untouched)."""
        config, p = model.config, model.params
        L, dtype = config.layers, config.np_dtype
        self.cell = config.cell
        self.vocab_size = config.vocab_size
        self._has_c = config.has_cell_state
        B = state.h.shape[1] if state.h.ndim == 3 else 0
        expected = (L, B, config.hidden)
        if (B < 1 or state.h.shape != expected
                or (self._has_c and state.c.shape != expected)):
            raise ValueError(f"state must be (layers, batch, hidden) = {expected}, "
                             f"got h of shape {state.h.shape}")
        # Laid out for the kernel once, not per call: layer 0's input weights
        # transposed for the row gather, the small matrices as the kernel's
        # own GEMV reads them (the kernel decides), and the biases folded as
        # in training.
        def laid_out(name):
            return K.sampler_layout(p[name], B)
        self._weights = (
            K.aligned_copy(p["weight_ih_l0"].T),
            tuple(laid_out(f"weight_ih_l{k}") for k in range(1, L)),
            tuple(laid_out(f"weight_hh_l{k}") for k in range(L)),
            tuple(K.aligned_copy(model.projection_bias(k)) for k in range(L)),
            tuple(p[f"bias_hh_l{k}"] for k in range(L)),
            laid_out("out.weight"), p["out.bias"])
        self._peep = tuple(p[f"weight_peep_l{k}"] for k in range(L)) \
            if config.cell == "lstm-peephole" else ()
        self._shares = _team_shares(model, _team_threads(config)) if B == 1 else None
        # the team's order of products and its output layer: by size (sample_steps_team)
        self._mirrored = self._split_output = None
        self._characters_fed = 0    # the team's mirrored orders alternate with them
        self.h = np.array(state.h, dtype, order="C")
        self.c = (np.array(state.c, dtype, order="C") if self._has_c
                  else np.empty((0, 0, 0), dtype))

    @property
    def state(self):
        """A copy of the current State."""
        return State(self.h.copy(), self.c.copy() if self._has_c else None)

    def run(self, prev_ids, uniforms, temperature=1.0, top_k=None, top_p=None,
            argmax=False, probs=None):
        """Feed prev_ids (B,), then draw one id per stream for each row of
        uniforms (steps, B), feeding each drawn row to the next step.

        Returns the ids, (steps, B) int32. The last row is drawn but not fed:
        pass it as prev_ids to continue. probs (steps, B, V) float64, if
        given, receives each step's decoding distribution.
        """
        prev_ids = np.ascontiguousarray(prev_ids, np.int32)
        uniforms = np.ascontiguousarray(uniforms, np.float64)
        if uniforms.ndim != 2:
            raise ValueError(f"uniforms must be (steps, batch), got shape {uniforms.shape}")
        ids = np.empty(uniforms.shape, np.int32)
        decoding = (float(temperature), top_k or 0, 1.0 if top_p is None else float(top_p),
                    bool(argmax), probs)
        if self._shares:
            W_out, b_out = self._weights[-2:]
            K.sample_steps_team(self.cell, self._shares, W_out, b_out, self.h, self.c,
                                prev_ids, uniforms, ids, *decoding, mirrored=self._mirrored,
                                split_output=self._split_output,
                                first_odd=self._characters_fed % 2 == 1)
        else:
            K.sample_steps(self.cell, *self._weights, self.h, self.c, prev_ids, uniforms, ids,
                           *decoding, self._peep)
        self._characters_fed += len(ids)
        return ids


# One stream of a model whose weight matrices (W_hh, and W_ih above the first
# layer) hold at least TEAM_MIN_WEIGHT_BYTES (gated cells: LSTM, GRU) or
# TEAM_MIN_RNN_WEIGHT_BYTES (the plain RNN, with a quarter of the LSTM's work
# per unit to share against the same wait per layer) is sampled by a team of
# threads, each owning a share of every layer's units (see sample_steps_team
# in _kernels.pyx). Team against one thread, 2 cores, medians of alternations:
# - Zen 5 (2026-12-02, 1 MB L2 per core): LSTM 1x128 (256 KB) 0.92; LSTM
#   1x192 (576 KB) 1.76; GRU 2x128 (576 KB) 0.95-1.36; LSTM 2x128 (768 KB)
#   1.58; LSTM 3x128 (1.25 MB) 1.98; GRU 2x256 2.12; LSTM 2x256 2.11; GRU
#   2x384 2.03; LSTM 2x384 1.11; GRU 2x512 0.99; LSTM 2x512 1.10; RNN 2x512
#   (3 MB) 1.53, 2x256 (768 KB) 0.74-1.01, 2x128 0.67.
# - Intel Xeon (2026-12-06, 2 MB L2 per core): LSTM 1x128 1.18; LSTM 1x192
#   1.99; LSTM 2x128 1.50; GRU 2x128 1.55; GRU 2x256 3.3; LSTM 2x256 4.1
#   (each half fits L2, the whole does not); LSTM 2x384 0.93; LSTM 2x512
#   0.95; GRU 2x512 0.92 (halves larger than L2: both threads wait on L3);
#   RNN 2x128 (192 KB) 0.72, 2x256 1.01, 2x384 (1.7 MB) 1.78, 2x512 3.5.
# The largest gated models lost 5-8% on the Intel machine and gained up to 10%
# on the Zen 5; they kept the team. Since their shares' products run in
# mirrored orders (see sample_steps_team), on the Intel Xeon (2026-12-06):
# GRU 2x512 1.41 (8,070 against 5,700 chars/s), LSTM 2x512 1.28. (An
# earlier limit of 1 MB for gated cells came from benchmarks/bench_sample.py
# running with no pause after PyTorch's blocks, whose idle threads then took
# the helper's core.)
TEAM_MIN_WEIGHT_BYTES = 512 << 10
TEAM_MIN_RNN_WEIGHT_BYTES = 1536 << 10


def _team_threads(config):
    """Threads to sample one stream of this model with: 1 (no team) for
    small models, or when BLAS has been limited to one thread (`--threads
    1`, or inside a training run's workers)."""
    itemsize = np.dtype(config.np_dtype).itemsize
    weight_bytes = (2 * config.layers - 1) * config.gates * config.hidden * itemsize
    gated = config.cell in ("lstm", "lstm-peephole", "gru")
    limit = TEAM_MIN_WEIGHT_BYTES if gated else TEAM_MIN_RNN_WEIGHT_BYTES
    return 1 if weight_bytes < limit else one_stream_thread_count()


def _team_shares(model, threads):
    """The parts of the model each of `threads` threads samples with
    (K.sample_steps_team), or None for a single thread."""
    config, p = model.config, model.params
    H, L = config.hidden, config.layers
    blocks = config.gates // H
    shares = K.unit_shares(H, threads, np.dtype(config.np_dtype).itemsize)
    if threads < 2 or len(shares) < 2:
        return None
    W_ihT = p["weight_ih_l0"].T                                # (V, G)
    peephole = config.cell == "lstm-peephole"

    def rows_of(name, rows):
        return K.gemv_layout_of(np.ascontiguousarray(p[name][rows]))

    parts = []
    for u0, n in shares:
        # this share's rows of every gate block: [i | f | g | o] of its units
        rows = (np.arange(blocks)[:, None] * H + u0 + np.arange(n)).ravel()
        parts.append((
            u0, n, K.aligned_copy(W_ihT[:, rows]),
            tuple(rows_of(f"weight_ih_l{k}", rows) for k in range(1, L)),
            tuple(rows_of(f"weight_hh_l{k}", rows) for k in range(L)),
            tuple(K.aligned_copy(model.projection_bias(k)[rows]) for k in range(L)),
            tuple(K.aligned_copy(p[f"bias_hh_l{k}"][rows]) for k in range(L)),
            tuple(np.ascontiguousarray(p[f"weight_peep_l{k}"][:, u0:u0 + n])
                  for k in range(L)) if peephole else (),
            K.gemv_layout_of(np.ascontiguousarray(p["out.weight"][:, u0:u0 + n]))))
    return parts


def generate_ids(model, prime_ids, length, rng, temperature=1.0, top_k=None,
                 top_p=None, argmax=False, batch=1, state=None):
    """Yield `length` steps of drawn ids, each an int32 array (batch,).

    prime_ids: a non-empty 1-D sequence of ids fed before drawing (the
    same prime for every stream). length 0 or None means unbounded.
    state: the State to start from (default: zeros); not modified.
    The arguments are checked at the call, the work is done as the ids are
    taken. Runs the fused kernel; see generate_ids_reference for the same
    draws in plain numpy, and generate_id_blocks for the same ids a block of
    steps at a time.
    """
    blocks = generate_id_blocks(model, prime_ids, length, rng, temperature, top_k, top_p,
                                argmax, batch, state)
    return (step for block in blocks for step in block)


def generate_id_blocks(model, prime_ids, length, rng, temperature=1.0, top_k=None,
                       top_p=None, argmax=False, batch=1, state=None):
    """As generate_ids, but yield each block of steps as the fused kernel
    returns it: an int32 array (steps, batch), steps = 1, 2, 4, ... up to
    MAX_BLOCK (the last one cut to `length`), so that whoever turns ids
    into text does it once per block (LanguageModel.generate_pieces)."""
    check_decoding(temperature, top_k, top_p)
    prime = _checked_prime(prime_ids, model.config.vocab_size)
    _check_batch(batch, state)
    return _fused_blocks(model, prime, length, rng, batch, state,
                         dict(temperature=temperature, top_k=top_k, top_p=top_p, argmax=argmax))


def _fused_blocks(model, prime, length, rng, batch, state, decoding):
    sampler = FusedSampler(model, _primed_state(model, prime[:-1], batch, state))
    prev = np.full(batch, prime[-1], np.int32)
    produced, steps = 0, 1
    while not length or produced < length:
        if length:
            steps = min(steps, length - produced)
        if decoding["argmax"]:      # no draws, so the Generator is left untouched
            uniforms = np.zeros((steps, batch))
        else:
            uniforms = rng.random((steps, batch))
        ids = sampler.run(prev, uniforms, **decoding)
        yield ids
        prev = ids[-1]
        produced += steps
        steps = min(2 * steps, MAX_BLOCK)


def _primed_state(model, head, batch, state):
    """The state after feeding `head` (the prime but its last id) to every stream."""
    if state is None:
        if head.size == 0:
            return model.zero_state(batch)
        # Every stream starts alike: prime one and copy its state.
        with _one_stream_priming(model):
            _, primed = model.next_logits(head[:, None], model.zero_state(1))
        return State(np.repeat(primed.h, batch, axis=1),
                     None if primed.c is None else np.repeat(primed.c, batch, axis=1))
    if head.size == 0:
        return state
    with _one_stream_priming(model) if batch == 1 else contextlib.nullcontext():
        _, primed = model.next_logits(np.repeat(head[:, None], batch, axis=1), state)
    return primed


def _one_stream_priming(model):
    """Where a prime fed to one stream runs: for a model whose matrices are
    too large for the own GEMV, as evaluation scores one stream (BLAS on one
    thread, the recurrence on charlm's team). On BLAS's threads, their
    products left them spinning for about 0.1 s on the cores that the
    sampler's team then needed: a 2x512 GRU drew 1,000 characters after a
    20-character prime at 4.5k chars/s, against 7.7k after one character;
    7.3k now (200-character prime: 4.2k -> 5.7k; Intel Xeon, 2026-12-06).
    Smaller models keep BLAS as it is: they do not call it for one stream,
    and setting its threads costs about 1 ms."""
    config = model.config
    itemsize = np.dtype(config.np_dtype).itemsize
    if K.sampler_stores_transposed(config.gates, config.hidden, itemsize):
        return contextlib.nullcontext()         # W_hh small enough for the own GEMV
    return one_stream_on_team()


def generate_ids_reference(model, prime_ids, length, rng, temperature=1.0, top_k=None,
                           top_p=None, argmax=False, batch=1, state=None):
    """generate_ids in plain numpy, one Model.next_logits per character.

    Same arguments, same draws from the same seed (up to round-off at a
    draw's boundary); slow. The reference for tests and benchmarks.
    """
    check_decoding(temperature, top_k, top_p)
    prime = _checked_prime(prime_ids, model.config.vocab_size)
    _check_batch(batch, state)
    return _reference_stream(model, prime, length, rng, temperature, top_k, top_p,
                             argmax, batch, state)


def _reference_stream(model, prime, length, rng, temperature, top_k, top_p, argmax,
                      batch, state):
    if state is None:
        state = model.zero_state(batch)
    x = np.repeat(prime[:, None], batch, axis=1)
    produced = 0
    while not length or produced < length:
        logits, state = model.next_logits(x, state)
        if argmax:
            ids = logits.argmax(axis=1)
        else:
            ids = draw(probabilities(logits, temperature, top_k, top_p), rng)
        yield ids
        x = ids.astype(np.int32)[None, :]
        produced += 1


def _checked_prime(prime_ids, vocab_size):
    """The prime as a 1-D int32 array; UsageError if empty, ValueError if an
    id is outside the vocabulary (ids come from Vocabulary.encode, so that is
    a caller's bug, not a user's)."""
    prime = np.asarray(prime_ids)
    if prime.ndim != 1 or prime.size == 0:
        raise UsageError("the prime must hold at least one character")
    if prime.dtype.kind not in "iu":
        raise ValueError(f"prime ids must be integers, got {prime.dtype}")
    low, high = int(prime.min()), int(prime.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"prime id {low if low < 0 else high} is out of range "
                         f"for a vocabulary of {vocab_size}")
    return prime.astype(np.int32)


def _check_batch(batch, state):
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise UsageError(f"batch must be a positive integer, got {batch!r}")
    if state is not None and (state.h.ndim != 3 or state.h.shape[1] != batch):
        raise ValueError(f"state must hold {batch} streams, got h of shape {state.h.shape}")
