"""The charlm model file: one safetensors file that is both a model and a training checkpoint.

Layout of a file:

- ``model/<parameter name>``: every parameter of the model (names from
  charlm.model.parameter_shapes), in the config's dtype;
- any other ``<prefix>/<name>`` tensors the caller adds, e.g. optimiser
  moments (``optim/adam.m/weight_hh_l0``), the best-by-validation weights
  (``best/out.weight``) or the carried hidden state (``state/h``);
- safetensors metadata ``{"format": "charlm", "format_version": "1",
  "charlm": <JSON object>}``, where the JSON object holds ``config``
  (Config.to_dict()), ``vocab`` (the code points) and whatever else the caller
  records (training step, rng state, data position, metrics...).

Model files are meant to be shared, so loading trusts nothing: no pickle is
ever involved (safetensors holds only raw numbers and a JSON header), the
header length is checked before the safetensors library sees the file, and
every field is validated. Anything wrong becomes a one-line ModelFileError.

Saving is atomic: the bytes go to a temporary file in the same directory,
are fsync'ed, and only then renamed over the target, so a crash or a full
disk mid-save leaves the previous file as it was. The bytes are written here
rather than by safetensors' own file writer so that every write error is seen
and the data is on disk before the rename. Non-finite tensors are refused, so
a diverged run can never overwrite a good checkpoint.

A process killed mid-save (SIGKILL, power loss) cannot remove its temporary
file, so each save first deletes the abandoned temporary files of the same
target. It tells abandoned from in-use by a lock: a writer holds an
exclusive flock on its temporary file until the rename, and the kernel drops
that lock when the writer dies, however it dies.
"""

import contextlib
import errno
import json
import os
import re
import reprlib
import secrets
from dataclasses import dataclass, field

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from . import _kernels as K
from .errors import CharlmError, DataError, ModelFileError, UsageError
from .model import Config, Model, parameter_shapes
from .vocab import Vocabulary

try:
    import fcntl
except ImportError:   # no flock (Windows): abandoned temporary files are left alone
    fcntl = None

FORMAT = "charlm"
FORMAT_VERSION = "1"
MODEL_PREFIX = "model"
# safetensors' own limit on the JSON header; a charlm header is a few kB
# plus the vocabulary (at most ~10 MB even for every Unicode code point).
MAX_HEADER_BYTES = 100_000_000
# Keys of the metadata JSON that save() fills in itself.
RESERVED_META_KEYS = ("config", "vocab")

# The tensor dtypes a file may hold: safetensors' name -> numpy type.
TENSOR_DTYPES = {
    "F32": np.float32, "F64": np.float64,
    "I32": np.int32, "I64": np.int64,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
}
_MODEL_DTYPE_CODES = {"float32": "F32", "float64": "F64"}
# Longest piece of untrusted text (names, library messages) quoted in an error.
_MAX_QUOTED = 200
_MAX_LISTED_NAMES = 5


class NonFiniteError(CharlmError):
    """A model or checkpoint tensor holds NaN or infinity and was not saved."""


@dataclass
class LoadedFile:
    """What load() returns.

    meta: the caller's part of the metadata JSON (everything but config and vocab).
    extra: the non-model tensors, grouped by prefix: {"optim": {"adam.m/weight_hh_l0": array}}.
    """

    model: Model
    vocab: Vocabulary
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


# --- saving -----------------------------------------------------------------------

