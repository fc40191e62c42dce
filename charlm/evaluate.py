"""How well a model predicts a text: the one definition of bits per character.

For ids c_1..c_n the figure is the mean over characters 2..n of
-log2 p(c_k | c_1..c_{k-1}), starting from the all-zero state. The text is a
single stream (batch 1) read in chunks of CHUNK characters with the state
carried, so each prediction sees the whole history, exactly as the definition
says; within a chunk the input projection and the output layer are still one
GEMM each over all the chunk's rows. Training-time validation, `charlm eval`
and `LanguageModel.bits_per_char` all call this function.
"""

import math
from dataclasses import dataclass

import numpy as np

from .data import release_pages

CHUNK = 2048
RELEASE_EVERY_IDS = 1 << 20   # unmap the pages of a mapped text every ~1M ids read
LOG2_E = 1 / math.log(2)


@dataclass(frozen=True)
class Score:
    """The result of scoring a text: totals, and the per-character figures."""

    nats_total: float
    predicted: int            # characters predicted: n - 1

    @property
    def nats_per_char(self):
        return self.nats_total / self.predicted if self.predicted else float("nan")

    @property
    def bits_per_char(self):
        return self.nats_per_char * LOG2_E

    @property
    def perplexity(self):
        return math.exp(self.nats_per_char)


def chunked_log_probs(model, ids, chunk=CHUNK):
    """Yield log p(c_k | c_1..c_{k-1}) in nats for k = 2..n, a chunk at a time
    (float64 arrays), so a text of any length is scored in bounded memory.

    ids: a 1-D array of ids in [0, V) (a memory map is fine: it is read a
    chunk at a time), or an iterable of such arrays, the consecutive pieces of
    one text (as a file is read block by block). The model's id check runs
    before any kernel.
    """
    pieces = [ids] if isinstance(ids, np.ndarray) else ids
    state = model.zero_state(1)
    previous = np.zeros(0, np.int32)     # the last id of the previous piece
    for piece in pieces:
        piece = np.asarray(piece)
        if len(previous):
            piece = np.concatenate([previous, piece.astype(np.int32)])
        for start in range(0, len(piece) - 1, chunk):
            window = np.asarray(piece[start:start + chunk + 1], dtype=np.int32)
            logp, state = model.log_probs(window[:-1, None], window[1:, None], state)
            if start % RELEASE_EVERY_IDS < chunk:
                release_pages(piece)        # keep a mapped text's resident pages bounded
            yield logp[:, 0]
        if len(piece):
            previous = np.asarray(piece[-1:], dtype=np.int32)


def log_probs(model, ids, chunk=CHUNK):
    """All of chunked_log_probs as one float64 array of n - 1 values."""
    pieces = list(chunked_log_probs(model, ids, chunk))
    return np.concatenate(pieces) if pieces else np.zeros(0)


def score(model, ids, chunk=CHUNK):
    """The Score of a 1-D array of ids (see the module docstring)."""
    nats, predicted = 0.0, 0
    for logp in chunked_log_probs(model, ids, chunk):
        nats -= float(logp.sum())
        predicted += len(logp)
    return Score(nats_total=nats, predicted=predicted)
