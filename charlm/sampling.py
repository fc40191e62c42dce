"""Drawing text from a model: temperature, top-k, top-p and argmax decoding.

`generate_ids` primes the model with some ids (one forward over the whole
prime), then draws one id at a time, feeding each back in. Probabilities are
softmax(logits / temperature), optionally restricted to the k most likely ids
(top-k) or to the smallest set whose probability reaches p (top-p, nucleus),
and renormalised. The random draws come from a numpy Generator, so the same
seed, model and options always give the same text.
"""

import math

import numpy as np

from .errors import UsageError


def check_decoding(temperature=1.0, top_k=None, top_p=None):
    """UsageError unless the decoding options are in range."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise UsageError(f"top-k must be a positive integer, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UsageError(f"top-p must be in (0, 1], got {top_p!r}")


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """The decoding distribution for each row of logits (B, V), as float64."""
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if top_k is not None and top_k < p.shape[1]:
        # keep the k largest: zero everything below the k-th largest value
        kth = -np.partition(-p, top_k - 1, axis=1)[:, top_k - 1:top_k]
        p = np.where(p >= kth, p, 0.0)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=1)
        sorted_p = np.take_along_axis(p, order, axis=1)
        # keep an id if the mass before it (in descending order) is below p
        before = np.cumsum(sorted_p, axis=1) - sorted_p
        keep_sorted = before < top_p * sorted_p.sum(axis=1, keepdims=True)
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
    return p / p.sum(axis=1, keepdims=True)


def draw(p, rng):
    """One id per row of p (B, V), by inverse-CDF sampling."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random((p.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), p.shape[1] - 1)


def generate_ids(model, prime_ids, length, rng, temperature=1.0, top_k=None,
                 top_p=None, argmax=False, batch=1, state=None):
    """Yield `length` steps of drawn ids, each an int array (batch,).

    prime_ids: a non-empty 1-D sequence of ids fed before drawing (the
    same prime for every stream). length 0 or None means unbounded.
    """
    check_decoding(temperature, top_k, top_p)
    prime = np.asarray(prime_ids, np.int32)
    if prime.ndim != 1 or prime.size == 0:
        raise UsageError("the prime must hold at least one character")
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