def save(path, model, vocab, extra_tensors=None, meta=None):
    """Write ``model`` (plus extras and metadata) to ``path`` atomically.

    extra_tensors: {prefix: {name: array}} stored as ``prefix/name``; arrays of
        float32/float64/int32/int64/uint8..uint64, any shape.
    meta: a JSON-serialisable dict (strict JSON: no NaN or infinity), stored
        beside config and vocab and returned by load() as LoadedFile.meta.

    Raises NonFiniteError if any float tensor holds NaN or infinity and
    DataError if the file cannot be written; in both cases a file already at
    ``path`` is left untouched. Caller mistakes (bad meta or extras) are
    ValueErrors.
    """
    path = os.fspath(path)
    tensors = _tensors_to_save(model, extra_tensors)
    _refuse_non_finite(path, tensors)
    metadata = _metadata_to_save(model, vocab, meta)
    # safetensors reads each array through its data pointer, so all of them
    # must be contiguous (ensured by _tensors_to_save).
    data = safetensors.numpy.save(tensors, metadata=metadata)
    _write_atomically(path, data)


def _tensors_to_save(model, extra_tensors):
    tensors = {f"{MODEL_PREFIX}/{name}": np.require(p, requirements="C")
               for name, p in model.params.items()}
    for prefix, group in (extra_tensors or {}).items():
        if not isinstance(prefix, str) or not prefix or "/" in prefix or prefix == MODEL_PREFIX:
            raise ValueError(f"extra tensor prefix {prefix!r} must be a non-empty string "
                             f"without '/' other than {MODEL_PREFIX!r}")
        for name, array in group.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"extra tensor names must be non-empty strings, got {name!r}")
            array = np.require(array, requirements="C")
            if array.dtype.type not in TENSOR_DTYPES.values():
                raise ValueError(f"extra tensor {prefix}/{name} has unsupported dtype {array.dtype}")
            tensors[f"{prefix}/{name}"] = array
    return tensors


def _refuse_non_finite(path, tensors):
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise NonFiniteError(f"{path}: refusing to save: {name} contains NaN or infinite values")


def _metadata_to_save(model, vocab, meta):
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    clashes = [key for key in RESERVED_META_KEYS if key in meta]
    if clashes:
        raise ValueError(f"meta must not contain {', '.join(clashes)}: save() writes them")
    if vocab.size != model.config.vocab_size:
        raise ValueError(f"vocabulary has {vocab.size} characters but the model "
                         f"expects {model.config.vocab_size}")
    document = {"config": model.config.to_dict(), "vocab": vocab.to_json(), **meta}
    try:
        # allow_nan=False: "NaN" is not JSON, and load() rejects it.
        text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"meta is not strict JSON: {error}") from None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "charlm": text}


def _write_atomically(path, data):
    """Temp file in the same directory -> write -> fsync -> rename over path -> fsync dir."""
    _remove_abandoned_temp_files(path)
    try:
        fd, temp_path = _create_temp_file(path)
    except OSError as error:
        raise _save_error(path, error) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.replace(temp_path, path)
        finally:
            os.close(fd)    # only now: the lock must cover the temp file until it is renamed
    except BaseException as error:   # also KeyboardInterrupt: never leave the temp file
        with contextlib.suppress(OSError):
            os.remove(temp_path)
        if isinstance(error, OSError):
            raise _save_error(path, error) from None
        raise
    _sync_directory(path)


def _create_temp_file(path):
    """A new, exclusively created and locked file next to ``path``.

    Not tempfile.mkstemp: that creates mode 0600, and the model file should
    get the usual permissions (0666 less the umask) like any other file.
    """
    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp_path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temp_path, flags, 0o666)
        if _lock_for_writing(fd):
            return fd, temp_path
        os.close(fd)


