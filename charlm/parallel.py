"""Data parallelism over the streams of a batch.

The B streams of a truncated-BPTT batch never interact: each has its own
hidden state, and the loss is a mean over all of them. So a training step
splits into independent shards of the batch. Each worker thread runs the
whole forward and backward pass of its shard (the kernels release the GIL),
and the shard gradients are averaged, weighted by the positions each shard
scores. The result is the gradient of the whole batch, up to rounding.

Why not let BLAS spread each matrix product over the cores instead? The
recurrence makes one small (B,H)@(H,G) product per time step, and splitting
such a product across threads costs a fork and a join per step; on 2 cores
that lost half the speed of the small models, and a busy core stalled every
step. Sharded, each core runs its own time loop with no synchronisation at
all, and BLAS stays on one thread per worker (see `single_threaded_blas`).
"""

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _kernels as K
from .model import IGNORE, State


def usable_cores():
    """The number of cores this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:          # not on Linux
        return max(os.cpu_count() or 1, 1)


def worker_count(threads, batch_size):
    """Workers for `threads` (0: one per usable core), never more than streams."""
    wanted = threads or usable_cores()
    return max(1, min(wanted, batch_size))


def single_threaded_blas(workers):
    """While several workers run, each BLAS call must use one thread: the
    workers already occupy the cores, and BLAS threads would compete with
    them. A context manager; does nothing for a single worker."""
    return blas_threads(1) if workers > 1 else contextlib.nullcontext()


class blas_threads:
    """Run BLAS on `threads` threads (0: as it is), from construction on (the
    CLI sets it for the whole process), or, used as a context manager, until
    the block ends. Inside single_threaded_blas, the single-stream passes
    (validation) use it to get the cores back: there, one matrix-vector
    product per step is all the parallelism there is.

    The kernels are told whether BLAS is down to one thread: then they keep
    even large products on their own kernel, which beats a single-threaded
    BLAS, and otherwise leave those to BLAS's threads."""

    def __init__(self, threads):
        self._limits = None
        if threads:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=threads, user_api="blas")
            self._previous = K.set_blas_on_one_thread(threads == 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._limits is not None:
            self._limits.__exit__(*exc)
            K.set_blas_on_one_thread(self._previous)


class DataParallel:
    """`loss_and_grads` of a Model, computed by `workers` threads, each on a
    contiguous share of the batch's streams.

    The replicas share the model's parameter arrays (an optimiser step on the
    model is seen by all) and have their own gradient and workspace buffers.
    The combined gradient lands in `model.grads`, as the unsharded call leaves it.
    """

    def __init__(self, model, workers):
        self.model = model
        self.workers = max(int(workers), 1)
        self._replicas = [model.replica() for _ in range(self.workers)] if self.workers > 1 else []
        self._pool = None           # started on first use, stopped by close()

    def close(self):
        """Stop the worker threads (the next call starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def loss_and_grads(self, x, y, state, dropout=0.0, rng=None):
        """As Model.loss_and_grads (without state_grad)."""
        B = x.shape[1]
        shards = min(self.workers, B)
        if shards <= 1:
            return self.model.loss_and_grads(x, y, state, dropout=dropout, rng=rng)
        bounds = [B * k // shards for k in range(shards + 1)]
        # Each worker needs its own Generator (they are not thread-safe); drawing
        # their seeds from `rng` keeps a run reproducible for a given worker count.
        rngs = [None] * shards
        if dropout > 0.0:
            rngs = [np.random.default_rng(seed) for seed in rng.integers(0, 2**63, size=shards)]
        shares = [functools.partial(replica.loss_and_grads, x[:, lo:hi], y[:, lo:hi],
                                    _state_slice(state, lo, hi), dropout, shard_rng)
                  for replica, lo, hi, shard_rng in zip(self._replicas, bounds, bounds[1:], rngs)]
        results = self._run_all(shares)
        weights = _shard_weights(y, bounds)
        loss = sum(w * shard_loss for w, (shard_loss, _, _) in zip(weights, results))
        self._combine_grads(weights, [grads for _, grads, _ in results])
        final = _concat_states([shard_state for _, _, shard_state in results])
        return loss, self.model.grads, final

    def _run_all(self, calls):
        """Run the calls on the pool; the calling thread takes the first itself
        rather than wait idle. Returns their results in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="charlm-shard")
        futures = [self._pool.submit(call) for call in calls[1:]]
        return [calls[0]()] + [future.result() for future in futures]

    def _combine_grads(self, weights, shard_grads):
        """model.grads = sum over the (two or more) shards of weight * shard
        gradient, one kernel pass per pair (numpy needed a temporary per term)."""
        for name, total in self.model.grads.items():
            out = total.reshape(-1)
            K.scaled_sum(out, shard_grads[0][name].reshape(-1), weights[0],
                         shard_grads[1][name].reshape(-1), weights[1])
            for w, grads in zip(weights[2:], shard_grads[2:]):
                K.scaled_sum(out, out, 1.0, grads[name].reshape(-1), w)


def _shard_weights(y, bounds):
    """Each shard's share of the scored positions (its loss is a mean over its own)."""
    scored = np.array([np.count_nonzero(y[:, lo:hi] != IGNORE)
                       for lo, hi in zip(bounds, bounds[1:])], np.float64)
    if scored.sum() == 0:           # nothing scored anywhere: every loss and gradient is 0
        return [0.0] * len(scored)
    return list(scored / scored.sum())


def _state_slice(state, lo, hi):
    c = None if state.c is None else np.ascontiguousarray(state.c[:, lo:hi])
    return State(np.ascontiguousarray(state.h[:, lo:hi]), c)


def _concat_states(states):
    h = np.concatenate([s.h for s in states], axis=1)
    c = None if states[0].c is None else np.concatenate([s.c for s in states], axis=1)
    return State(h, c)


# A single stream (evaluation, sampling) uses a team of at most this many
# threads: the number measured (charlm/_team.h).
ONE_STREAM_MAX_THREADS = 2


def one_stream_thread_count():
    """Threads a single stream (scoring a text, sampling at batch 1) may use:
    1 when the caller has limited BLAS to one thread (`--threads 1`, or inside
    a training run's workers), else up to ONE_STREAM_MAX_THREADS cores."""
    if K.blas_runs_on_one_thread():
        return 1
    return min(usable_cores(), ONE_STREAM_MAX_THREADS)


@contextlib.contextmanager
def one_stream_team(threads):
    """Within the block, a single stream's recurrence over a large W_hh runs
    on a team of `threads` threads (_team.h; 1: on the calling thread)."""
    previous = K.set_one_stream_threads(threads)
    try:
        yield
    finally:
        K.set_one_stream_threads(previous)


@contextlib.contextmanager
def one_stream_on_team():
    """Within the block, a single stream's passes (scoring a text, a sampler's
    prime) run on charlm's team of one_stream_thread_count() threads, and
    BLAS on one thread: its idle threads would spin for a while after each
    product, on the cores the team's threads need."""
    threads = one_stream_thread_count()
    with blas_threads(1), one_stream_team(threads):
        yield
