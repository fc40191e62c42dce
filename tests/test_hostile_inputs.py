"""Hostile input for every command, run as real `python -m charlm` processes.

The matrix is data: COMMANDS says how each command takes a text file, a
model file and its numeric options; TEXT_CASES, MODEL_BUILDERS, the option
values, primes, unwritable stdouts and click's own usage errors are crossed
with it, each cell with the outcome a user should get.
A failure must be exactly one line on stderr starting "charlm: error:", the
exit code of its kind (2 usage, 3 data, 4 model file), no traceback and no
death by a signal; valid input must work (exit 0, nothing on stderr). The
cells run as separate processes, as many at a time as there are cores, all
started when the module's first test asks for them. A process is mostly
interpreter and import start-up (~0.6 CPU-seconds), so the ~310 of them take
about 100 s on two idle cores.

Separate tests cover what needs more than one process or a special
filesystem: unwritable output directories, a full disk (a tiny tmpfs when
this process may mount one, else ENOSPC injected into the save), and
`train --force` over a good checkpoint by a run that fails, which must leave
that checkpoint byte for byte as it was. Every new `charlm` command must get
an entry in COMMANDS: test_every_command_is_in_the_matrix checks `--help`.
"""

import contextlib
import io
import json
import math
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from charlm import checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The processes run this checkout's charlm, whatever is installed.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
CHARLM = [sys.executable, "-m", "charlm"]
TIMEOUT = 120
TEXT = "the cat sat on the mat; the dog sat on the log.\n" * 40
# A tiny model and short runs: a process is mostly interpreter start-up.
TINY = ["--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-length", "8"]
TRAIN_QUICK = TINY + ["--max-steps", "2", "--max-epochs", "1", "--eval-every", "50",
                      "--sample-every", "0", "--no-progress", "--threads", "1"]
GRADIENTS_QUICK = ["--span", "4", "--windows", "2", "--burn-in", "2"]
TASK_QUICK = ["copy", "--lag", "3", "--steps", "2", "--hidden", "4", "--eval-sequences", "8"]


# --- the world: files every case reads ----------------------------------------------

@dataclass
class World:
    root: Path
    text: Path            # the corpus the good model was trained on
    model: Path           # a good checkpoint
    files: dict = field(default_factory=dict)     # text case name -> path
    models: dict = field(default_factory=dict)    # model case name -> path


def _write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _big_vocabulary_text():
    """100,000 distinct code points (no surrogates), each once."""
    codepoints = [c for c in range(0x20, 0x20 + 110_000) if not 0xD800 <= c <= 0xDFFF]
    return "".join(map(chr, codepoints[:100_000]))


def _text_files(root):
    """Corpus files for TEXT_CASES."""
    (root / "a directory").mkdir()
    bad_utf8 = TEXT[:900].encode() + b"\xff\xfe\xc3" + TEXT[:900].encode()
    return {
        "missing": root / "no such file.txt",
        "missing, newline in the name": root / "no\nsuch.txt",
        "directory": root / "a directory",
        "empty": _write(root / "empty.txt", b""),
        "binary": _write(root / "binary.dat", bytes(range(256)) * 8),
        "invalid utf-8": _write(root / "bad-utf8.txt", bad_utf8),
        "latin-1": _write(root / "latin1.txt", ("café " + TEXT[:1500]).encode("latin-1")),
        "utf-16": _write(root / "utf16.txt", TEXT.encode("utf-16")),
        "shorter than one batch": _write(root / "short.txt", "the cat sa"),
        "one character": _write(root / "one.txt", "t"),
        "one-character vocabulary": _write(root / "aaa.txt", "a" * 3000),
        "100,000 code points": _write(root / "big-vocab.txt", _big_vocabulary_text()),
    }


# --- bad model files ----------------------------------------------------------------

def _parts(good):
    with safe_open(str(good), framework="numpy") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}, reader.metadata()


def _rebuilt(change):
    def build(good, path):
        tensors, metadata = change(*_parts(good))
        return _write(path, safetensors.numpy.save(tensors, metadata=metadata))
    return build


def _tensor_changed(name, how):
    def change(tensors, metadata):
        return {**tensors, name: how(tensors[name])}, metadata
    return _rebuilt(change)


