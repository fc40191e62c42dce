"""The corpus reader and the vocabulary, fuzzed: any bytes, any encoding, any
errors policy, any block size.

Each example either fails with a charlm UsageError or DataError whose message
is one line, or gives a corpus that agrees with a plain one-shot
decode: the same characters, the split where val_frac puts it, a
vocabulary that is exactly the training part's characters, and ids that
decode back to the text (validation characters outside the vocabulary
dropped and counted). Which of the two must happen is predicted from the
input, so a wrong error fails as surely as a wrong corpus. Bounded in time:
a few hundred examples, a few seconds.
"""

import codecs
import math
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlm import data
from charlm.data import prepare_corpus, read_text
from charlm.errors import DataError, UsageError
from charlm.vocab import MAX_CODEPOINT, Vocabulary, codepoints_of

TEXT_ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32-be", "latin-1", "ascii",
                  "cp1252", "shift_jis", "gb18030", "iso2022_jp", "utf-7", "idna",
                  "raw_unicode_escape"]
# Refused: not text codecs, no codec at all, or codecs that go wrong when their
# input is cut into pieces (punycode, unicode_escape).
NOT_TEXT = ["base64", "hex", "zlib", "rot13", "uu", "punycode", "unicode_escape",
            "no-such-codec", ""]
ERRORS = ["strict", "replace", "ignore", "backslashreplace", "surrogateescape", "surrogatepass",
          "xmlcharrefreplace", "namereplace", "no-such-handler"]
USABLE_ERRORS = {"strict", "replace", "ignore", "backslashreplace", "surrogateescape",
                 "surrogatepass"}
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Text that exercises multi-byte characters, surrogate-free astral planes and controls.
sample_text = st.text(st.characters(max_codepoint=0x1F64F, exclude_categories=["Cs"]),
                      max_size=60)


@st.composite
def corpus_bytes(draw, encoding):
    """Bytes that are sometimes valid in `encoding`, sometimes nearly, sometimes noise."""
    kind = draw(st.sampled_from(["noise", "text", "damaged text"]))
    if kind == "noise":
        return draw(st.binary(max_size=80))
    text = draw(sample_text)
    try:
        raw = text.encode(encoding, "replace")
    except (LookupError, UnicodeError, TypeError, ValueError):
        raw = text.encode("utf-8")
    if kind == "damaged text" and raw:
        position = draw(st.integers(0, len(raw) - 1))
        raw = raw[:position] + draw(st.binary(min_size=1, max_size=3)) + raw[position + 1:]
    return raw


def one_shot(raw, encoding, errors):
    """The reference: what the whole file decodes to in one call, or the
    exception that gives. (The incremental decoder, fed everything at once:
    codecs.decode differs from it in one way, reading BOM-less "utf-16" as
    native-order instead of refusing it.)"""
    try:
        return codecs.getincrementaldecoder(encoding)(errors).decode(raw, final=True)
    except Exception as error:   # noqa: BLE001 - any failure is the reference's answer
        return error


def expected_failure(raw, encoding, errors, block_bytes, val_frac=0.1):
    """The error class prepare_corpus/read_text must raise, or None.

    The options are checked first (UsageError), then the file (DataError).
    """
    if encoding not in TEXT_ENCODINGS or errors not in USABLE_ERRORS:
        return UsageError
    try:
        codecs.getincrementaldecoder(encoding)(errors).decode(b"", final=True)
    except Exception:   # noqa: BLE001 - e.g. idna accepts no error policy but strict
        return UsageError
    if not (math.isfinite(val_frac) and 0 <= val_frac <= data.MAX_VAL_FRAC):
        return UsageError
    if not raw:
        return DataError
    if b"\0" in raw[:block_bytes] and nul_byte_is_a_character(encoding):
        return DataError     # in the first block read: looks like a binary file
    if isinstance(one_shot(raw, encoding, errors), Exception):
        return DataError
    return None


def nul_byte_is_a_character(encoding):
    """True for ASCII-like encodings (where a 0 byte in text means binary data)."""
    try:
        return codecs.decode(b"\0", encoding) == "\0"
    except Exception:   # noqa: BLE001 - UTF-16/32: half a code unit
        return False


def assert_one_line(error, path):
    message = str(error)
    assert message and "\n" not in message and len(message) < 600
    if isinstance(error, DataError):
        assert message.startswith(str(path))


