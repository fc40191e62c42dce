"""Synthetic long-range tasks: where a plain RNN forgets and a gated cell remembers.

`charlm task copy|adding --lag L --cell C` trains a charlm Model on sequences
whose one scored answer depends on a symbol about L steps earlier, and reports
the accuracy on held-out sequences next to chance.

Design:

* One answer per sequence, at its last position. Every other target is
  ``IGNORE``, so the loss, and with it the whole gradient, comes from the
  answer alone: the model is not rewarded for anything it could learn
  locally, and the only way below chance is to carry information across the
  lag. (``Model.loss_and_grads`` averages over the scored positions only.)

* copy: ``S, n_1 .. n_{L-1}, ?``: S is one of 8 symbols (``A``..``H``), the n
  are random distractors from 8 others (``a``..``h``) and ``?`` asks for the
  answer: the target at ``?`` is S, the symbol exactly L steps back. The
  distractors are independent of S, so nothing after S says anything about
  it: the answer must be carried across all L steps, through L - 1 steps of
  input noise. Chance is 1/8. (Distractors drawn from S's own symbols would
  make the cell find S by its position rather than by what it is; in trials
  that defeated every cell already at lag 40, hiding the difference between
  cells that this task is meant to show.)

* adding: L digits ``0``..``9``; two of them are marked (written as ``A``..``J``
  for 0..9), the first within the first tenth of the sequence, the second in
  its second half; a final ``=`` asks for their sum a + b, written as one
  character: ``0``..``9``, then ``a``..``i`` for 10..18. Given b alone, the
  sum is still uniform over ten values, so the recent marked digit predicts
  no better than chance: the answer needs the first one, about L steps back.
  Chance is the best constant guess, computed from the answers' triangular
  distribution: always "9", right 10% of the time. (The sum rather than the
  sum mod 10: a cell can keep a running total in one direction of its state
  and read the sum off it, where mod 10 needs a 100-entry table; in trials
  mod 10 stayed at chance for every cell at lag 20.)

* Each training step draws fresh sequences, so nothing can be memorised; the
  held-out set is drawn once from its own stream of the seed, so two runs
  with the same seed (any cell) are scored on the same sequences. A sequence
  is one chunk from the zero state: truncated BPTT reaches back over all of
  it, so a failure is the cell's, not the truncation's.

* Loss and accuracy are measured only at the answer. The chance loss is the
  entropy of the answer (what the best constant distribution scores).
"""

from dataclasses import asdict, dataclass
import json
import math
import time

import numpy as np

from .errors import UsageError
from .model import CELLS, IGNORE, Config, Model
from .optim import OPTIMIZERS, clip_gradients, make_optimizer
from .parallel import blas_threads

TASKS = ("copy", "adding")
MAX_LAG = 2000            # sequences longer than this make a step slow, and say nothing new
MAX_STEPS = 10**7
MAX_SEQUENCES = 10**6
MAX_BATCH = 4096
# Consecutive non-finite gradients (each step skipped) before training stops:
# by then the weights are beyond rescue, and the report says so.
MAX_NONFINITE_STREAK = 10


# -- the tasks -------------------------------------------------------------------

class CopyTask:
    """Reproduce a symbol after L - 1 steps of distractors."""

    name = "copy"
    MIN_LAG = 1
    SYMBOLS = "ABCDEFGH"          # what is to be remembered
    DISTRACTORS = "abcdefgh"      # the noise in between
    QUERY = "?"

    def __init__(self, lag):
        self.lag = lag
        self.vocab = self.SYMBOLS + self.DISTRACTORS + self.QUERY
        self.length = lag + 1            # S, L - 1 distractors, the query

    def sample(self, rng, count):
        """`count` sequences as (x, y), each (length, count) int32; y is IGNORE
        except at the last step, where it is x[0], the symbol L steps back."""
        n = len(self.SYMBOLS)
        x = rng.integers(n, 2 * n, (self.length, count), dtype=np.int32)  # distractors
        x[0] = rng.integers(0, n, count, dtype=np.int32)
        x[-1] = self.vocab.index(self.QUERY)
        y = np.full_like(x, IGNORE)
        y[-1] = x[-1 - self.lag]
        return x, y

    def answer_distribution(self):
        """Probability of each answer id (the copied symbol is uniform)."""
        return {i: 1.0 / len(self.SYMBOLS) for i in range(len(self.SYMBOLS))}