def _document_changed(**changes):
    def change(tensors, metadata):
        document = json.loads(metadata["charlm"])
        document.update(changes)
        return tensors, {**metadata, "charlm": json.dumps(document)}
    return _rebuilt(change)


def _vocab_one_longer(tensors, metadata):
    document = json.loads(metadata["charlm"])
    document["vocab"] = document["vocab"] + [0x10FFFF]
    return tensors, {**metadata, "charlm": json.dumps(document)}


def _without(name):
    return _rebuilt(lambda tensors, metadata: (
        {k: v for k, v in tensors.items() if k != name}, metadata))


def _nan_in(array):
    bad = array.copy()
    bad.flat[0] = np.nan
    return bad


class _Payload:
    """A pickle that creates a file when unpickled: loading it would be
    running a stranger's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_payload(good, path):
    return _write(path, pickle.dumps({"weights": _Payload(path.parent / "PWNED")}))


def _torch_style_zip(good, path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": [0.5] * 10}))
        archive.writestr("archive/version", "3\n")
    return _write(path, buffer.getvalue())


def _header(header, rest=b""):
    data = json.dumps(header).encode()
    return len(data).to_bytes(8, "little") + data + rest


# name -> (build(good, path) -> path, words the error must contain). The
# issue's cases go to every command that reads a model; the rest (EXTRA_MODEL_CASES)
# only to `info`, since all commands load through the same charlm.checkpoint.load.
MODEL_BUILDERS = {
    "missing": (lambda good, path: path, ["No such file"]),
    "directory": (lambda good, path: (path.mkdir(), path)[1], ["directory"]),
    "empty": (lambda good, path: _write(path, b""), ["0 bytes"]),
    "truncated": (lambda good, path: _write(path, good.read_bytes()[:-1000]),
                  ["not a valid safetensors"]),
    "random bytes": (lambda good, path: _write(path, np.random.default_rng(5).bytes(5000)),
                     ["header length"]),
    "a PyTorch-style zip": (_torch_style_zip, ["zip"]),
    "a pickle payload": (_pickle_payload, ["pickle"]),
    "JSON text": (lambda good, path: _write(path, json.dumps({"weights": [1, 2]})),
                  ["header length"]),
    "oversized header": (lambda good, path: _write(path, (2**62).to_bytes(8, "little") + b"{}"),
                         ["header length", "limit"]),
    "tensor larger than the file": (lambda good, path: _write(path, _header(
        {"model/out.bias": {"dtype": "F32", "shape": [2**31, 2**31],
                            "data_offsets": [0, 2**64 - 1]}}, b"\0" * 64)),
        ["not a valid safetensors"]),
    "wrong shape": (_tensor_changed("model/out.weight", lambda a: np.zeros((3, 3), a.dtype)),
                    ["model/out.weight", "shape"]),
    "wrong dtype": (_tensor_changed("model/out.bias", lambda a: a.astype(np.float64)),
                    ["model/out.bias", "float64"]),
    "integer weights": (_tensor_changed("model/weight_hh_l0", lambda a: a.astype(np.int32)),
                        ["model/weight_hh_l0", "I32"]),
    "missing tensor": (_without("model/weight_hh_l0"), ["missing", "weight_hh_l0"]),
    "NaN weights": (_tensor_changed("model/weight_ih_l0", _nan_in), ["NaN"]),
    "vocabulary not matching the config": (_rebuilt(_vocab_one_longer),
                                           ["vocabulary has", "vocab_size"]),
    "inf weights": (_tensor_changed("model/out.weight", lambda a: a * np.inf), ["infinite"]),
    "absurd config": (_document_changed(config={"vocab_size": 2**40, "cell": "gru",
                                                "hidden": 2**40, "layers": 1,
                                                "dtype": "float32"}),
                      ["invalid model config"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, train_tiny):
    root, model, _ = train_tiny(TEXT, hidden=8, layers=1, batch_size=2, seq_length=8,
                                max_steps=2, eval_every=2)
    files = tmp_path_factory.mktemp("texts")
    bad = tmp_path_factory.mktemp("models")
    models = {name: build(model, bad / f"{re.sub(r'[^a-z0-9]+', '-', name)}.safetensors")
              for name, (build, _) in MODEL_BUILDERS.items()}
    return World(root=root, text=root / "corpus.txt", model=model, files=_text_files(files),
                 models=models)


# --- the commands ---------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """How the matrix calls one command. Each function gets (world, case
    directory, ...) and returns the arguments after `charlm`."""

    name: str
    with_text: object = None        # (w, d, path) -> args, or None: takes no text file
    with_model: object = None       # (w, d, path) -> args, or None: takes no model file
    base: object = None             # (w, d) -> args a numeric option is added to
    options: tuple = ()             # of Numeric
    encoding_options: bool = False  # has --encoding and --errors for its text


@dataclass(frozen=True)
class Numeric:
    """A numeric option and the values it accepts; `outcome` of a valid
    value is "ok", or "stream" for values that mean "write forever"."""

    flag: str
    kind: type
    low: float
    high: float
    low_open: bool = False
    valid_outcome: str = "ok"

    def accepts(self, value):
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


def _ints(*specs):
    return tuple(Numeric(flag, int, low, high) for flag, low, high in specs)


def _floats(*specs):
    return tuple(Numeric(flag, float, low, high, *rest) for flag, low, high, *rest in specs)


MAX_INT = 2**62
INT_VALUES = (-1, 0, "nan", 10**30)
FLOAT_VALUES = (-1.0, 0.0, math.nan, math.inf, 1e300)

COMMANDS = {
    "train": Command(
        "train",
        with_text=lambda w, d, path: ["train", path, "--out", d / "m.safetensors", *TRAIN_QUICK],
        with_model=lambda w, d, path: ["train", w.text, "--resume", path,
                                       "--out", d / "m.safetensors", *TRAIN_QUICK],
        base=lambda w, d: ["train", w.text, "--out", d / "m.safetensors", *TRAIN_QUICK],
        options=_ints(("--layers", 1, 64), ("--hidden", 1, 16384), ("--batch-size", 1, 2**20),
                      ("--seq-length", 1, 2**20), ("--warmup-steps", 0, MAX_INT),
                      ("--lr-decay-every", 1, 2**20), ("--max-steps", 0, MAX_INT),
                      ("--eval-every", 1, 2**20), ("--sample-every", 0, MAX_INT),
                      ("--sample-length", 1, 2**20), ("--seed", 0, MAX_INT),
                      ("--threads", 0, 1024))
        + _floats(("--dropout", 0, 0.95), ("--lr", 1e-12, 10), ("--lr-decay", 1e-6, 1),
                  ("--min-lr-frac", 0, 1), ("--clip-norm", 0, 1e12), ("--clip-value", 0, 1e12),
                  ("--val-frac", 0, 0.5), ("--max-epochs", 0, 1e9), ("--max-time", 0, 1e9)),
        encoding_options=True),
    "sample": Command(
        "sample",
        with_text=lambda w, d, path: ["sample", w.model, "--prime-file", path, "--length", "5"],
        with_model=lambda w, d, path: ["sample", path, "--length", "5"],
        base=lambda w, d: ["sample", w.model, "--length", "5", "--seed", "1"],
        options=(Numeric("--length", int, 0, math.inf, valid_outcome="stream"),  # 0: no end
                 Numeric("--temperature", float, 0, math.inf, low_open=True),
                 Numeric("--seed", int, 0, math.inf),
                 Numeric("--top-k", int, 1, 2**31 - 1),
                 Numeric("--top-p", float, 0, 1, low_open=True),
                 Numeric("--num-samples", int, 1, 65536),
                 Numeric("--threads", int, 0, 1024))),
    "eval": Command(
        "eval",
        with_text=lambda w, d, path: ["eval", w.model, path],
        with_model=lambda w, d, path: ["eval", path, w.text],
        base=lambda w, d: ["eval", w.model, w.text],
        options=(Numeric("--threads", int, 0, 1024),),
        encoding_options=True),
    "info": Command(
        "info",
        with_model=lambda w, d, path: ["info", path]),
    "gradients": Command(
        "gradients",
        with_text=lambda w, d, path: ["gradients", w.model, "--text", path, *GRADIENTS_QUICK],
        with_model=lambda w, d, path: ["gradients", path, "--text", w.text, *GRADIENTS_QUICK],
        base=lambda w, d: ["gradients", w.model, "--text", w.text, *GRADIENTS_QUICK],
        options=(Numeric("--span", int, 1, 10_000), Numeric("--windows", int, 1, 100_000),
                 Numeric("--burn-in", int, 0, 100_000), Numeric("--seed", int, 0, math.inf),
                 Numeric("--threads", int, 0, 1024)),
        encoding_options=True),
    "task": Command(                # no text or model file: its own data, its own model
        "task",
        base=lambda w, d: ["task", *TASK_QUICK],
        options=(Numeric("--lag", int, 1, 2000), Numeric("--hidden", int, 1, 4096),
                 Numeric("--layers", int, 1, 8), Numeric("--steps", int, 1, 10**7),
                 Numeric("--batch-size", int, 1, 4096), Numeric("--lr", float, 0, 10, low_open=True),
                 Numeric("--clip-norm", float, 0, 1e12), Numeric("--clip-value", float, 0, 1e12),
                 Numeric("--seed", int, 0, 2**63 - 1), Numeric("--eval-sequences", int, 1, 10**6),
                 Numeric("--threads", int, 0, 1024))),
}


# --- the cases ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One cell: the arguments, and the outcome a user should get.

    code: the exit code; 0 means it works (nothing on stderr), 130 with
    stdout "stream" means it writes until Ctrl-C, which then ends it cleanly.
    stdout: "pipe", "full" (/dev/full) or "closed".
    """

    id: str
    args: object                    # (world, case dir) -> list of arguments
    code: int
    words: tuple = ()
    stdout: str = "pipe"
    check: object = None            # (world, case dir, result) -> None: more assertions

    def __repr__(self):
        return self.id


