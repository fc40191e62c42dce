"""Training: truncated BPTT over B contiguous streams, with validation,
checkpoints that resume exactly, and progress.

One step reads the next (T, B) chunk, runs forward and backward from the
carried hidden state (reset at each epoch), clips the gradient, sets the
learning rate from the schedule and updates the parameters in place. Every
`eval_every` steps (and at the end) the model is scored on the validation
split, a line is printed and appended to the metrics log, and the checkpoint
is written atomically.

A checkpoint holds everything the next step depends on: weights, optimiser
state, RNG state, the data position and the carried hidden state. So a run
stopped after a checkpoint and resumed with `--resume` takes exactly the
steps the uninterrupted run would have taken (tests/test_train.py checks that
the parameters are bitwise equal).

Files, for `--out runs/x.safetensors`:
    runs/x.safetensors          the checkpoint; also a model file for sample/eval
    runs/x.best.safetensors     the weights with the best validation loss so far
    runs/x.metrics.jsonl        one JSON object per evaluation, appended
    runs/x.corpus/              the corpus as compact ids (memory-mapped)
"""

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, diagnostics, evaluate
from .evaluate import LOG2_E
from .data import BatchStream, prepare_corpus
from .errors import CharlmError, DataError, ModelFileError, UsageError
from .model import CELLS, DTYPES, Config, Model, State
from .parallel import DataParallel, blas_threads, usable_cores, worker_count
from .optim import OPTIMIZERS, SCHEDULES, Schedule, clip_gradients, make_optimizer
from .sampling import default_prime_ids, generate_id_blocks

# Consecutive non-finite steps tolerated (each skipped) before giving up.
MAX_NONFINITE_STREAK = 10


class TrainingDiverged(CharlmError):
    """The loss or the gradient stayed non-finite; the last checkpoint is kept."""

    exit_code = 5


