"""The training corpus on disk, and the batches a trainer reads from it.

prepare_corpus turns a text file into two compact id files (training and
validation) plus a Vocabulary, reading the text in fixed-size blocks so that a
corpus larger than RAM needs only bounded memory. It makes three passes over
the file: count the characters (to place the split), collect the training
vocabulary, then encode and write the ids.

BatchStream serves char-rnn style (T, B) chunks from those ids, one chunk
copied out of the memory map per step, with a position that can be saved and
restored so a resumed run continues at exactly the next chunk.

Resident memory stays independent of the corpus size. Pages of a mapped file
that a process has touched count in its resident set until it unmaps them,
and a fault may map a whole 2 MB folio; B streams spread over the file would
soon have all of it resident. So BatchStream, given the id file's path, reads
each chunk's B windows with pread (into the page cache, not the process), and
the evaluator, which reads the validation ids in order, calls release_pages
every ~1M ids to unmap what it has read (MADV_DONTNEED; the pages stay cached).
"""

import codecs
import contextlib
import hashlib
import math
import mmap
import numbers
import os
import reprlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .errors import DataError, UsageError
from .vocab import MAX_CODEPOINT, Vocabulary, codepoints_of

# Bytes read and decoded at a time. A module constant so tests can shrink it
# and exercise characters cut across block boundaries.
BLOCK_BYTES = 4 * 1024 * 1024
MAX_VAL_FRAC = 0.5
MIN_TRAIN_CHARS = 2  # one input and its next-character target
TRAIN_FILE = "train.ids"
VAL_FILE = "val.ids"
# Changes whenever what the fingerprint covers changes, so old ones never match.
_FINGERPRINT_VERSION = b"charlm-corpus-v1"


@dataclass(frozen=True, eq=False)
class Corpus:
    """A prepared corpus: its vocabulary and its ids, memory-mapped read-only.

    n_train and n_val count characters of the text on each side of the split;
    val_ids holds n_val - val_skipped ids, because validation characters the
    training text never shows are dropped.
    """

    path: str
    workdir: str
    encoding: str
    errors: str
    val_frac: float
    vocab: Vocabulary
    n_chars: int
    n_train: int
    n_val: int
    val_skipped: int
    train_ids: np.ndarray
    val_ids: np.ndarray
    fingerprint: str

    @property
    def train_path(self):
        """The training id file, for BatchStream's pread."""
        return os.path.join(self.workdir, TRAIN_FILE)


def prepare_corpus(path, workdir, encoding="utf-8", errors="strict", val_frac=0.1):
    """Read the text file at ``path`` into id files in ``workdir``; return a Corpus.

    The last ceil(n_chars * val_frac) characters are the validation part, the
    rest the training part; the vocabulary is the training part's characters.
    val_frac is taken as written: 0.1 holds out exactly a tenth (rounded up).
    Bad input raises DataError (or UsageError for a bad option), naming the file.
    """
    path = os.fspath(path)
    workdir = os.fspath(workdir)
    _check_codec(path, encoding, errors)
    fraction = _validation_fraction(path, val_frac)

    n_chars = _count_chars(path, encoding, errors)
    n_val = math.ceil(n_chars * fraction)
    n_train = n_chars - n_val
    if n_train < MIN_TRAIN_CHARS:
        raise DataError(
            f"{path}: too short: {n_chars} characters, {n_train} left for training after "
            f"holding out {n_val} for validation; need at least {MIN_TRAIN_CHARS}")

    vocab = _training_vocabulary(path, encoding, errors, n_train)
    written = _write_ids(path, workdir, encoding, errors, vocab, n_train, n_chars)
    return Corpus(
        path=path, workdir=workdir, encoding=encoding, errors=errors,
        val_frac=float(val_frac), vocab=vocab, n_chars=n_chars, n_train=n_train,
        n_val=n_val, val_skipped=written.val_skipped,
        train_ids=_open_ids(written.train_path, vocab.id_dtype, n_train),
        val_ids=_open_ids(written.val_path, vocab.id_dtype, n_val - written.val_skipped),
        fingerprint=written.fingerprint)


def read_text(path, encoding="utf-8", errors="strict"):
    """Yield the decoded text of the file at ``path`` piece by piece (bounded
    memory), with the same checks and one-line errors as prepare_corpus."""
    path = os.fspath(path)
    _check_codec(path, encoding, errors)
    yield from _iter_text(path, encoding, errors)


