"""The `charlm` command line.

Every failure a user can cause ends in one line on stderr and a distinct
exit code, never a traceback:
    2  usage error (a bad option or argument)
    3  data error (a corpus or text that cannot be used, an unwritable output)
    4  model file error (missing, corrupt or not a charlm model)
    5  training diverged (the loss stayed non-finite)
    130 interrupted (Ctrl-C), after saving what there was to save
"""

import contextlib
import errno
import functools
import os
import re
import signal
import sys

import click
from click.core import ParameterSource

from . import __version__
from .errors import CharlmError

MAX_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _friendly_errors(command):
    """Turn charlm's own errors into a one-line message and its exit code."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CharlmError as error:
            # One line even when a file name holds a line break.
            message = str(error).replace("\r", "\\r").replace("\n", "\\n")
            click.echo(f"charlm: error: {message}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            # Decided: exit 130. Another Ctrl-C from here on would only turn
            # that into a death by SIGINT (and maybe a traceback), so ignore it.
            with contextlib.suppress(ValueError):     # not the main thread
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            click.echo("charlm: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("charlm: error: out of memory; try a smaller --hidden or --batch-size",
                       err=True)
            sys.exit(3)
        except BrokenPipeError:
            sys.stderr.close()     # e.g. `charlm sample m | head`: nothing more to say
            sys.exit(0)
    return wrapper


def _duration(text):
    """'600', '90s', '10m', '1.5h' -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 600, 90s, 10m or 1.5h",
                                 param_hint="--max-time")
    return float(match.group(1)) * MAX_TIME_UNITS.get(match.group(2) or "s")


MAX_THREADS = 1024


def _check_threads(threads):
    if not 0 <= threads <= MAX_THREADS:    # the BLAS library takes a C int, and sanity
        from .errors import UsageError
        raise UsageError(f"--threads must be an integer in 0..{MAX_THREADS}, got {threads}")


def _limit_threads(threads):
    """Set the BLAS thread count for this process (0: leave the default)."""
    _check_threads(threads)
    from .parallel import blas_threads
    blas_threads(threads)       # applies at once; the process ends with the command


class _OneLineGroup(click.Group):
    """The charlm command group: every failure ends in one line on stderr.

    click prints a usage error as a usage block, a hint and an "Error:" line;
    here it becomes one "charlm: error:" line with the same exit code (2).
    An OSError that gets this far comes from writing the output (a full disk,
    a closed or failing stdout), since charlm's own file errors are
    CharlmErrors; it is reported as a data error (exit 3).
    """

    def make_context(self, *args, **kwargs):
        with _usage_errors_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors_on_one_line():
            return super().invoke(ctx)

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        except OSError as error:
            _output_failed(error)


class _OneLineUsageError(click.ClickException):
    def show(self, file=None):
        click.echo(f"charlm: error: {self.message}", err=True)


@contextlib.contextmanager
def _usage_errors_on_one_line():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise               # a bare `charlm` prints the help: keep click's way
    except click.ClickException as error:
        message = " ".join(error.format_message().split())
        ctx = getattr(error, "ctx", None)
        if ctx is not None:
            message += f" (see '{ctx.command_path} --help')"
        one_line = _OneLineUsageError(message)
        one_line.exit_code = error.exit_code
        raise one_line from None


def _output_failed(error):
    """Exit 3 with one line; silence stdout first, or Python's final flush of
    it would fail again and print a second message."""
    where = f"{error.filename}: " if error.filename else "cannot write the output: "
    click.echo(f"charlm: error: {where}{error.strerror or error}", err=True)
    with contextlib.suppress(OSError, ValueError, AttributeError):   # no real stdout (tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(3)


def _decorate(function, options):
    """Apply click decorators listed top to bottom, as if stacked above `function`."""
    for option in reversed(options):
        function = option(function)
    return function


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charlm")
def main():
    """charlm: character-level RNN, LSTM and GRU language models on the CPU."""


