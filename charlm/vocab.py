"""The character vocabulary: which Unicode code points a model knows, and their ids.

A vocabulary is the set of code points seen in the training text, in ascending
order; a character's id is its position in that order. Keeping the code points
sorted makes the order reproducible from the text alone and lets encoding be a
single vectorised binary search (``np.searchsorted``) instead of a Python loop
per character.

Text is moved to and from code points through UTF-32 with "surrogatepass", so
lone surrogates (what Python's "surrogateescape" error handler makes of
undecodable bytes) are ordinary code points here and round-trip unchanged.
"""

import reprlib

import numpy as np

from .errors import DataError, UsageError

MAX_CODEPOINT = 0x10FFFF
UNKNOWN_MODES = ("error", "skip")

# UTF-32 in little-endian order is exactly a uint32 array of code points.
_UTF32 = "utf-32-le"
_UTF32_DTYPE = np.dtype("<u4")
_ID_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
# How many unknown characters an error message spells out before "...".
_MAX_LISTED = 10


def codepoints_of(text):
    """The code points of ``text`` as a uint32 array (lone surrogates included)."""
    return np.frombuffer(text.encode(_UTF32, "surrogatepass"), dtype=_UTF32_DTYPE)


def text_of(codepoints):
    """The str whose code points are ``codepoints`` (inverse of codepoints_of)."""
    data = np.ascontiguousarray(codepoints, dtype=_UTF32_DTYPE).tobytes()
    return data.decode(_UTF32, "surrogatepass")


class Vocabulary:
    """The sorted code points a model knows; id i is the i-th smallest.

    >>> v = Vocabulary.from_text("hello")
    >>> v.chars
    ['e', 'h', 'l', 'o']
    >>> v.decode(v.encode("hole"))
    'hole'
    """

    def __init__(self, codepoints):
        """Build from a non-empty, strictly increasing sequence of code points.

        Raises DataError for anything else, because vocabularies also come from
        model files written by strangers.
        """
        self._codepoints = _validated_codepoints(codepoints)
        self._codepoints.flags.writeable = False
        self._chars = tuple(text_of(self._codepoints))
        self._id_dtype = _smallest_id_dtype(len(self._codepoints))

    @classmethod
    def from_text(cls, text):
        """The vocabulary of the distinct characters in ``text``."""
        if not text:
            raise DataError("cannot build a vocabulary from empty text")
        return cls(np.unique(codepoints_of(text)))

    @classmethod
    def from_json(cls, obj):
        """Inverse of to_json: a JSON list of code points, validated."""
        if not isinstance(obj, list):
            raise DataError(
                f"vocabulary must be a list of code points, got {type(obj).__name__}")
        return cls(obj)

    def to_json(self):
        """The code points as a list of Python ints (JSON-serialisable)."""
        return self._codepoints.tolist()

    @property
    def size(self):
        return len(self._codepoints)

    def __len__(self):
        return len(self._codepoints)

    @property
    def chars(self):
        """The characters in id order, as a list of one-character strings."""
        return list(self._chars)

    @property
    def codepoints(self):
        """The code points in id order (read-only np.uint32 array)."""
        return self._codepoints

    @property
    def id_dtype(self):
        """The smallest unsigned numpy dtype (uint8/16/32) holding every id."""
        return self._id_dtype

    def __eq__(self, other):
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return np.array_equal(self._codepoints, other._codepoints)

    __hash__ = None  # mutable-looking value type: equal by content, not hashable

    def __repr__(self):
        shown = "".join(self._chars[:20])
        more = "..." if self.size > 20 else ""
        return f"Vocabulary(size={self.size}, chars={shown!r}{more})"

    def encode(self, text, unknown="error"):
        """The ids of ``text`` (array of id_dtype).

        unknown="error" raises DataError naming characters not in the
        vocabulary; unknown="skip" drops them.
        """
        ids, _ = self.encode_with_count(text, unknown)
        return ids

    def encode_with_count(self, text, unknown="error"):
        """Like encode, also returning how many characters were skipped."""
        return self.encode_codepoints(codepoints_of(text), unknown)

    def encode_codepoints(self, codepoints, unknown="error"):
        """Encode an array of code points; returns (ids, n_skipped).

        The text-free form of encode_with_count, for callers (the corpus
        reader) that already hold code points.
        """
        if unknown not in UNKNOWN_MODES:
            raise UsageError(
                f"unknown={unknown!r} is not one of {', '.join(UNKNOWN_MODES)}")
        positions, known = self._lookup(codepoints)
        if known.all():
            return positions.astype(self._id_dtype), 0
        if unknown == "error":
            raise DataError(_unknown_message(codepoints[~known]))
        return positions[known].astype(self._id_dtype), int(np.count_nonzero(~known))

    def unknown_chars(self, text):
        """The distinct characters of ``text`` not in the vocabulary, sorted."""
        codepoints = codepoints_of(text)
        _, known = self._lookup(codepoints)
        return list(text_of(np.unique(codepoints[~known])))

    def decode(self, ids):
        """The text for a 1-D sequence of ids."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.ndim > 1 or ids.dtype.kind not in "iu":
            raise DataError(f"ids to decode must be a 1-D sequence of ints, got {ids.dtype} "
                            f"array of shape {ids.shape}")
        ids = ids.reshape(-1)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.size:
            bad = low if low < 0 else high
            raise DataError(f"id {bad} is out of range for a vocabulary of {self.size} characters")
        return text_of(self._codepoints[ids])

    def _lookup(self, codepoints):
        """Each code point's would-be id, and whether it is really in the vocabulary."""
        positions = np.searchsorted(self._codepoints, codepoints)
        # Code points above the largest known one land one past the end;
        # clamp them so the membership test below can index safely.
        np.minimum(positions, self.size - 1, out=positions)
        known = self._codepoints[positions] == codepoints
        return positions, known