def _one_char_vocabulary_samples_only_that_character(w, d, result):
    sampled = _run(["sample", d / "m.safetensors", "--length", "40", "--seed", "3"], d)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout == "a" * 40 + "\n"


def _big_vocabulary_model_works(w, d, result):
    model = d / "m.safetensors"
    info = _run(["info", model, "--json"], d)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["vocab_size"] == 100_000
    sampled = _run(["sample", model, "--length", "30", "--seed", "1"], d)
    assert sampled.returncode == 0, sampled.stderr
    assert len(sampled.stdout) == 31 and set(sampled.stdout[:-1]) <= set(_big_vocabulary_text())
    piece = _write(d / "piece.txt", _big_vocabulary_text()[5000:5300])
    scored = _run(["eval", model, piece, "--json"], d)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["characters_scored"] == 299


def _trained(w, d, result):
    assert checkpoint.load(d / "m.safetensors").meta["progress"]["step"] >= 1


UNKNOWN = "not in the vocabulary"
# text case -> extra arguments -> {command: (code, words[, check])}; a command
# missing from a row does not take that kind of input.
TEXT_CASES = {
    "missing": {(): {c: (3, ["no such file"]) for c in ("train", "sample", "eval", "gradients")}},
    "missing, newline in the name": {(): {"train": (3, ["no\\nsuch.txt"])}},
    "directory": {(): {c: (3, ["directory"]) for c in ("train", "sample", "eval", "gradients")}},
    "empty": {(): {c: (3, ["empty"]) for c in ("train", "sample", "eval", "gradients")}},
    "binary": {(): {c: (3, ["binary"]) for c in ("train", "sample", "eval", "gradients")}},
    "invalid utf-8": {
        (): {c: (3, ["cannot decode", "byte offset 900"])
             for c in ("train", "sample", "eval", "gradients")},
        ("--errors", "replace"): {"train": (0, [], _trained), "eval": (3, [UNKNOWN, "'\ufffd'"]),
                                  "gradients": (0, [])},
        ("--errors", "ignore"): {"train": (0, [], _trained), "eval": (0, []),
                                 "gradients": (0, [])},
        ("--encoding", "latin-1"): {"train": (0, [], _trained), "eval": (3, [UNKNOWN]),
                                    "gradients": (0, [])},
        ("--errors", "no-such-policy"): {c: (2, ["--errors"])
                                         for c in ("train", "eval", "gradients")},
        ("--errors", "xmlcharrefreplace"): {c: (2, ["only works for encoding"])
                                            for c in ("train", "eval", "gradients")},
        ("--encoding", "no-such-codec"): {c: (2, ["unknown encoding"])
                                          for c in ("train", "eval", "gradients")},
        ("--encoding", "zlib", "--errors", "replace"): {"train": (2, ["not a text encoding"])},
    },
    "latin-1": {
        (): {c: (3, ["cannot decode"]) for c in ("train", "sample", "eval", "gradients")},
        ("--encoding", "latin-1"): {"train": (0, [], _trained), "eval": (3, [UNKNOWN, "'é'"]),
                                    "gradients": (0, [])},
    },
    "utf-16": {
        (): {c: (3, ["binary"]) for c in ("train", "sample", "eval", "gradients")},
        ("--encoding", "utf-16"): {"train": (0, [], _trained), "eval": (0, []),
                                   "gradients": (0, [])},
    },
    "shorter than one batch": {(): {"train": (3, ["shorter than one batch"]),
                                    "sample": (0, []), "eval": (0, []), "gradients": (0, [])}},
    "one character": {(): {"train": (3, ["too short"]), "sample": (0, []),
                           "eval": (3, ["fewer than 2"]), "gradients": (2, ["--span"])}},
    "one-character vocabulary": {(): {
        "train": (0, [], _one_char_vocabulary_samples_only_that_character),
        "sample": (0, []), "eval": (0, []), "gradients": (0, [])}},
    "100,000 code points": {
        (): {"sample": (3, [UNKNOWN]), "eval": (3, [UNKNOWN, "..."]), "gradients": (0, [])},
        ("--val-frac", "0", "--batch-size", "1", "--hidden", "4", "--max-steps", "1"): {
            "train": (0, [], _big_vocabulary_model_works)},
    },
}