# --- train -----------------------------------------------------------------------

def _train_options(function):
    from .train import TrainOptions
    d = TrainOptions()
    from .model import CELLS, DTYPES
    from .optim import OPTIMIZERS, SCHEDULES
    options = [
        click.option("--cell", type=click.Choice(CELLS), default=d.cell, show_default=True,
                     help="Recurrent cell."),
        click.option("--layers", type=int, default=d.layers, show_default=True),
        click.option("--hidden", type=int, default=d.hidden, show_default=True,
                     help="Hidden units per layer."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True,
                     help="Parallel contiguous streams (B)."),
        click.option("--seq-length", type=int, default=d.seq_length, show_default=True,
                     help="Steps of truncated BPTT per chunk (T)."),
        click.option("--dropout", type=float, default=d.dropout, show_default=True,
                     help="Inverted dropout on each layer's output, training only."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=d.optimizer,
                     show_default=True),
        click.option("--lr", type=float, default=d.lr, show_default=True,
                     help="Learning rate (the peak, with a schedule)."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=d.schedule,
                     show_default=True, help="Learning-rate schedule over --max-steps."),
        click.option("--warmup-steps", type=int, default=d.warmup_steps, show_default=True),
        click.option("--lr-decay", type=float, default=d.lr_decay, show_default=True,
                     help="Factor for --schedule step."),
        click.option("--lr-decay-every", type=int, default=d.lr_decay_every, show_default=True,
                     help="Steps between decays for --schedule step."),
        click.option("--min-lr-frac", type=float, default=d.min_lr_frac, show_default=True,
                     help="Final lr / lr for cosine and linear schedules."),
        click.option("--clip-norm", type=float, default=d.clip_norm, show_default=True,
                     help="Clip the global gradient norm to this (direction kept); 0: off."),
        click.option("--clip-value", type=float, default=d.clip_value, show_default=True,
                     help="Clip each gradient element to [-v, v]; 0: off."),
        click.option("--val-frac", type=float, default=d.val_frac, show_default=True,
                     help="The last part of the file held out for validation."),
        click.option("--max-steps", type=int, default=d.max_steps, show_default=True,
                     help="Stop after this many optimiser steps in all (over resumes); 0: none."),
        click.option("--max-epochs", type=float, default=d.max_epochs, show_default=True,
                     help="Stop after this many passes over the training text; 0: none."),
        click.option("--max-time", type=str, default="0",
                     help="Stop after this long, e.g. 600, 90s, 10m, 1.5h; 0: none."),
        click.option("--eval-every", type=int, default=d.eval_every, show_default=True,
                     help="Steps between validation, checkpoint and log line."),
        click.option("--record-decay", is_flag=True, default=d.record_decay,
                     help="At each evaluation, also measure the gradient's decay factor per "
                          "step back in time (see `charlm gradients`) and log it."),
        click.option("--sample-every", type=int, default=d.sample_every, show_default=True,
                     help="Steps between printed samples; 0: never."),
        click.option("--sample-length", type=int, default=d.sample_length, show_default=True),
        click.option("--seed", type=int, default=d.seed, show_default=True),
        click.option("--threads", type=int, default=d.threads,
                     help="Worker threads, each training on a share of the batch's "
                          "streams; 0: one per core."),
        click.option("--dtype", type=click.Choice(tuple(DTYPES)), default=d.dtype,
                     show_default=True),
        click.option("--encoding", default=d.encoding, show_default=True,
                     help="The corpus's text encoding."),
        click.option("--errors", default=d.errors, show_default=True,
                     help="What to do with undecodable bytes: strict, replace, ignore..."),
    ]
    return _decorate(function, options)


@main.command()
@click.argument("corpus", type=click.Path(dir_okay=True))
@_train_options
@click.option("--out", type=click.Path(), default=None,
              help="Checkpoint path [default: runs/<corpus name>.safetensors, or --resume's].")