def _smallest_id_dtype(size):
    for dtype in _ID_DTYPES:
        if size - 1 <= np.iinfo(dtype).max:
            return dtype
    raise DataError(f"vocabulary of {size} characters is too large")  # unreachable: <= 0x110000


def _validated_codepoints(codepoints):
    """A uint32 copy of ``codepoints`` after checking it is a valid vocabulary."""
    if isinstance(codepoints, np.ndarray):
        values = _validated_array(codepoints)
    else:
        values = _validated_sequence(codepoints)
    if len(values) == 0:
        raise DataError("vocabulary is empty")
    steps = np.diff(values)
    if np.any(steps <= 0):
        position = int(np.argmax(steps <= 0)) + 1
        raise DataError(
            f"vocabulary code points must be strictly increasing (sorted, no duplicates); "
            f"entry {position} ({int(values[position])}) follows {int(values[position - 1])}")
    return values.astype(np.uint32)


def _validated_array(array):
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise DataError(f"vocabulary must be a 1-D array of integer code points, got "
                        f"{array.dtype} array of shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > MAX_CODEPOINT):
        raise DataError(f"vocabulary code points must be in 0..{MAX_CODEPOINT:#x}")
    return array.astype(np.int64)


def _validated_sequence(codepoints):
    if isinstance(codepoints, (str, bytes, dict)):
        raise DataError(
            f"vocabulary must be a sequence of code points, got {type(codepoints).__name__}")
    try:
        items = list(codepoints)
    except TypeError:
        raise DataError(f"vocabulary must be a sequence of code points, got "
                        f"{type(codepoints).__name__}") from None
    for position, value in enumerate(items):
        # bool is an int subclass, but True is no code point a writer meant.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise DataError(f"vocabulary entry {position} must be an int code point, "
                            f"got {type(value).__name__} {reprlib.repr(value)}")
        if not 0 <= value <= MAX_CODEPOINT:
            # Not the value itself: str() of a huge int can fail or flood the line.
            shown = value if -2**63 <= value < 2**64 else "a huge number"
            raise DataError(f"vocabulary entry {position} ({shown}) is not a code point "
                            f"in 0..{MAX_CODEPOINT:#x}")
    return np.array(items, dtype=np.int64)


def _unknown_message(missing_codepoints):
    distinct = np.unique(missing_codepoints)
    listed = ", ".join(repr(chr(c)) for c in distinct[:_MAX_LISTED].tolist())
    more = ", ..." if len(distinct) > _MAX_LISTED else ""
    return (f"text contains {len(distinct)} distinct character(s) not in the vocabulary: "
            f"{listed}{more}")