def _text_cases():
    for name, rows in TEXT_CASES.items():
        for extra, outcomes in rows.items():
            for command_name, (code, words, *check) in outcomes.items():
                command = COMMANDS[command_name]
                if command.with_text is None:
                    continue
                label = f"{command_name}: text {name}" + (f" {' '.join(extra)}" if extra else "")

                def args(w, d, command=command, name=name, extra=extra):
                    return [*command.with_text(w, d, w.files[name]), *extra]
                yield Case(label, args, code, tuple(words), check=check[0] if check else None)


EXTRA_MODEL_CASES = {"directory", "empty", "JSON text", "tensor larger than the file",
                     "integer weights", "inf weights", "absurd config"}


def _model_cases():
    for name, (_, words) in MODEL_BUILDERS.items():
        for command in COMMANDS.values():
            if command.with_model is None or (name in EXTRA_MODEL_CASES
                                              and command.name != "info"):
                continue

            def args(w, d, command=command, name=name):
                return command.with_model(w, d, w.models[name])
            check = _no_code_ran if name == "a pickle payload" else None
            yield Case(f"{command.name}: model {name}", args, 4, tuple(words), check=check)
    yield Case("train: resume from a model file that is not a checkpoint",
               lambda w, d: ["train", w.text, "--resume", _plain_model(w, d),
                             "--out", d / "m.safetensors", *TRAIN_QUICK],
               4, ("optimiser",))