# --- options -----------------------------------------------------------------

def _check_codec(path, encoding, errors):
    """UsageError unless ``encoding`` decodes bytes to str with the ``errors`` policy."""
    try:
        codec_name = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise UsageError(f"{path}: unknown encoding {encoding!r}") from None
    if codec_name in _WHOLE_INPUT_CODECS:
        raise UsageError(f"{path}: {encoding!r} cannot be decoded piece by piece, "
                         f"so charlm cannot read it")
    try:
        handler = codecs.lookup_error(errors)
    except (LookupError, TypeError):
        raise UsageError(f"{path}: unknown --errors handler {errors!r}; use {_DECODE_HANDLERS}") \
            from None
    if not _handles_decoding(handler):
        raise UsageError(f"{path}: --errors {errors!r} only works for encoding, not for "
                         f"reading text; use {_DECODE_HANDLERS}")
    if not _decodes_to_text(encoding, errors):
        if errors != "strict" and _decodes_to_text(encoding, "strict"):
            raise UsageError(f"{path}: the {encoding!r} codec only takes --errors strict")
        raise UsageError(f"{path}: {encoding!r} is not a text encoding")


def _decodes_to_text(encoding, errors):
    """Whether an incremental decoder for ``encoding`` turns bytes into str.

    Some codecs (base64, zlib, rot13...) are not text encodings: they turn
    bytes into bytes, or refuse bytes; some (idna, zlib) refuse any errors
    policy but strict, each in its own way (even an AssertionError). Any
    failure of this probe means one of those.
    """
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors)
        return isinstance(decoder.decode(b"", final=True), str)
    except Exception:
        return False


_DECODE_HANDLERS = "strict, replace, ignore, backslashreplace or surrogateescape"
# Codecs whose "incremental" decoders go wrong when the input is cut: punycode
# decodes each piece on its own, unicode-escape ends an octal escape at the
# cut. Reading a file block by block with them would corrupt the text.
_WHOLE_INPUT_CODECS = {"punycode", "unicode-escape"}


def _handles_decoding(handler):
    """Whether an error handler can be given an undecodable byte.

    Some handlers (xmlcharrefreplace, namereplace) exist only for encoding and
    raise TypeError when a decoder calls them, which would surface only when a
    bad byte is met, deep into reading a corpus. So they are tried here, on a
    made-up error, before any reading.
    """
    probe = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "probe")
    try:
        handler(probe)
    except UnicodeDecodeError:   # strict, or a handler that passes on this byte: fine
        return True
    except Exception:
        return False
    return True


def _validation_fraction(path, val_frac):
    """val_frac as an exact Fraction of what was written (0.1 -> 1/10)."""
    if isinstance(val_frac, bool) or not isinstance(val_frac, numbers.Real):
        raise UsageError(f"{path}: val_frac must be a number, got {val_frac!r}")
    if not 0 <= val_frac <= MAX_VAL_FRAC:  # also rejects NaN
        raise UsageError(f"{path}: val_frac must be between 0 and {MAX_VAL_FRAC}, "
                         f"got {val_frac!r}")
    # Fraction(0.1) is the binary float just above a tenth, which would make
    # ceil(30 * 0.1) == 4. repr gives the shortest decimal, i.e. what was meant.
    return Fraction(repr(float(val_frac)))


# --- reading -----------------------------------------------------------------

def _read_blocks(path):
    """Yield the file's bytes in BLOCK_BYTES pieces; OS errors become DataError."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied (cannot read the file)") from None
    except OSError as error:
        raise DataError(f"{path}: cannot open: {error.strerror or error}") from None
    with file:
        while True:
            try:
                block = file.read(BLOCK_BYTES)
            except OSError as error:
                raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
            if not block:
                return
            yield block


def _iter_text(path, encoding, errors):
    """Yield the decoded text of the file, piece by piece."""
    decoder = codecs.getincrementaldecoder(encoding)(errors)
    offset = 0
    for block in _read_blocks(path):
        if offset == 0:
            _reject_binary(path, block, encoding)
        yield _decode(decoder, block, offset, path, encoding, final=False)
        offset += len(block)
    if offset == 0:
        raise DataError(f"{path}: file is empty")
    yield _decode(decoder, b"", offset, path, encoding, final=True)


def _iter_codepoints(path, encoding, errors):
    """Yield the file's text as uint32 arrays of code points, piece by piece."""
    for text in _iter_text(path, encoding, errors):
        yield codepoints_of(text)