def _lock_for_writing(fd):
    """Take the writer's lock on a new temp file; False if another save's
    cleanup deleted the file in the instant between its creation and the lock."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:    # the filesystem has no locks: then no cleanup can take it either
        return True
    return os.fstat(fd).st_nlink > 0


def _remove_abandoned_temp_files(path):
    """Delete the temp files that earlier saves to ``path`` never renamed
    because their process died; leave those of saves still running."""
    if fcntl is None:
        return
    directory, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")
    try:
        entries = os.listdir(directory)
    except OSError:
        return    # the save itself will report the unusable directory
    for entry in entries:
        if pattern.fullmatch(entry):
            _remove_if_abandoned(os.path.join(directory, entry))


def _remove_if_abandoned(temp_path):
    try:
        fd = os.open(temp_path, os.O_RDONLY)
    except OSError:
        return
    try:
        # Succeeds only if no live process holds the writer's lock.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.remove(temp_path)
    except OSError:    # BlockingIOError: a save in progress owns it
        pass
    finally:
        os.close(fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:   # os.write may write less than asked
        written = os.write(fd, view)
        view = view[written:]


def _sync_directory(path):
    """Make the rename itself durable (POSIX: it lives in the directory's entries)."""
    if os.name != "posix":
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.ENOTSUP):   # the filesystem cannot; nothing to do
            return
        raise DataError(f"{path}: saved, but syncing its directory failed: "
                        f"{error.strerror or error}") from None


def _save_error(path, error):
    return DataError(f"{path}: cannot save the model: {error.strerror or error}")


# --- loading ----------------------------------------------------------------------

def load(path):
    """Read and validate a model file; returns a LoadedFile.

    Raises ModelFileError, with a one-line message naming the path and the
    problem, for a missing, unreadable, corrupt or non-charlm file.
    """
    path = os.fspath(path)
    _check_header_length(path)
    try:
        with safe_open(path, framework="numpy") as reader:
            return _read(path, reader)
    except (SafetensorError, OSError) as error:
        raise _file_error(path, f"not a valid safetensors file: {_quoted_message(error)}") from None