def _no_code_ran(w, d, result):
    assert not (w.models["a pickle payload"].parent / "PWNED").exists()


def _plain_model(w, d):
    plain = d / "plain.safetensors"
    if not plain.exists():
        import charlm
        charlm.load(w.model).save(plain)
    return plain


def _format(value):
    return str(value) if isinstance(value, (int, str)) else repr(value)


def _names_the_option(flag):
    def check(w, d, result):
        name = flag.lstrip("-")
        assert name in result.stderr or name.replace("-", "_") in result.stderr, result.stderr
    return check


def _option_cases():
    for command in COMMANDS.values():
        for option in command.options:
            for value in INT_VALUES if option.kind is int else FLOAT_VALUES:
                number = math.nan if value == "nan" else value
                if not option.accepts(number):
                    code, stdout, check = 2, "pipe", _names_the_option(option.flag)
                elif option.valid_outcome == "stream":
                    code, stdout, check = 130, "stream", None
                else:
                    code, stdout, check = 0, "pipe", None

                def args(w, d, command=command, option=option, value=value):
                    return [*command.base(w, d), option.flag, _format(value)]
                yield Case(f"{command.name}: {option.flag} {_format(value)}", args, code,
                           stdout=stdout, check=check)


def _prime_cases():
    base = ["--length", "5", "--seed", "2"]
    yield Case("sample: prime outside the vocabulary",
               lambda w, d: ["sample", w.model, "--prime", "the ☃ cat Z", *base],
               3, ("prime", UNKNOWN, "'☃'", "'Z'"))
    yield Case("sample: prime of undecodable bytes",
               lambda w, d: ["sample", w.model, b"--prime=the \xff cat", *base],
               3, ("prime", UNKNOWN, "\\udcff"))
    yield Case("sample: empty prime", lambda w, d: ["sample", w.model, "--prime", "", *base], 0)
    yield Case("sample: 100,000-character prime",
               lambda w, d: ["sample", w.model, "--prime-file",
                             _write(d / "prime.txt", TEXT * 52), *base], 0)
    yield Case("sample: --prime and --prime-file",
               lambda w, d: ["sample", w.model, "--prime", "a", "--prime-file", w.text], 2,
               ("not both",))