@click.option("--resume", type=click.Path(), default=None,
              help="Continue from this checkpoint (with --out the same path: in place).")
@click.option("--force", is_flag=True, help="Replace an existing --out instead of refusing.")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@click.pass_context
@_friendly_errors
def train(ctx, corpus, out, resume, force, no_progress, **values):
    """Train a model on the text file CORPUS."""
    import os

    from .train import Trainer, TrainOptions
    values["max_time"] = _duration(values["max_time"])
    options = TrainOptions(**values)
    overrides = [name for name in values
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if out is None:
        stem = os.path.splitext(os.path.basename(os.path.normpath(corpus)))[0] or "model"
        out = resume or os.path.join("runs", stem + ".safetensors")
    _check_threads(options.threads)     # the trainer runs its own workers (charlm.parallel)
    trainer = Trainer(corpus, out, options, resume=resume, overrides=overrides,
                      echo=click.echo, progress_bar=not no_progress, force=force)
    trainer.run()


# --- sample ----------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path())
@click.option("--length", type=int, default=500, show_default=True,
              help="Characters to write; 0: until Ctrl-C.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Divide the logits by this: below 1 is bolder, above 1 wilder.")
@click.option("--prime", default=None, help="Text to start from (default: a newline).")
@click.option("--prime-file", type=click.Path(), default=None,
              help="Read the prime from this UTF-8 file.")
@click.option("--seed", type=int, default=None, help="Same seed, same model: same text.")
@click.option("--top-k", type=int, default=None, help="Draw only from the k likeliest.")
@click.option("--top-p", type=float, default=None,
              help="Draw only from the smallest set holding this much probability.")
@click.option("--argmax", is_flag=True, help="Always take the most likely character.")
@click.option("--num-samples", type=int, default=1, show_default=True,
              help="Independent samples, generated together as one batch.")
@click.option("--threads", type=int, default=0,
              help="BLAS threads; 1 also keeps a single sample of a large LSTM/GRU on one "
                   "thread (by default it takes two cores). 0: the default.")
@_friendly_errors
def sample(model, length, temperature, prime, prime_file, seed, top_k, top_p, argmax,
           num_samples, threads):
    """Write text from a trained MODEL to stdout, as it is produced."""
    from .lm import load
    if length < 0:
        raise click.BadParameter("must be >= 0", param_hint="--length")
    from .lm import MAX_BATCH_SAMPLES
    if not 1 <= num_samples <= MAX_BATCH_SAMPLES:
        raise click.BadParameter(f"must be in 1..{MAX_BATCH_SAMPLES}", param_hint="--num-samples")
    if num_samples > 1 and not length:
        raise click.BadParameter("give a --length with --num-samples", param_hint="--length")
    if prime_file is not None:
        if prime is not None:
            raise click.BadParameter("give --prime or --prime-file, not both")
        from .data import read_text
        prime = "".join(read_text(prime_file))
    _limit_threads(threads)
    lm = load(model)
    options = dict(temperature=temperature, prime=prime, seed=seed, top_k=top_k, top_p=top_p,
                   argmax=argmax)
    if num_samples > 1:
        for k, text in enumerate(lm.sample_batch(num_samples, length, **options), 1):
            _emit(f"===== sample {k} =====\n{prime or ''}{text}\n")
        return
    pieces = lm.generate_pieces(length, **options)     # checks the prime and options first
    if prime:
        _emit(prime)
    for text in pieces:     # one write per block the sampler produces, not per character
        _emit(text)
    _emit("\n")


def _emit(text):
    """Write to stdout as valid UTF-8 whatever the locale, and flush, so
    characters appear as they are produced."""
    if sys.stdout is None:     # started with stdout closed: the text cannot go anywhere
        raise OSError(errno.EBADF, "standard output is closed")
    sys.stdout.buffer.write(text.encode("utf-8", "replace"))
    sys.stdout.buffer.flush()


# --- eval ------------------------------------------------------------------------

@main.command(name="eval")
@click.argument("model", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--skip-unknown", is_flag=True,
              help="Drop characters the model never saw (and report how many) "
                   "instead of stopping with an error that lists them.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--errors", default="strict", show_default=True,
              help="What to do with undecodable bytes: strict, replace, ignore...")
@click.option("--threads", type=int, default=0,
              help="BLAS threads; 1 also keeps the scoring on one thread (by default it "
                   "takes two cores). 0: the default.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@_friendly_errors
def eval_(model, file, skip_unknown, encoding, errors, threads, as_json):
    """Score FILE with MODEL: nats and bits per character, and perplexity.

    The figure is the mean over characters 2..n of -log2 p(character | all
    preceding characters), from a zero state: the same as the training
    validation and LanguageModel.bits_per_char.
    """
    import json

    from . import evaluate
    from .data import read_text
    from .lm import load
    _limit_threads(threads)
    lm = load(model)
    unknown = "skip" if skip_unknown else "error"
    skipped = 0

    def pieces():
        nonlocal skipped
        from .errors import DataError
        for text in read_text(file, encoding, errors):
            try:
                ids, n = lm.vocab.encode_with_count(text, unknown)
            except DataError as error:       # name the file the characters are in
                raise DataError(f"{file}: {error}") from None
            skipped += n
            yield ids

    result = evaluate.score(lm.model, pieces())
    if result.predicted == 0:
        from .errors import DataError
        raise DataError(f"{file}: fewer than 2 known characters; nothing to score")
    figures = {"file": file, "characters_scored": result.predicted,
               "skipped_unknown": skipped, "nats_per_char": result.nats_per_char,
               "bits_per_char": result.bits_per_char, "perplexity": result.perplexity}
    if as_json:
        _emit(json.dumps(figures) + "\n")
        return
    _emit(f"{file}: {result.predicted:,} characters scored"
          + (f", {skipped:,} unknown skipped" if skip_unknown else "") + "\n"
          + f"nats per character: {result.nats_per_char:.6f}\n"
          + f"bits per character: {result.bits_per_char:.6f}\n"
          + f"perplexity:         {result.perplexity:.6f}\n")


# --- info ------------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@_friendly_errors
def info(model, as_json):
    """Describe a model or checkpoint file: config, size, vocabulary, training."""
    import json

    from .lm import load
    lm = load(model)
    c, meta = lm.config, lm.meta
    summary = meta.get("summary", {}) if isinstance(meta.get("summary"), dict) else {}
    details = {"file": model, "config": c.to_dict(), "parameters": lm.model.num_parameters,
               "vocabulary": "".join(lm.vocab.chars), "vocab_size": lm.vocab.size,
               "steps": summary.get("step"), "chars_seen": summary.get("chars_seen"),
               "best_val_bpc": summary.get("best_val_bpc"), "best_step": summary.get("best_step"),
               "train_options": meta.get("train"), "corpus": meta.get("corpus")}
    if as_json:
        _emit(json.dumps(details, ensure_ascii=False) + "\n")
        return
    best = details["best_val_bpc"]
    lines = [
        f"file:        {model}",
        f"model:       {c.cell}, {c.layers} layer(s) x {c.hidden} units, {c.dtype}",
        f"parameters:  {lm.model.num_parameters:,}",
        f"vocabulary:  {lm.vocab.size} characters: {_shown(lm.vocab.chars)}",
        f"trained:     {_count(details['steps'])} steps, {_count(details['chars_seen'])} characters seen",
        "best val:    " + (f"{best:.4f} bits per character at step {details['best_step']}"
                            if isinstance(best, (int, float)) else "n/a"),
    ]
    corpus = details["corpus"]
    if isinstance(corpus, dict) and "path" in corpus:
        lines.append(f"corpus:      {corpus.get('path')} ({_count(corpus.get('n_chars'))} characters)")
    if isinstance(details["train_options"], dict):
        t = details["train_options"]
        lines.append("options:     " + ", ".join(f"{k}={t[k]}" for k in sorted(t)))
    for line in lines:
        _emit(line + "\n")


def _shown(chars, limit=80):
    text = "".join(chars)
    shown = repr(text[:limit])
    return shown + (f" ... (+{len(text) - limit})" if len(text) > limit else "")


def _count(value):
    return f"{value:,}" if isinstance(value, int) else "?"


# --- gradients -------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path())
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Measure on this text file [default: the model's own validation text].")
@click.option("--span", type=int, default=100, show_default=True,
              help="K: how many steps back from the loss to follow the gradient.")
@click.option("--windows", type=int, default=64, show_default=True,
              help="Windows at random positions of the text to average over.")
@click.option("--burn-in", type=int, default=100, show_default=True,
              help="Characters run before each window, so it starts from a typical state.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the window positions.")
@click.option("--csv", "csv_path", type=click.Path(), default=None,
              help="Write the mean gradient norm per k and series to this CSV file.")
@click.option("--plot", type=click.Path(), default=None,
              help="Write a PNG chart to this file (needs pip install 'charlm[plot]').")
@click.option("--encoding", default=None, help="The --text file's encoding [default: utf-8].")
@click.option("--errors", default=None,
              help="What to do with undecodable bytes: strict, replace, ignore...")
@click.option("--threads", type=int, default=0)
@_friendly_errors
def gradients(model, threads, **options):
    """How far back in time MODEL's gradient reaches: the gradient flow through
    time per layer, its decay factor per step, gate saturation and the spectral
    norm of the recurrent weights (charlm.diagnostics)."""
    from .diagnostics import gradients_command
    _limit_threads(threads)
    gradients_command(model, echo=lambda text: _emit(text + "\n"), **options)


# --- task ------------------------------------------------------------------------

def _task_options(function):
    from .model import CELLS
    from .optim import OPTIMIZERS
    from .tasks import TASKS, TaskOptions
    d = TaskOptions()
    options = [
        click.argument("task", type=click.Choice(TASKS)),
        click.option("--lag", type=int, default=d.lag, show_default=True,
                     help="L: how many steps back the answer was shown."),
        click.option("--cell", type=click.Choice(CELLS), default=d.cell, show_default=True),
        click.option("--hidden", type=int, default=d.hidden, show_default=True),
        click.option("--layers", type=int, default=d.layers, show_default=True),
        click.option("--steps", type=int, default=d.steps, show_default=True,
                     help="Optimiser steps, each on fresh sequences."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True),
        click.option("--lr", type=float, default=d.lr, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=d.optimizer,
                     show_default=True),
        click.option("--clip-norm", type=float, default=d.clip_norm, show_default=True,
                     help="Clip the global gradient norm to this; 0: off."),
        click.option("--clip-value", type=float, default=d.clip_value, show_default=True,
                     help="Clip each gradient element to [-v, v]; 0: off."),
        click.option("--seed", type=int, default=d.seed, show_default=True,
                     help="Seeds the weights, the training and the held-out sequences."),
        click.option("--eval-sequences", type=int, default=d.eval_sequences, show_default=True,
                     help="Held-out sequences scored at the end."),
        click.option("--threads", type=int, default=d.threads, show_default=True,
                     help="BLAS threads; 0: BLAS's default (slower for models this small)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    return _decorate(function, options)


@main.command()
@_task_options
@_friendly_errors
def task(**options):
    """Train on a synthetic long-range TASK and report held-out accuracy against
    chance: copy (reproduce the symbol seen L steps back) or adding (the sum of
    two marked digits, the first about L steps back). See charlm.tasks."""
    from .tasks import task_command
    task_command(echo=lambda text: _emit(text + "\n"), **options)    # sets --threads itself


if __name__ == "__main__":
    main()