def _check_header_length(path):
    """The 8-byte little-endian header length must be sane and fit in the file.

    Checked here, before the safetensors library sees the file, so that no
    length a stranger writes there can make anything allocate or read it.
    Pickles, zips and text files fail here, with a hint of what they are.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            start = file.read(8)
    except OSError as error:
        raise _file_error(path, f"cannot read: {error.strerror or error}") from None
    if len(start) < 8:
        raise _file_error(path, f"not a charlm model file: only {size} bytes long")
    header_length = int.from_bytes(start, "little")
    if header_length > MAX_HEADER_BYTES or 8 + header_length > size:
        raise _file_error(path, f"not a charlm model file{_what_it_looks_like(start)}: "
                                f"safetensors header length {header_length} is larger than "
                                f"{'the limit' if header_length > MAX_HEADER_BYTES else 'the file'}")


def _what_it_looks_like(start):
    if start.startswith(b"PK\x03\x04"):
        return " (it is a zip archive, such as a PyTorch .pt file)"
    if start[:1] == b"\x80" and 2 <= start[1] <= 5:
        return " (it is a Python pickle, which charlm never loads)"
    return ""


def _read(path, reader):
    config, vocab, meta = _parse_metadata(path, reader.metadata())
    groups = _group_names(path, reader.keys())
    _check_model_tensors(path, reader, config, groups.pop(MODEL_PREFIX, {}))
    # copied onto cache lines, as every array the kernels stream (K.aligned_copy)
    params = {name: K.aligned_copy(_read_tensor(path, reader, full_name))
              for name, full_name in _model_names(config).items()}
    extra = {prefix: {name: _read_tensor(path, reader, full_name)
                      for name, full_name in names.items()}
             for prefix, names in groups.items()}
    return LoadedFile(Model(config, params), vocab, meta, extra)


def _parse_metadata(path, metadata):
    """(Config, Vocabulary, the rest of the JSON object) from the safetensors metadata."""
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise _file_error(path, "not a charlm model file: the safetensors metadata has no "
                                f"format {FORMAT!r}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise _file_error(path, f"unsupported format version {_quoted(version)} "
                                f"(this charlm reads version {FORMAT_VERSION})")
    document = _parse_json(path, metadata.get("charlm"))
    try:
        config = Config.from_dict(document.get("config"))
    except (UsageError, TypeError) as error:   # TypeError: a required key is missing
        raise _file_error(path, f"invalid model config: {_quoted_message(error)}") from None
    try:
        vocab = Vocabulary.from_json(document.get("vocab"))
    except DataError as error:
        raise _file_error(path, f"invalid vocabulary: {_quoted_message(error)}") from None
    if vocab.size != config.vocab_size:
        raise _file_error(path, f"vocabulary has {vocab.size} characters but the config "
                                f"says vocab_size {config.vocab_size}")
    meta = {key: value for key, value in document.items() if key not in RESERVED_META_KEYS}
    return config, vocab, meta


def _parse_json(path, text):
    if text is None:
        raise _file_error(path, "the metadata has no 'charlm' JSON entry")
    try:
        document = json.loads(text, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as error:
        raise _file_error(path, f"invalid JSON in the 'charlm' metadata: "
                                f"{_quoted_message(error)}") from None
    if not isinstance(document, dict):
        raise _file_error(path, "the 'charlm' metadata must be a JSON object, "
                                f"got {type(document).__name__}")
    return document


def _reject_json_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _group_names(path, names):
    """{prefix: {name: "prefix/name"}} for every tensor in the file."""
    groups = {}
    for full_name in names:
        prefix, slash, name = full_name.partition("/")
        if not (prefix and slash and name):
            raise _file_error(path, f"tensor {_quoted(full_name)} is not named <prefix>/<name>")
        groups.setdefault(prefix, {})[name] = full_name
    return groups


def _model_names(config):
    return {name: f"{MODEL_PREFIX}/{name}" for name in parameter_shapes(config)}


def _check_model_tensors(path, reader, config, present):
    """Names, dtypes and shapes of the model tensors, from the header alone."""
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(present))
    if missing:
        raise _file_error(path, f"missing model tensor(s): {_listed(missing)}")
    unexpected = sorted(set(present) - set(expected))
    if unexpected:
        raise _file_error(path, f"unexpected model tensor(s) for a {config.layers}-layer "
                                f"{config.cell}: {_listed(unexpected)}")
    for name, shape in expected.items():
        tensor = reader.get_slice(present[name])
        dtype, found_shape = tensor.get_dtype(), tuple(tensor.get_shape())
        if dtype != _MODEL_DTYPE_CODES[config.dtype]:
            raise _file_error(path, f"{present[name]} has dtype {_dtype_name(dtype)}, "
                                    f"expected {config.dtype}")
        if found_shape != shape:
            raise _file_error(path, f"{present[name]} has shape {found_shape}, expected {shape}")


def _read_tensor(path, reader, full_name):
    """A writable, C-contiguous, finite (for floats) array."""
    dtype = reader.get_slice(full_name).get_dtype()
    if dtype not in TENSOR_DTYPES:
        raise _file_error(path, f"tensor {_quoted(full_name)} has unsupported dtype "
                                f"{_dtype_name(dtype)}")
    # get_tensor returns a fresh copy out of the file; require() copies again only if needed.
    array = np.require(reader.get_tensor(full_name), TENSOR_DTYPES[dtype],
                       requirements=["C", "A", "W"])
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _file_error(path, f"tensor {_quoted(full_name)} contains NaN or infinite values")
    return array


def _dtype_name(code):
    known = TENSOR_DTYPES.get(code)
    return _quoted(code) if known is None else f"{code} ({np.dtype(known).name})"


def _file_error(path, problem):
    return ModelFileError(f"{path}: {problem}")


def _quoted(value):
    """repr() of untrusted text, kept short (and, being a repr, on one line)."""
    shortener = reprlib.Repr()
    shortener.maxstring = _MAX_QUOTED
    return shortener.repr(value)


def _quoted_message(error):
    """An exception's message, one line and short, whoever wrote it."""
    text = " ".join(str(error).split())
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def _listed(names):
    shown = ", ".join(_quoted(name) for name in names[:_MAX_LISTED_NAMES])
    more = f" and {len(names) - _MAX_LISTED_NAMES} more" if len(names) > _MAX_LISTED_NAMES else ""
    return shown + more