def _stdout_cases():
    for name, args in (("sample", lambda w, d: ["sample", w.model, "--length", "50"]),
                       ("sample --length 0", lambda w, d: ["sample", w.model, "--length", "0"]),
                       ("eval", lambda w, d: ["eval", w.model, w.text]),
                       ("eval --json", lambda w, d: ["eval", w.model, w.text, "--json"]),
                       ("info", lambda w, d: ["info", w.model]),
                       ("info --json", lambda w, d: ["info", w.model, "--json"]),
                       ("gradients", lambda w, d: COMMANDS["gradients"].base(w, d)),
                       ("train", lambda w, d: COMMANDS["train"].base(w, d))):
        yield Case(f"{name}: stdout is a full disk", args, 3, ("No space left",), stdout="full")
        if name == "train":    # its product is the checkpoint: it trains, its log goes nowhere
            yield Case(f"{name}: stdout is closed", args, 0, stdout="closed", check=_trained)
        else:
            yield Case(f"{name}: stdout is closed", args, 3, ("closed",), stdout="closed")


def _usage_cases():
    yield Case("charlm: no such command", lambda w, d: ["transmogrify"], 2, ("No such command",))
    yield Case("train: no corpus", lambda w, d: ["train"], 2, ("Missing argument",))
    yield Case("train: misspelt option", lambda w, d: ["train", w.text, "--hiden", "3"], 2,
               ("--hiden",))
    yield Case("train: option without its value", lambda w, d: ["train", w.text, "--lr"], 2,
               ("--lr",))
    yield Case("train: unknown cell", lambda w, d: ["train", w.text, "--cell", "transformer"], 2,
               ("--cell",))
    yield Case("sample: --num-samples x --length too large",
               lambda w, d: ["sample", w.model, "--num-samples", "1000", "--length", "10000000"],
               2, ("in memory",))


CASES = [*_text_cases(), *_model_cases(), *_option_cases(), *_prime_cases(),
         *_stdout_cases(), *_usage_cases()]


# --- running them -----------------------------------------------------------------------

def _args(args):
    return [a if isinstance(a, bytes) else str(a) for a in args]


def _run(args, cwd, stdout="pipe"):
    """Run `charlm args` to the end; stdout: "pipe", "full" or "closed"."""
    command = CHARLM + _args(args)
    if stdout == "closed":     # the shell closes fd 1 for the child (no preexec_fn in threads)
        command = ["sh", "-c", 'exec "$@" >&-', "sh", *command]
    with contextlib.ExitStack() as stack:
        out = subprocess.PIPE
        if stdout == "full":
            out = stack.enter_context(open("/dev/full", "wb"))
        elif stdout == "closed":
            out = subprocess.DEVNULL      # closed again by the shell
        return subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.PIPE, cwd=cwd, env=ENV, timeout=TIMEOUT,
                              errors="backslashreplace")


def _run_until_interrupted(args, cwd):
    """Start a command that writes forever; once it has written, Ctrl-C it."""
    process = subprocess.Popen(CHARLM + _args(args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=ENV)
    first = b""
    try:
        while len(first) < 64 and select.select([process.stdout], [], [], TIMEOUT)[0]:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            first += chunk
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode,
                                       first.decode("utf-8", "replace"),
                                       stderr.decode("utf-8", "backslashreplace"))


def _case_dir(world, case):
    directory = world.root / "cases" / re.sub(r"[^A-Za-z0-9]+", "-", case.id).strip("-")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _execute(world, case):
    directory = _case_dir(world, case)
    args = case.args(world, directory)
    if case.stdout == "stream":
        return _run_until_interrupted(args, directory)
    return _run(args, directory, case.stdout)


