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
import queue
import threading
from dataclasses import dataclass

import numpy as np

from .data import release_pages
from .parallel import blas_threads, one_stream_on_team, one_stream_thread_count

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

    With two or more cores, the chunks of a small model go through a
    two-stage pipeline (see _pipelined), and a large model's recurrences run
    on a team of threads (_team.h); the figures are the same either way, to
    the last bit. BLAS limited to one thread by the caller (`charlm eval
    --threads 1`, charlm.parallel.blas_threads(1)) keeps it all on one.
    """
    windows = _windows(ids, chunk)
    threads = one_stream_thread_count()
    if _pipeline_pays(model, threads):
        with blas_threads(1):       # the two stages are the parallelism
            yield from _pipelined(model, windows)
        return
    with one_stream_on_team():
        state = model.zero_state(1)
        for window in windows:
            logp, state = model.log_probs(window[:-1, None], window[1:, None], state)
            yield logp[:, 0]


def _windows(ids, chunk):
    """The text as windows of chunk + 1 ids, each overlapping the next by one
    (a chunk's inputs and, shifted by one, its targets)."""
    pieces = [ids] if isinstance(ids, np.ndarray) else ids
    previous = np.zeros(0, np.int32)     # the last id of the previous piece
    for piece in pieces:
        piece = np.asarray(piece)
        if len(previous):
            piece = np.concatenate([previous, piece.astype(np.int32)])
        for start in range(0, len(piece) - 1, chunk):
            window = np.asarray(piece[start:start + chunk + 1], dtype=np.int32)
            if start % RELEASE_EVERY_IDS < chunk:
                release_pages(piece)        # keep a mapped text's resident pages bounded
            yield window
        if len(piece):
            previous = np.asarray(piece[-1:], dtype=np.int32)


# Batch 1 leaves a single stream with one matrix-vector product per layer and
# step. Two ways to use a second core:
#
# - A pipeline of layers (small models). Layer l at chunk k+1 does not wait
#   for layer l+1 at chunk k, so a helper thread runs the lower half of the
#   layers one chunk ahead of the calling thread, which runs the upper half,
#   the output layer and the softmax (the kernels release the GIL). Each
#   thread keeps its layers' weights in its own core's cache, and a step is
#   latency, not bandwidth.
# - A team within each step (large models): each core owns a share of every
#   layer's units and of its W_hh, and the cores meet once per step
#   (_team.h). W_hh no longer fits one core's cache; shared so, and read
#   alternately forwards and backwards, half of each share stays in cache.
#
# Where the one overtakes the other (2-layer models, 2 cores of a Zen 5,
# 2026-12-02, chars/s, 3 runs each, pipeline vs team): LSTM H=192 (W_hh
# 576 KB) 134-170k vs 107-119k; H=256 (1 MB) 69-76k vs 70-83k; H=320 39k vs
# 45-54k; GRU H=256 (768 KB) 94-96k vs 89-105k, H=384 37-38k vs 43-47k; RNN
# H=384 162-183k vs 148-151k, H=512 (1 MB) 73-85k vs 91-100k. Before the team,
# large models went to BLAS's GEMV on both cores (LSTM 2x512: 13-14k chars/s,
# against 16-19k with the team).
PIPELINE_MAX_WEIGHT_BYTES = 768 << 10   # W_hh of one layer: LSTM H=221, GRU H=256
_END = object()


def _pipeline_pays(model, threads):
    c = model.config
    weight_bytes = c.gates * c.hidden * np.dtype(c.np_dtype).itemsize
    return threads >= 2 and weight_bytes <= PIPELINE_MAX_WEIGHT_BYTES


def _pipelined(model, windows):
    """chunked_log_probs for a generator of windows, in two threads."""
    split = (model.config.layers + 1) // 2          # layers [0, split) run ahead
    lower_state, upper_state = model.zero_state(1), model.zero_state(1)
    handoff = queue.Queue(maxsize=1)                # at most one chunk ahead
    stop = threading.Event()

    def put(item):
        """Hand over, unless the consumer has gone (then False)."""
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run_lower():
        try:
            for window in windows:
                if not put(model.forward_lower(window[:-1, None], window[1:, None],
                                               lower_state, split)):
                    return
            put(_END)
        except BaseException as error:      # re-raised in the consumer's thread
            put(error)

    helper = threading.Thread(target=run_lower, name="charlm-eval-lower", daemon=True)
    helper.start()
    try:
        while (item := handoff.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield model.forward_upper(item, upper_state, split)[:, 0]
    finally:
        stop.set()
        helper.join()


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