class AddingTask:
    """The sum of two marked digits among L, the first near the start."""

    name = "adding"
    MIN_LAG = 2                    # room for two marked digits
    DIGITS = "0123456789"
    MARKED = "ABCDEFGHIJ"          # a marked 0..9
    QUERY = "="
    SUMS = "0123456789abcdefghi"   # the answer 0..18 as one character (base 19)

    def __init__(self, lag):
        self.lag = lag
        # The sums 0..9 are written with the digits themselves.
        self.vocab = self.DIGITS + self.MARKED + self.QUERY + self.SUMS[10:]
        self.length = lag + 1            # L digits, then the query
        # first mark in [0, first_end), second in [lag // 2, lag): never the same place
        self.first_end = max(1, lag // 10)

    def sample(self, rng, count):
        """`count` sequences as (x, y), each (length, count) int32; y is IGNORE
        except at the last step, where it is the sum a + b (see answer_id)."""
        L, columns = self.lag, np.arange(count)
        digits = rng.integers(0, 10, (L, count), dtype=np.int32)
        first = rng.integers(0, self.first_end, count)
        second = rng.integers(L // 2, L, count)
        x = np.empty((self.length, count), np.int32)
        x[:L] = digits                                  # ids 0..9 are the digits
        x[first, columns] += len(self.DIGITS)           # ids 10..19 mark them
        x[second, columns] += len(self.DIGITS)
        x[L] = self.vocab.index(self.QUERY)
        y = np.full_like(x, IGNORE)
        y[L] = self.answer_id(digits[first, columns] + digits[second, columns])
        return x, y

    def answer_id(self, total):
        """The vocabulary id of the sum `total` (0..18; an int or an array)."""
        sum_ids = np.array([self.vocab.index(c) for c in self.SUMS], np.int32)
        return sum_ids[total]

    def answer_distribution(self):
        """Probability of each answer id, counted over the 100 equally likely pairs."""
        counts = {}
        for a in range(10):
            for b in range(10):
                answer = int(self.answer_id(a + b))
                counts[answer] = counts.get(answer, 0) + 1
        return {answer: n / 100 for answer, n in counts.items()}


TASK_CLASSES = {cls.name: cls for cls in (CopyTask, AddingTask)}


def make_task(name, lag):
    """The task `name` ("copy" or "adding") at lag `lag`, validated."""
    if name not in TASK_CLASSES:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    _integer("lag", lag, TASK_CLASSES[name].MIN_LAG, MAX_LAG)
    return TASK_CLASSES[name](lag)


def chance_accuracy(task):
    """The accuracy of the best constant guess: the likeliest answer's probability."""
    return max(task.answer_distribution().values())


def chance_loss(task):
    """The loss in nats of the best constant prediction: the answers' entropy."""
    return -sum(p * math.log(p) for p in task.answer_distribution().values() if p > 0)


# -- options ---------------------------------------------------------------------

@dataclass(frozen=True)
class TaskOptions:
    """Every option of `charlm task` with its default (see the README's lag table)."""

    task: str = "copy"
    lag: int = 20
    cell: str = "lstm"
    hidden: int = 64
    layers: int = 1
    steps: int = 3000
    batch_size: int = 32
    # RMSProp at 1e-3: in trials the plain LSTM learnt copy at lag 40 and 60
    # with it, and stayed at chance there with Adam (1e-2 at 40, 3e-3 at 60).
    lr: float = 1e-3
    optimizer: str = "rmsprop"
    clip_norm: float = 1.0           # 0: no clipping
    clip_value: float = 0.0          # 0: no clipping
    seed: int = 0
    eval_sequences: int = 1000
    # BLAS threads during the run; 0: BLAS's default. One, because these
    # matrices are tiny: more threads only wait for each other, and on a busy
    # machine a step took 50-300 times longer with 2 threads than with 1.
    threads: int = 1

    def validate(self):
        """Self, or a UsageError naming the first bad option."""
        make_task(self.task, self.lag)
        if self.cell not in CELLS:
            raise UsageError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; "
                             f"choose one of {', '.join(OPTIMIZERS)}")
        _integer("hidden", self.hidden, 1, 4096)
        _integer("layers", self.layers, 1, 8)
        _integer("steps", self.steps, 1, MAX_STEPS)
        _integer("batch-size", self.batch_size, 1, MAX_BATCH)
        _integer("eval-sequences", self.eval_sequences, 1, MAX_SEQUENCES)
        _integer("seed", self.seed, 0, 2**63 - 1)
        _integer("threads", self.threads, 0, 1024)
        _real("lr", self.lr, 0.0, 10.0, low_open=True)
        _real("clip-norm", self.clip_norm, 0.0, 1e12)
        _real("clip-value", self.clip_value, 0.0, 1e12)
        return self


def _integer(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not low <= value <= high:
        raise UsageError(f"--{name} must be an integer in {low}..{high}, got {value!r}")


def _real(name, value, low, high, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (low < value if low_open else low <= value) \
        and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise UsageError(f"--{name} must be a number in {bracket}{low}, {high}], got {value!r}")


# -- training and scoring --------------------------------------------------------

@dataclass
class TaskResult:
    """What one `charlm task` run measured (``to_dict`` for --json)."""

    options: TaskOptions
    accuracy: float          # on the held-out sequences, at the answer
    chance: float            # the best constant guess's accuracy
    loss: float              # held-out loss at the answer, nats
    chance_loss: float       # the answers' entropy, nats
    train_loss: float        # mean training loss over the last tenth of the steps
    steps_done: int          # steps that updated the weights
    skipped_steps: int       # steps with a non-finite gradient, not applied
    clipped_frac: float      # fraction of steps whose gradient was clipped
    grad_norm_median: float  # global gradient norm before clipping
    grad_norm_max: float
    stopped_early: bool      # the gradient stayed non-finite: training gave up
    seconds: float           # training and scoring, wall clock
    parameters: int          # of the model trained

    def summary(self):
        """One line: what was trained, held-out accuracy vs chance, loss, steps, time."""
        o = self.options
        clip = [f"clip-norm {o.clip_norm:g}"] if o.clip_norm else []
        clip += [f"clip-value {o.clip_value:g}"] if o.clip_value else []
        line = (f"{o.task} lag {o.lag}, {o.cell} {o.layers}x{o.hidden} "
                f"({', '.join(clip) or 'no clipping'}): "
                f"accuracy {self.accuracy:.3f} on {o.eval_sequences} held-out sequences "
                f"(chance {self.chance:.3f}), loss {self.loss:.3f} nats "
                f"(chance {self.chance_loss:.3f}), {self.steps_done} steps in "
                f"{self.seconds:.1f} s")
        if self.stopped_early:
            line += f"; stopped early: gradient non-finite {self.skipped_steps} times"
        elif self.skipped_steps:
            line += f"; {self.skipped_steps} non-finite steps skipped"
        return line

    def to_dict(self):
        """The options and the figures, flat; a NaN (a diverged model) becomes None."""
        d = asdict(self)
        d.update(d.pop("options"))
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in d.items()}


def run_task(options):
    """Train a fresh model on `options.task` and score it on the held-out set,
    with `options.threads` BLAS threads (restored afterwards)."""
    o = options.validate()
    task = make_task(o.task, o.lag)
    start = time.perf_counter()
    with blas_threads(o.threads):
        model = Model(Config(vocab_size=len(task.vocab), cell=o.cell, hidden=o.hidden,
                             layers=o.layers), seed=o.seed)
        log = train(model, task, o)
        accuracy, loss = score(model, held_out_set(task, o.seed, o.eval_sequences),
                               o.batch_size)
    norms = np.array(log.norms or [math.nan])
    tail = log.losses[-max(1, len(log.losses) // 10):] or [math.nan]
    return TaskResult(
        options=o, accuracy=accuracy, chance=chance_accuracy(task), loss=loss,
        chance_loss=chance_loss(task), train_loss=float(np.mean(tail)),
        steps_done=len(log.losses), skipped_steps=log.skipped,
        clipped_frac=log.clipped / max(1, len(log.losses)),
        grad_norm_median=float(np.median(norms)), grad_norm_max=float(np.max(norms)),
        stopped_early=log.stopped_early, seconds=time.perf_counter() - start,
        parameters=model.num_parameters)


def _streams(seed):
    """Independent generators for training batches and the held-out set."""
    training, held_out = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(training), np.random.default_rng(held_out)


def held_out_set(task, seed, count):
    """The fixed evaluation sequences for `seed`: (x, y), each (length, count)."""
    return task.sample(_streams(seed)[1], count)


@dataclass
class TrainingLog:
    """Per applied step: the loss and the gradient norm before clipping."""

    losses: list
    norms: list
    clipped: int = 0         # applied steps whose gradient was clipped
    skipped: int = 0         # steps not applied: non-finite loss or gradient
    stopped_early: bool = False


def train(model, task, o):
    """`o.steps` optimiser steps on fresh batches, each from the zero state.

    A non-finite gradient (an explosion) skips its step, and a streak of
    them stops training; either way the run is still scored and reported,
    since a diverging cell is one of the outcomes this command is there to show.
    """
    rng = _streams(o.seed)[0]
    optimizer = make_optimizer(o.optimizer, model.params, o.lr)
    state = model.zero_state(o.batch_size)
    log, streak = TrainingLog([], []), 0
    for _ in range(o.steps):
        x, y = task.sample(rng, o.batch_size)
        loss, grads, _ = model.loss_and_grads(x, y, state)
        norm, clipped = clip_gradients(grads, o.clip_norm, o.clip_value)
        if not (math.isfinite(norm) and math.isfinite(loss)):
            log.skipped += 1
            streak += 1
            if streak >= MAX_NONFINITE_STREAK:
                log.stopped_early = True
                break
            continue
        streak = 0
        optimizer.step(grads)
        log.losses.append(loss)
        log.norms.append(norm)
        log.clipped += clipped
    return log


def score(model, sequences, batch_size):
    """(accuracy, mean loss in nats) at the answers of `sequences` (always
    their last step), run in batches of `batch_size`: the training shape, so
    the model's buffers for it are reused."""
    x_all, y_all = sequences
    correct, nats = 0, 0.0
    for begin in range(0, x_all.shape[1], batch_size):
        x, y = x_all[:, begin:begin + batch_size], y_all[:, begin:begin + batch_size]
        logits, _ = model.next_logits(x, model.zero_state(x.shape[1]))
        answers = y[-1]
        correct += int(np.count_nonzero(logits.argmax(axis=1) == answers))
        nats -= float(_log_softmax(logits)[np.arange(len(answers)), answers].sum())
    count = x_all.shape[1]
    return correct / count, nats / count


def _log_softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


# -- the command -----------------------------------------------------------------

def task_command(echo, as_json=False, **options):
    """`charlm task`: run and print one summary line, or one JSON object."""
    result = run_task(TaskOptions(**options))
    echo(json.dumps(result.to_dict()) if as_json else result.summary())
    return result