def _decode(decoder, block, offset, path, encoding, final):
    """Decode one block, turning a decoding failure into a DataError with its byte offset."""
    try:
        return decoder.decode(block, final=final)
    except UnicodeDecodeError as error:
        raise DataError(_undecodable_message(error, offset + len(block), path, encoding)) from None
    except MemoryError:
        raise
    except Exception as error:   # codecs such as idna report bad input in their own ways
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise DataError(f"{path}: cannot decode as {encoding}: {reason}; "
                        f"pass the right --encoding") from None


def _undecodable_message(error, bytes_given, path, encoding):
    # The decoder sees its leftover bytes from earlier blocks plus this block,
    # so the bytes it complains about end exactly where the input so far ends.
    where = ""
    if isinstance(error.object, (bytes, bytearray)):
        start = bytes_given - len(error.object) + error.start
        bad = bytes(error.object[error.start:error.end][:8])
        where = f" at byte offset {start} (bytes {bad.hex(' ')})"
    return (f"{path}: cannot decode as {encoding}{where}: {error.reason}; "
            f"pass the right --encoding, or --errors replace to substitute bad bytes")


def _reject_binary(path, first_block, encoding):
    """DataError if the start of the file holds NUL bytes where text would not."""
    if b"\0" in first_block and _nul_byte_is_nul_char(encoding):
        raise DataError(f"{path}: contains NUL bytes, so it looks like a binary file, "
                        f"not a text file (if it is UTF-16/UTF-32 text, pass --encoding)")


def _nul_byte_is_nul_char(encoding):
    """Whether a lone 0 byte is the character U+0000 in this encoding.

    True for ASCII-compatible encodings, where NUL bytes betray binary data;
    false for UTF-16/UTF-32, whose ordinary text is full of zero bytes.
    """
    try:
        return codecs.decode(b"\0", encoding) == "\0"
    except Exception:  # incomplete input for multi-byte code units
        return False


# --- the three passes ------------------------------------------------------

def _count_chars(path, encoding, errors):
    """Pass 1: the number of characters in the file (also validates the decoding)."""
    return sum(len(text) for text in _iter_text(path, encoding, errors))


def _training_vocabulary(path, encoding, errors, n_train):
    """Pass 2: the vocabulary of the first n_train characters."""
    # One flag per possible code point (1.1 MB) is simpler and faster than
    # merging np.unique results, and bounded no matter how big the corpus is.
    seen = np.zeros(MAX_CODEPOINT + 1, dtype=bool)
    position = 0
    with contextlib.closing(_iter_codepoints(path, encoding, errors)) as pieces:
        for codepoints in pieces:
            seen[codepoints[:max(0, n_train - position)]] = True
            position += len(codepoints)
            if position >= n_train:
                break  # the validation part does not contribute
    return Vocabulary(np.flatnonzero(seen))


@dataclass(frozen=True)
class _Written:
    train_path: str
    val_path: str
    val_skipped: int
    fingerprint: str


def _write_ids(path, workdir, encoding, errors, vocab, n_train, n_chars):
    """Pass 3: encode the text into workdir's train and val id files."""
    _make_workdir(workdir)
    train_path = os.path.join(workdir, TRAIN_FILE)
    val_path = os.path.join(workdir, VAL_FILE)
    fingerprint = _Fingerprint(vocab)
    position = 0
    val_skipped = 0
    with _AtomicFile(train_path) as train_out, _AtomicFile(val_path) as val_out:
        for codepoints in _iter_codepoints(path, encoding, errors):
            split = min(max(0, n_train - position), len(codepoints))
            train_ids, train_skipped = vocab.encode_codepoints(codepoints[:split], "skip")
            val_ids, skipped = vocab.encode_codepoints(codepoints[split:], "skip")
            if train_skipped:
                _changed_while_reading(path)
            val_skipped += skipped
            train_out.write(train_ids)
            val_out.write(val_ids)
            fingerprint.add(codepoints)
            position += len(codepoints)
        if position != n_chars:  # inside the with: the half-made files are discarded
            _changed_while_reading(path)
    return _Written(train_path, val_path, val_skipped, fingerprint.hexdigest(n_train))


def _changed_while_reading(path):
    raise DataError(f"{path}: the file changed while it was being read; try again")