@pytest.fixture(scope="module")
def results(request, world):
    """Start every selected case at once on a pool as wide as the machine;
    each test then waits for its own."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")
                and "case" in item.callspec.params]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        yield {case.id: pool.submit(_execute, world, case) for case in selected}


def assert_clean_failure(result, code, words=()):
    """One "charlm: error:" line, the exit code of its kind, no traceback, no signal."""
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: "), result.stderr
    assert len(lines[0]) < 600
    for word in words:
        assert word in lines[0], (word, lines[0])


# Cells that fail in code outside this test's reach, reported to its owner.
# strict: once fixed, the cell passes, the xfail fails, and the entry must go.
KNOWN_BUGS = {}     # case id -> why it still fails (a strict xfail)


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.id, marks=[pytest.mark.xfail(reason=KNOWN_BUGS[case.id],
                                                            strict=True)]
                 if case.id in KNOWN_BUGS else [])
    for case in CASES])
def test_matrix(results, world, case):
    result = results[case.id].result()
    if case.code == 0:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    elif case.stdout == "stream":
        assert len(result.stdout) >= 16           # it wrote, and was still writing ...
        assert result.returncode == 130           # ... when Ctrl-C ended it cleanly
        assert result.stderr == "charlm: interrupted\n"
    else:
        assert_clean_failure(result, case.code, case.words)
        if case.id.startswith("sample:") and case.stdout == "pipe":
            assert result.stdout == ""            # errors come before any text
    if case.check is not None:
        case.check(world, _case_dir(world, case), result)


def test_every_command_is_in_the_matrix():
    """A new command needs an entry in COMMANDS (and so gets the whole matrix)."""
    listing = subprocess.run(CHARLM + ["--help"], capture_output=True, text=True, env=ENV,
                             timeout=TIMEOUT).stdout
    commands = re.findall(r"^  (\w[\w-]*)  ", listing.split("Commands:")[1], re.MULTILINE)
    assert commands and set(commands) == set(COMMANDS)
    for command in COMMANDS.values():     # each reads a file of the user's, or has options
        assert command.with_text or command.with_model or command.options


# --- output that cannot be written ---------------------------------------------------------

def _mount_tmpfs(path, options):
    """Mount a tmpfs at path; False when this process may not (not root, no
    CAP_SYS_ADMIN, no mount(8))."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _unmount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def mounted(tmp_path):
    """mounted(options) -> a tmpfs directory, or None; unmounted afterwards."""
    mounts = []

    def mount(options):
        path = tmp_path / f"mnt{len(mounts)}"
        if not _mount_tmpfs(path, options):
            return None
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        _unmount(path)


def _unwritable_directories(tmp_path, mounted):
    """(description, directory) pairs that cannot be written even by root."""
    blocker = _write(tmp_path / "a-regular-file", "x")
    yield "a path under a regular file", blocker / "runs"
    if os.path.isdir("/proc/self"):
        yield "a directory in /proc", Path("/proc/self/charlm-runs")
    read_only = mounted("ro,size=64k")
    if read_only is not None:
        yield "a read-only filesystem", read_only


def test_unwritable_output_directory(world, tmp_path, mounted):
    for description, directory in _unwritable_directories(tmp_path, mounted):
        for args in (["train", world.text, "--out", directory / "m.safetensors", *TRAIN_QUICK],
                     ["gradients", world.model, "--text", world.text, *GRADIENTS_QUICK,
                      "--csv", directory / "flow.csv"]):
            result = _run(args, tmp_path)
            assert_clean_failure(result, 3)
            assert str(directory) in result.stderr, description


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permissions do not stop root; the read-only filesystem and /proc "
                           "cases of test_unwritable_output_directory stand in")
def test_output_directory_without_write_permission(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = _run(["train", world.text, "--out", locked / "m.safetensors", *TRAIN_QUICK],
                  tmp_path)
    assert_clean_failure(result, 3, ("not writable",))


# ENOSPC for the checkpoint's temp file only, for machines where no tmpfs can be mounted:
# os.write is what charlm.checkpoint writes with.
_FULL_DISK_WRAPPER = """
import errno, os, sys
real_write = os.write
def write(fd, data):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)
os.write = write
from charlm.cli import main
main(sys.argv[1:], prog_name="charlm")
"""


def _fill(directory, leave_bytes):
    """Fill the filesystem of directory up to `leave_bytes` of free space."""
    filler = directory / "filler"
    with open(filler, "wb") as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(b"\0" * 65536)
                file.flush()
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave_bytes))