@dataclass
class TrainOptions:
    """Every option of `charlm train`, with its default (see the README for
    the measurement behind the defaults)."""

    cell: str = "gru"
    layers: int = 2
    hidden: int = 256
    batch_size: int = 64
    seq_length: int = 64
    dropout: float = 0.0
    optimizer: str = "adam"
    lr: float = 2e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    lr_decay: float = 0.5           # for schedule "step": multiply by this ...
    lr_decay_every: int = 1000      # ... every this many steps
    min_lr_frac: float = 0.05       # cosine/linear end at this fraction of lr
    clip_norm: float = 5.0          # 0 disables
    clip_value: float = 0.0         # 0 disables
    val_frac: float = 0.1
    max_steps: int = 0              # 0: no limit (total over resumes)
    max_epochs: float = 10          # 0: no limit
    max_time: float = 0             # seconds for this invocation, 0: no limit
    eval_every: int = 200
    sample_every: int = 1000
    sample_length: int = 200
    seed: int = 0
    threads: int = 0                # worker threads, each on a share of the batch; 0: one per core
    dtype: str = "float32"
    encoding: str = "utf-8"
    errors: str = "strict"
    record_decay: bool = False      # the gradient's decay factor at each evaluation

    # What must stay the same when a run is resumed: the model, the data
    # and the optimiser whose state is stored.
    FIXED_ON_RESUME = ("cell", "layers", "hidden", "dtype", "batch_size", "seq_length",
                       "val_frac", "encoding", "errors", "optimizer", "seed")

    def validate(self):
        _choice("cell", self.cell, CELLS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("dtype", self.dtype, tuple(DTYPES))
        for name in ("layers", "hidden", "batch_size", "seq_length", "eval_every",
                     "sample_length", "lr_decay_every"):
            _int_in(name, getattr(self, name), 1, 1 << 20)
        for name in ("max_steps", "warmup_steps", "sample_every", "threads", "seed"):
            _int_in(name, getattr(self, name), 0, 2**62)
        _real_in("dropout", self.dropout, 0, 0.95)
        _real_in("lr", self.lr, 1e-12, 10)
        _real_in("lr_decay", self.lr_decay, 1e-6, 1)
        _real_in("min_lr_frac", self.min_lr_frac, 0, 1)
        _real_in("clip_norm", self.clip_norm, 0, 1e12)
        _real_in("clip_value", self.clip_value, 0, 1e12)
        _real_in("val_frac", self.val_frac, 0, 0.5)
        _real_in("max_epochs", self.max_epochs, 0, 1e9)
        _real_in("max_time", self.max_time, 0, 1e9)
        if not isinstance(self.record_decay, bool):
            raise UsageError(f"record_decay must be true or false, got {self.record_decay!r}")
        if self.schedule in ("cosine", "linear") and not self.max_steps:
            raise UsageError(f"the {self.schedule} schedule decays over --max-steps; give it")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ModelFileError("checkpoint training options must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelFileError(f"checkpoint has unknown training options: {sorted(unknown)}")
        try:
            return cls(**d).validate()
        except UsageError as error:
            raise ModelFileError(f"checkpoint training options: {error}") from None

    @property
    def config_fields(self):
        return dict(cell=self.cell, hidden=self.hidden, layers=self.layers, dtype=self.dtype)


def _choice(name, value, allowed):
    if value not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _int_in(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not low <= value <= high:
        raise UsageError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _real_in(name, value, low, high):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and low <= value <= high
    if not ok:
        raise UsageError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def output_paths(out):
    """The files of a run whose checkpoint is `out` (see the module docstring)."""
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    return {"checkpoint": out, "best": stem + ".best.safetensors",
            "metrics": stem + ".metrics.jsonl", "corpus": stem + ".corpus"}


@dataclass
class Progress:
    """The counters a checkpoint carries from one invocation to the next."""

    step: int = 0
    chars_seen: int = 0
    train_seconds: float = 0.0
    best_val_nats: float = None
    best_step: int = None
    clipped_steps: int = 0
    skipped_nonfinite: int = 0
    history: list = field(default_factory=list)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        try:
            progress = cls(**d)
        except TypeError as error:
            raise ModelFileError(f"checkpoint progress is malformed: {error}") from None
        if not isinstance(progress.step, int) or progress.step < 0 \
                or not isinstance(progress.history, list):
            raise ModelFileError("checkpoint progress is malformed")
        return progress


class Trainer:
    """One `charlm train` invocation: new, or resumed from a checkpoint."""

    def __init__(self, corpus_path, out, options, resume=None, overrides=(),
                 echo=print, progress_bar=True, force=False):
        self.echo = echo
        self.progress_bar = progress_bar
        self._nonfinite_streak = 0      # skipped steps in a row
        self.paths = output_paths(os.fspath(out))
        loaded = None
        if resume is not None:
            loaded = checkpoint.load(resume)
            if "optim" not in loaded.meta or "progress" not in loaded.meta:
                raise ModelFileError(
                    f"{resume}: a model file, not a training checkpoint (it holds no "
                    f"optimiser state or progress); resume from the file given as --out, "
                    f"not from its .best copy or a saved model")
            options = _resumed_options(loaded.meta, options, overrides)
        elif os.path.exists(self.paths["checkpoint"]) and not force:
            raise UsageError(f"{self.paths['checkpoint']} exists; continue it with "
                             f"--resume {self.paths['checkpoint']}, or pass --force to replace it")
        self.options = options.validate()
        _check_output_dir(self.paths["checkpoint"])
        self.corpus = prepare_corpus(corpus_path, self.paths["corpus"], options.encoding,
                                     options.errors, options.val_frac)
        self.stream = BatchStream(self.corpus.train_ids, options.batch_size, options.seq_length,
                                  path=self.corpus.train_path)
        if loaded is None:
            self._start_fresh()
        else:
            self._restore(loaded)
        self.workers = worker_count(self.options.threads, self.options.batch_size)
        self.parallel = DataParallel(self.model, self.workers)

    # -- setting up ------------------------------------------------------------

    def _start_fresh(self):
        o = self.options
        config = Config(vocab_size=self.corpus.vocab.size, **o.config_fields)
        self.model = Model(config, seed=o.seed)
        self.optimizer = make_optimizer(o.optimizer, self.model.params, o.lr)
        self.rng = np.random.default_rng(o.seed)
        self.state = self.model.zero_state(o.batch_size)
        self.progress = Progress()
        if os.path.exists(self.paths["metrics"]):   # --force: a new run starts a new log
            os.remove(self.paths["metrics"])

    def _restore(self, loaded):
        meta, o = loaded.meta, self.options
        if meta.get("corpus", {}).get("fingerprint") != self.corpus.fingerprint:
            raise DataError(f"{self.corpus.path} is not the text this checkpoint was trained "
                            f"on (its content, split or encoding differ)")
        self.model = loaded.model
        self.optimizer = make_optimizer(o.optimizer, self.model.params, o.lr)
        self.optimizer.load_state(loaded.extra.get("optim", {}), meta.get("optim", {}))
        self.stream.set_state(meta.get("position"))
        self.rng = np.random.default_rng()
        try:
            self.rng.bit_generator.state = meta["rng"]
        except (KeyError, TypeError, ValueError) as error:
            raise ModelFileError(f"checkpoint RNG state is invalid: {error}") from None
        self.state = _restored_state(self.model, loaded.extra.get("state", {}), o.batch_size)
        self.progress = Progress.from_dict(meta.get("progress", {}))

    # -- the loop --------------------------------------------------------------

    def run(self):
        """Train until a limit is reached (or Ctrl-C); returns the Progress."""
        o, p = self.options, self.progress
        self._print_header()
        schedule = Schedule(o.schedule, o.lr, total_steps=o.max_steps or None,
                            warmup_steps=o.warmup_steps, decay_rate=o.lr_decay,
                            decay_every=o.lr_decay_every, min_lr_frac=o.min_lr_frac)
        started = time.perf_counter()
        window = _Window()
        bar = self._bar()
        # Several workers: one BLAS thread each. One worker: BLAS gets --threads.
        steps_blas = 1 if self.workers > 1 else o.threads
        with _StopOnSignal() as stop, blas_threads(steps_blas), self.parallel:
            try:
                while not stop.requested and not self._done(started):
                    loss, stepped = self._step(schedule, window)
                    if not stepped:
                        continue
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(
                            f"loss {loss:.3f} | {window.chars_per_second():,.0f} char/s | "
                            f"|g| {window.last_norm:.2f}{' clipped' if window.last_clipped else ''}",
                            refresh=False)
                    if p.step % o.eval_every == 0:
                        self._evaluate_and_save(window, bar)
                    if o.sample_every and p.step % o.sample_every == 0:
                        self._print_sample(bar)
            finally:
                if bar is not None:
                    bar.close()
            if window.steps or not p.history:
                self._evaluate_and_save(window, None)
        self._print_summary(stop.requested)
        if stop.requested:
            raise KeyboardInterrupt
        return p

    def _done(self, started):
        o, p = self.options, self.progress
        if o.max_steps and p.step >= o.max_steps:
            return True
        if o.max_epochs and p.step >= o.max_epochs * self.stream.chunks_per_epoch:
            return True
        return bool(o.max_time) and time.perf_counter() - started >= o.max_time

    def _step(self, schedule, window):
        """One optimiser step on the next chunk; returns (its loss in nats,
        whether the update was made)."""
        o, p = self.options, self.progress
        tick = time.perf_counter()
        x, y, starts_epoch = self.stream.next_chunk()
        if starts_epoch:
            self.state = self.model.zero_state(o.batch_size)
        loss, grads, next_state = self.parallel.loss_and_grads(
            x, y, self.state, dropout=o.dropout, rng=self.rng)
        norm, clipped = clip_gradients(grads, self.options.clip_norm, self.options.clip_value)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._skip_nonfinite(loss, norm)
            return loss, False
        self.optimizer.lr = schedule.lr_at(p.step)
        self.optimizer.step(grads)
        self.state = next_state
        p.step += 1
        p.chars_seen += x.size
        p.clipped_steps += clipped
        self._nonfinite_streak = 0
        window.add(loss, norm, clipped, x.size, time.perf_counter() - tick)
        return loss, True

    def _skip_nonfinite(self, loss, norm):
        """Skip the update: the parameters stay as they were, the carried
        state restarts from zero, and a long streak stops the run."""
        self.progress.skipped_nonfinite += 1
        self.state = self.model.zero_state(self.options.batch_size)
        self._nonfinite_streak += 1
        if self._nonfinite_streak >= MAX_NONFINITE_STREAK:
            raise TrainingDiverged(
                f"the loss ({loss}) or gradient norm ({norm}) was non-finite for "
                f"{MAX_NONFINITE_STREAK} steps in a row at step {self.progress.step}; "
                f"the last checkpoint is intact; try a lower --lr or --clip-norm")

    # -- evaluation, checkpoints, output -----------------------------------------

    def _evaluate_and_save(self, window, bar):
        p = self.progress
        record = {"step": p.step, "epoch": round(p.step / self.stream.chunks_per_epoch, 4),
                  "chars_seen": p.chars_seen, "lr": self.optimizer.lr}
        record.update(window.summary())
        if len(self.corpus.val_ids) > 1:
            with blas_threads(self.options.threads or usable_cores()):
                val = evaluate.score(self.model, self.corpus.val_ids)
                record["val_nats"] = val.nats_per_char
                record["val_bpc"] = val.bits_per_char
                if self.options.record_decay:
                    record.update(diagnostics.training_record(self.model, self.corpus.val_ids,
                                                              self.options.seed))
        p.train_seconds += window.seconds
        record["train_seconds"] = round(p.train_seconds, 3)
        window.reset()
        p.history.append(record)
        improved = "val_nats" in record and (p.best_val_nats is None
                                             or record["val_nats"] < p.best_val_nats)
        if improved:
            p.best_val_nats, p.best_step = record["val_nats"], p.step
            checkpoint.save(self.paths["best"], self.model, self.corpus.vocab,
                            meta=self._meta(include_training=False))
        self._save_checkpoint()
        _append_jsonl(self.paths["metrics"], record)
        _write(bar, self.echo, _format_record(record))

    def _save_checkpoint(self):
        carried = {"h": self.state.h}
        if self.state.c is not None:
            carried["c"] = self.state.c
        extra = {"optim": self.optimizer.state_tensors(), "state": carried}
        checkpoint.save(self.paths["checkpoint"], self.model, self.corpus.vocab,
                        extra_tensors=extra, meta=self._meta(include_training=True))

    def _meta(self, include_training):
        o, p = self.options, self.progress
        meta = {"train": o.to_dict(),
                "corpus": {"path": os.path.abspath(self.corpus.path),
                           "fingerprint": self.corpus.fingerprint,
                           "n_chars": self.corpus.n_chars, "n_train": self.corpus.n_train,
                           "n_val": self.corpus.n_val},
                "summary": {"step": p.step, "chars_seen": p.chars_seen,
                            "best_val_bpc": None if p.best_val_nats is None
                            else p.best_val_nats * LOG2_E,
                            "best_step": p.best_step}}
        if include_training:
            meta["progress"] = p.to_dict()
            meta["optim"] = self.optimizer.state_meta()
            meta["position"] = self.stream.state()
            meta["rng"] = self.rng.bit_generator.state
        return meta

    def _print_header(self):
        o, c, m = self.options, self.corpus, self.model
        resumed = f", resumed at step {self.progress.step}" if self.progress.step else ""
        self.echo(f"charlm: {c.path}: {c.n_chars:,} characters ({c.n_train:,} train, "
                  f"{c.n_val:,} validation), vocabulary {c.vocab.size}")
        self.echo(f"model: {o.cell} {o.layers}x{o.hidden}, {m.num_parameters:,} parameters, "
                  f"{o.dtype}; batch {o.batch_size} x {o.seq_length}, {o.optimizer} lr {o.lr:g}, "
                  f"{self.stream.chunks_per_epoch:,} steps per epoch{resumed}; "
                  f"{self.workers} thread{'s' if self.workers > 1 else ''}")

    def _bar(self):
        if not self.progress_bar:
            return None
        from tqdm import tqdm
        o = self.options
        total = None
        if o.max_steps:
            total = o.max_steps
        elif o.max_epochs:
            total = math.ceil(o.max_epochs * self.stream.chunks_per_epoch)
        return tqdm(total=total, initial=self.progress.step, unit="step", dynamic_ncols=True,
                    smoothing=0.1, leave=False)

    def _print_sample(self, bar):
        vocab = self.corpus.vocab
        prime = default_prime_ids(vocab)
        # Its own generator, so samples never change the training's random stream.
        rng = np.random.default_rng([self.options.seed, self.progress.step])
        blocks = generate_id_blocks(self.model, prime, self.options.sample_length, rng,
                                    temperature=0.8)
        ids = np.concatenate(list(blocks))[:, 0]
        _write(bar, self.echo, "----- sample -----\n" + vocab.decode(ids) +
               "\n------------------")

    def _print_summary(self, interrupted):
        p = self.progress
        if interrupted:
            self.echo(f"interrupted at step {p.step}; checkpoint saved to "
                      f"{self.paths['checkpoint']} (continue with --resume "
                      f"{self.paths['checkpoint']})")
        if p.best_val_nats is None:
            self.echo(f"done: {p.step} steps; no validation split, so no best figure")
        else:
            self.echo(f"best validation: {p.best_val_nats * LOG2_E:.4f} bits per character "
                      f"({p.best_val_nats:.4f} nats) at step {p.best_step}; weights in "
                      f"{self.paths['best']}")


class _StopOnSignal:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after
    the current step, so the checkpoint is never taken halfway through an
    update. A second signal interrupts at once (the last checkpoint stays)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _Window:
    """Running training figures between two evaluations."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps, self.loss, self.chars, self.seconds = 0, 0.0, 0, 0.0
        self.clipped, self.max_norm, self.norm_sum = 0, 0.0, 0.0
        self.last_norm, self.last_clipped = 0.0, False

    def add(self, loss, norm, clipped, chars, seconds):
        self.steps += 1
        self.loss += loss
        self.chars += chars
        self.seconds += seconds
        self.clipped += clipped
        self.norm_sum += norm
        self.max_norm = max(self.max_norm, norm)
        self.last_norm, self.last_clipped = norm, clipped

    def chars_per_second(self):
        return self.chars / self.seconds if self.seconds else 0.0

    def summary(self):
        if not self.steps:
            return {}
        loss = self.loss / self.steps
        return {"train_nats": loss, "train_bpc": loss * LOG2_E,
                "grad_norm_mean": self.norm_sum / self.steps, "grad_norm_max": self.max_norm,
                "clipped_frac": self.clipped / self.steps,
                "chars_per_sec": round(self.chars_per_second(), 1)}


def _format_record(r):
    parts = [f"step {r['step']:>7,}", f"epoch {r['epoch']:.2f}"]
    if "train_nats" in r:
        parts.append(f"train {r['train_nats']:.4f} nats {r['train_bpc']:.4f} bpc")
    if "val_nats" in r:
        parts.append(f"val {r['val_nats']:.4f} nats {r['val_bpc']:.4f} bpc")
    if "chars_per_sec" in r:
        parts.append(f"{r['chars_per_sec']:,.0f} char/s")
        parts.append(f"|g| {r['grad_norm_mean']:.2f} clipped {100 * r['clipped_frac']:.0f}%")
    if "decay_h" in r:
        parts.append(diagnostics.format_training_record(r))
    return " | ".join(parts)


def _write(bar, echo, text):
    if bar is not None:
        bar.write(text)
    else:
        echo(text)


def _append_jsonl(path, record):
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:
        raise DataError(f"{path}: cannot append metrics: {error.strerror or error}") from None


def _check_output_dir(path):
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise DataError(f"{directory}: cannot create the output directory: "
                        f"{error.strerror or error}") from None
    if not os.access(directory, os.W_OK):
        raise DataError(f"{directory}: the output directory is not writable")


def _resumed_options(meta, options, overrides):
    """The checkpoint's options, with the explicitly given `overrides` applied;
    UsageError if one of them would change the model, the data or the optimiser."""
    saved = TrainOptions.from_dict(meta.get("train"))
    changes = {}
    for name in overrides:
        new, old = getattr(options, name), getattr(saved, name)
        if new == old:
            continue
        if name in TrainOptions.FIXED_ON_RESUME:
            raise UsageError(f"--{name.replace('_', '-')} {new} differs from the checkpoint's "
                             f"{old}; it cannot change when resuming")
        changes[name] = new
    return dataclasses.replace(saved, **changes)


def _restored_state(model, tensors, batch_size):
    c = model.config
    shape = (c.layers, batch_size, c.hidden)
    h, cell = tensors.get("h"), tensors.get("c")
    if h is None or h.shape != shape or h.dtype != c.np_dtype or \
            c.has_cell_state != (cell is not None) or \
            (cell is not None and (cell.shape != shape or cell.dtype != c.np_dtype)):
        raise ModelFileError(f"checkpoint's carried hidden state does not fit a "
                             f"{c.layers}-layer {c.cell} with batch size {batch_size}")
    return State(np.ascontiguousarray(h), None if cell is None else np.ascontiguousarray(cell))