def _make_workdir(workdir):
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise DataError(f"{workdir}: cannot create the work directory: "
                        f"{error.strerror or error}") from None


class _AtomicFile:
    """Write ids to path + ".tmp", renamed over ``path`` only when complete.

    A run killed mid-write thus never leaves a truncated id file that looks
    like a finished one.
    """

    def __init__(self, path):
        self.path = path
        self._temp_path = path + ".tmp"
        self._file = None

    def __enter__(self):
        try:
            self._file = open(self._temp_path, "wb")
        except OSError as error:
            raise DataError(f"{self._temp_path}: cannot write: {error.strerror or error}") from None
        return self

    def write(self, ids):
        try:
            self._file.write(ids.tobytes())
        except OSError as error:
            raise DataError(f"{self._temp_path}: cannot write: {error.strerror or error}") from None

    def __exit__(self, exc_type, exc, traceback):
        self._file.close()
        if exc_type is not None:
            with contextlib.suppress(OSError):
                os.remove(self._temp_path)
            return False
        try:
            os.replace(self._temp_path, self.path)
        except OSError as error:
            raise DataError(f"{self.path}: cannot write: {error.strerror or error}") from None
        return False


class _Fingerprint:
    """sha256 of the decoded text, where it is split, and the vocabulary.

    Fed the code points as pass 3 decodes them, so it costs no extra pass. It
    changes with any edit to the text (even to validation characters that are
    skipped), with the split, and with a decoding that reads the bytes
    differently, but not with the file's name or location.
    """

    def __init__(self, vocab):
        self._text_hash = hashlib.sha256()
        self._vocab = vocab

    def add(self, codepoints):
        self._text_hash.update(codepoints.astype("<u4", copy=False).tobytes())

    def hexdigest(self, n_train):
        summary = hashlib.sha256(_FINGERPRINT_VERSION)
        summary.update(self._vocab.codepoints.astype("<u4").tobytes())
        summary.update(self._text_hash.digest())
        summary.update(f"n_train={n_train}".encode())
        return summary.hexdigest()


def _open_ids(path, dtype, length):
    """The id file as a read-only array over a memory map (an empty file
    cannot be mapped: it gets an empty array)."""
    dtype = np.dtype(dtype)
    if length == 0:
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    try:
        with open(path, "rb") as f:
            _check_id_file_size(f.fileno(), path, dtype, length)
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise DataError(f"{path}: cannot map the id file: {error}") from None
    mapping.madvise(mmap.MADV_RANDOM)       # no read-ahead: see the module docstring
    return np.frombuffer(mapping, dtype=dtype, count=length)


def _check_id_file_size(fd, path, dtype, length):
    """DataError unless the open id file holds exactly `length` ids: what is
    read from it must never run past its end."""
    if os.fstat(fd).st_size != length * dtype.itemsize:
        raise DataError(f"{path}: the id file does not hold {length} ids; "
                        f"delete it to have it prepared again")


def release_pages(ids):
    """Drop the pages of the memory map under `ids` (any view of an array
    from a Corpus) from this process's resident set; a no-op for ordinary
    arrays. They stay in the page cache, and reading them again is cheap."""
    base = ids
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is not None and not base.closed:
        base.madvise(mmap.MADV_DONTNEED)


# --- batches -------------------------------------------------------------------