def test_full_disk_during_a_checkpoint_write_keeps_the_last_checkpoint(world, tmp_path, mounted):
    disk = mounted("size=2m")
    where = disk if disk is not None else tmp_path / "disk"
    where.mkdir(exist_ok=True)
    out = where / "m.safetensors"
    first = _run(["train", world.text, "--out", out, *TRAIN_QUICK, "--eval-every", "1"], where)
    assert first.returncode == 0, first.stderr
    good = out.read_bytes()
    command = ["train", world.text, "--resume", out, "--out", out, "--max-steps", "5",
               "--no-progress"]
    if disk is not None:
        # room for the corpus ids (re-written on resume) but not for a checkpoint
        _fill(disk, leave_bytes=3 * 4096 + 2 * (out.parent / "m.corpus" / "train.ids")
              .stat().st_size)
        result = _run(command, where)
    else:
        result = subprocess.run([sys.executable, "-c", _FULL_DISK_WRAPPER, *_args(command)],
                                capture_output=True, text=True, env=ENV, cwd=where,
                                timeout=TIMEOUT)
    assert_clean_failure(result, 3, ("cannot save the model", "No space left on device"))
    assert out.read_bytes() == good
    assert not [name for name in os.listdir(where) if name.endswith(".tmp")]


def test_full_disk_from_the_start(world, mounted, tmp_path):
    disk = mounted("size=256k")
    if disk is None:
        pytest.skip("cannot mount a tmpfs here; the ENOSPC of a checkpoint write is covered "
                    "by injection in test_full_disk_during_a_checkpoint_write")
    _fill(disk, leave_bytes=0)
    result = _run(["train", world.text, "--out", disk / "m.safetensors", *TRAIN_QUICK], tmp_path)
    assert_clean_failure(result, 3, ("No space left on device",))


# --- a good checkpoint is never replaced by a failed run -------------------------------------

def _force_cases(world, directory):
    """(description, arguments, code) of runs with --force that fail."""
    out = directory / "m.safetensors"
    yield ("a binary corpus", ["train", world.files["binary"], "--out", out, "--force",
                               *TRAIN_QUICK], 3)
    yield ("a corpus shorter than one batch", ["train", world.files["shorter than one batch"],
                                               "--out", out, "--force", *TRAIN_QUICK], 3)
    yield ("a diverging run", ["train", world.text, "--out", out, "--force", *TRAIN_QUICK,
                               "--cell", "rnn-relu", "--optimizer", "sgd", "--lr", "10",
                               "--clip-norm", "0", "--hidden", "64", "--max-steps", "40",
                               "--eval-every", "40"], 5)
    yield ("an option out of range", ["train", world.text, "--out", out, "--force",
                                      *TRAIN_QUICK, "--dropout", "2"], 2)


def test_a_failed_forced_run_leaves_the_good_checkpoint(world, tmp_path):
    out = tmp_path / "m.safetensors"
    trained = _run(["train", world.text, "--out", out, *TRAIN_QUICK], tmp_path)
    assert trained.returncode == 0, trained.stderr
    best = tmp_path / "m.best.safetensors"
    before = (out.read_bytes(), best.read_bytes())
    for description, args, code in _force_cases(world, tmp_path):
        result = _run(args, tmp_path)
        assert_clean_failure(result, code)
        assert (out.read_bytes(), best.read_bytes()) == before, description
    assert checkpoint.load(out).meta["progress"]["step"] == 2


def test_a_corpus_directory_blocked_by_a_file_leaves_the_good_checkpoint(world, tmp_path):
    out = tmp_path / "m.safetensors"
    trained = _run(["train", world.text, "--out", out, *TRAIN_QUICK], tmp_path)
    assert trained.returncode == 0, trained.stderr
    before = out.read_bytes()
    shutil.rmtree(tmp_path / "m.corpus")
    _write(tmp_path / "m.corpus", "in the way")
    result = _run(["train", world.text, "--resume", out, "--out", out, "--max-steps", "4",
                   "--no-progress"], tmp_path)
    assert_clean_failure(result, 3, ("m.corpus",))
    assert out.read_bytes() == before