encodings = st.sampled_from(TEXT_ENCODINGS + NOT_TEXT)
errors_policies = st.sampled_from(ERRORS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-corpus")


@FUZZ
@given(data_=st.data(), encoding=encodings, errors=errors_policies,
       block_bytes=st.integers(1, 24))
def test_read_text_fails_cleanly_or_matches_a_one_shot_decode(workspace, data_, encoding,
                                                              errors, block_bytes):
    raw = data_.draw(corpus_bytes(encoding), label="bytes")
    path = workspace / "text.bin"
    path.write_bytes(raw)
    expected = expected_failure(raw, encoding, errors, block_bytes)
    with mock.patch.object(data, "BLOCK_BYTES", block_bytes):
        try:
            text = "".join(read_text(path, encoding, errors))
        except (UsageError, DataError) as error:
            assert type(error) is expected, (error, raw)
            assert_one_line(error, path)
            return
    assert expected is None, (expected, raw)
    # Decoding block by block gives what decoding all at once gives.
    assert text == one_shot(raw, encoding, errors)


val_fracs = st.one_of(st.sampled_from([0, 0.1, 0.25, 0.5, 1 / 3]),
                      st.floats(allow_nan=True, allow_infinity=True))


@FUZZ
@given(data_=st.data(), encoding=st.sampled_from(TEXT_ENCODINGS), errors=errors_policies,
       block_bytes=st.integers(1, 24), val_frac=val_fracs)
def test_prepared_corpus_fails_cleanly_or_is_consistent(workspace, data_, encoding, errors,
                                                        block_bytes, val_frac):
    raw = data_.draw(corpus_bytes(encoding), label="bytes")
    path = workspace / "corpus.bin"
    path.write_bytes(raw)
    expected = expected_failure(raw, encoding, errors, block_bytes, val_frac)
    text = None if expected else one_shot(raw, encoding, errors)
    if text is not None:
        n_val = math.ceil(len(text) * Fraction(repr(float(val_frac))))
        if len(text) - n_val < data.MIN_TRAIN_CHARS:
            expected = DataError
    with mock.patch.object(data, "BLOCK_BYTES", block_bytes):
        try:
            corpus = prepare_corpus(path, workspace / "work", encoding, errors, val_frac)
        except (UsageError, DataError) as error:
            assert type(error) is expected, (error, raw)
            assert_one_line(error, path)
            return
    assert expected is None, (expected, raw)
    assert (corpus.n_chars, corpus.n_val) == (len(text), n_val)
    train_text, val_text = text[:corpus.n_train], text[corpus.n_train:]
    assert corpus.vocab == Vocabulary(np.unique(codepoints_of(train_text)))
    assert corpus.vocab.decode(corpus.train_ids) == train_text
    known = [c for c in val_text if c in set(train_text)]
    assert corpus.vocab.decode(corpus.val_ids) == "".join(known)
    assert corpus.val_skipped == len(val_text) - len(known)


# --- the vocabulary --------------------------------------------------------------------

any_text = st.text(st.characters(min_codepoint=0, max_codepoint=MAX_CODEPOINT,
                                 exclude_categories=[]), min_size=1, max_size=80)


@FUZZ
@given(text=any_text, other=any_text)
def test_vocabulary_round_trips_any_text_and_refuses_what_it_lacks(text, other):
    vocab = Vocabulary.from_text(text)
    assert vocab.chars == sorted(set(text))
    assert vocab.decode(vocab.encode(text)) == text
    missing = sorted(set(other) - set(text))
    assert vocab.unknown_chars(other) == missing
    if missing:
        with pytest.raises(DataError) as caught:
            vocab.encode(other)
        assert "\n" not in str(caught.value)
    ids, skipped = vocab.encode_with_count(other, "skip")
    assert skipped == sum(c not in set(text) for c in other)
    assert vocab.decode(ids) == "".join(c for c in other if c in set(text))


vocab_entries = st.lists(st.one_of(st.integers(-5, MAX_CODEPOINT + 5), st.integers(),
                                   st.booleans(), st.floats(), st.text(max_size=2), st.none()),
                         max_size=12)


@FUZZ
@given(entries=vocab_entries)
def test_vocabulary_from_a_strangers_json_is_valid_or_a_data_error(entries):
    try:
        vocab = Vocabulary.from_json(entries)
    except DataError as error:
        assert "\n" not in str(error) and len(str(error)) < 300
        return
    assert entries and all(type(e) is int for e in entries)
    assert all(0 <= e <= MAX_CODEPOINT for e in entries)
    assert all(a < b for a, b in zip(entries, entries[1:]))
    assert vocab.to_json() == entries
    assert vocab.decode(np.arange(vocab.size)) == "".join(map(chr, entries))