class BatchStream:
    """char-rnn style training chunks over a 1-D array of ids.

    The ids are cut into batch_size contiguous streams of L = len(ids) //
    batch_size ids each (the remainder is unused); column b of every chunk
    follows stream b, so a hidden state carried from one chunk to the next
    keeps reading the same text. Chunk k of an epoch has
    x[t, b] = stream_b[k*T + t] and y[t, b] = stream_b[k*T + t + 1].
    """

    def __init__(self, ids, batch_size, seq_length, path=None):
        """ids: a 1-D integer array. path: the file that `ids` maps (a
        Corpus's train_path), read with pread instead of through the map."""
        _require_positive_int("batch_size", batch_size)
        _require_positive_int("seq_length", seq_length)
        ids = np.asarray(ids)  # a memmap stays a view on the file, not a copy
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise UsageError(f"ids must be a 1-D integer array, got {ids.dtype} "
                             f"array of shape {ids.shape}")
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.n_ids = len(ids)
        stream_length = len(ids) // batch_size
        self._chunks_per_epoch = max(0, stream_length - 1) // seq_length
        if self._chunks_per_epoch == 0:
            raise DataError(
                f"the training text ({len(ids)} characters) is shorter than one batch: "
                f"batch_size {batch_size} x (seq_length {seq_length} + 1) needs at least "
                f"{batch_size * (seq_length + 1)}; lower the batch size or the sequence length")
        # Row b is stream b: a reshaped view, so nothing is read until sliced.
        self._streams = ids[:batch_size * stream_length].reshape(batch_size, stream_length)
        self.epoch = 0
        self.chunk = 0
        self._stream_length = stream_length
        self._file = None if path is None else _IdReader(path, ids.dtype, len(ids))

    @property
    def chunks_per_epoch(self):
        return self._chunks_per_epoch

    @property
    def chars_per_chunk(self):
        """Characters predicted per chunk: seq_length * batch_size."""
        return self.seq_length * self.batch_size

    def next_chunk(self):
        """Return (x, y, starts_epoch) and advance; wraps to the next epoch.

        x and y are C-contiguous int32 arrays of shape (seq_length, batch_size);
        starts_epoch is True for each epoch's first chunk, when the trainer
        should reset its carried hidden state.
        """
        start = self.chunk * self.seq_length
        # Inputs and targets overlap but for one step: read T + 1 columns once.
        if self._file is None:
            window = np.asarray(self._streams[:, start:start + self.seq_length + 1],
                                dtype=np.int32)
        else:
            window = self._file.windows(start, self._stream_length, self.batch_size,
                                        self.seq_length + 1)
        x = np.ascontiguousarray(window[:, :-1].T)
        y = np.ascontiguousarray(window[:, 1:].T)
        starts_epoch = self.chunk == 0
        self.chunk += 1
        if self.chunk == self._chunks_per_epoch:
            self.epoch += 1
            self.chunk = 0
        return x, y, starts_epoch

    def state(self):
        """The position (and the geometry it refers to) as a JSON-able dict."""
        return {"epoch": self.epoch, "chunk": self.chunk, "batch_size": self.batch_size,
                "seq_length": self.seq_length, "n_ids": self.n_ids}

    def set_state(self, state):
        """Continue from a position saved by state(); DataError if it does not fit.

        The geometry keys are optional, but when present they must match:
        a chunk index means nothing under another batch size or corpus.
        """
        if not isinstance(state, dict):
            raise DataError(f"batch stream state must be a dict, got {type(state).__name__}")
        unknown = set(state) - {"epoch", "chunk", "batch_size", "seq_length", "n_ids"}
        if unknown:
            raise DataError(f"batch stream state has unknown keys: {sorted(map(str, unknown))}")
        for key in ("batch_size", "seq_length", "n_ids"):
            if key in state:
                self._check_same_geometry(key, state[key])
        epoch = _state_int(state, "epoch", 0, None)
        chunk = _state_int(state, "chunk", 0, self._chunks_per_epoch - 1)
        self.epoch, self.chunk = epoch, chunk

    def _check_same_geometry(self, key, saved):
        expected = getattr(self, key)
        if isinstance(saved, bool) or not isinstance(saved, int) or saved != expected:
            raise DataError(f"batch stream state was saved with {key}={reprlib.repr(saved)}, "
                            f"but this run has {key}={expected}")


class _IdReader:
    """Reads windows of an id file with pread: nothing is mapped, so nothing
    stays in the process's resident set (see the module docstring)."""

    def __init__(self, path, dtype, length):
        self.dtype = np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY)
        try:
            _check_id_file_size(self.fd, path, self.dtype, length)
        except DataError:
            os.close(self.fd)
            raise

    def windows(self, start, stride, count, width):
        """ids[b*stride + start : ... + width] for b < count, as (count, width) int32."""
        size = self.dtype.itemsize
        out = np.empty((count, width), np.int32)
        for b in range(count):
            raw = os.pread(self.fd, width * size, (b * stride + start) * size)
            out[b] = np.frombuffer(raw, self.dtype)
        return out

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


def _require_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _state_int(state, key, low, high):
    if key not in state:
        raise DataError(f"batch stream state lacks {key!r}")
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"batch stream state {key!r} must be an int, got {reprlib.repr(value)}")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise DataError(f"batch stream state {key!r} = {value} is out of range ({bounds})")
    return value
