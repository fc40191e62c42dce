"""Tests for charlm.vocab: ordering, id dtypes, round trips, validation."""

import json

import numpy as np
import pytest

from charlm.errors import DataError, UsageError
from charlm.vocab import Vocabulary, codepoints_of, text_of

ROUND_TRIP_TEXTS = {
    "ascii": "Hello, world!\nThe quick brown fox.\t~",
    "accented": "café naïve Ünïcödé façade",
    "cjk": "日本語のテキスト、中文文本。",
    "emoji": "ok 😀👍🏽 family 👨‍👩‍👧",
    # What "surrogateescape" decoding makes of invalid UTF-8 bytes.
    "surrogateescape": b"caf\xe9 \xff\xfe ok".decode("utf-8", "surrogateescape"),
    "surrogate pair as two code points": "a\ud83d\ude00b",
}


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_encode_decode_round_trip(text):
    vocab = Vocabulary.from_text(text)
    ids = vocab.encode(text)
    assert ids.dtype == vocab.id_dtype
    assert len(ids) == len(text)
    assert vocab.decode(ids) == text


def test_surrogateescape_text_round_trips_to_the_original_bytes():
    raw = b"ok \x80\xff end"
    text = raw.decode("utf-8", "surrogateescape")
    vocab = Vocabulary.from_text(text)
    assert vocab.decode(vocab.encode(text)).encode("utf-8", "surrogateescape") == raw


def test_order_is_ascending_code_point():
    vocab = Vocabulary.from_text("banana😀é")
    assert vocab.chars == ["a", "b", "n", "é", "😀"]
    assert vocab.codepoints.dtype == np.uint32
    assert vocab.codepoints.tolist() == [ord(c) for c in vocab.chars]
    assert vocab.encode("nab").tolist() == [2, 0, 1]
    assert vocab.size == len(vocab) == 5


def test_codepoints_are_read_only():
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(ValueError):
        vocab.codepoints[0] = 7


@pytest.mark.parametrize("size, dtype", [
    (1, np.uint8), (256, np.uint8), (257, np.uint16),
    (65536, np.uint16), (65537, np.uint32),
])
def test_id_dtype_is_the_smallest_that_fits(size, dtype):
    vocab = Vocabulary(range(size))
    assert vocab.id_dtype == dtype
    last = vocab.encode(chr(size - 1))
    assert last.dtype == dtype and last.tolist() == [size - 1]


def test_unknown_characters_raise_by_default_and_list_them():
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(DataError) as caught:
        vocab.encode("abcxyzx")
    message = str(caught.value)
    assert "'x'" in message and "'y'" in message and "'z'" in message
    assert "3 distinct" in message
    assert "\n" not in message


def test_unknown_character_listing_is_capped():
    vocab = Vocabulary.from_text("a")
    with pytest.raises(DataError) as caught:
        vocab.encode("bcdefghijklmnopqrstuvwxyz")
    message = str(caught.value)
    assert "25 distinct" in message
    assert "'k'" in message and "'l'" not in message and "..." in message


def test_skip_drops_unknown_characters_and_counts_them():
    vocab = Vocabulary.from_text("abc")
    ids, skipped = vocab.encode_with_count("a?b!!c\U0010FFFF", "skip")
    assert vocab.decode(ids) == "abc"
    assert skipped == 4
    assert vocab.encode("zzz", unknown="skip").tolist() == []


def test_bad_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError):
        Vocabulary.from_text("abc").encode("a", unknown="ignore")


def test_unknown_chars_are_distinct_and_sorted():
    vocab = Vocabulary.from_text("abc")
    assert vocab.unknown_chars("zebra yak, zebra") == [" ", ",", "e", "k", "r", "y", "z"]
    assert vocab.unknown_chars("cab") == []


def test_empty_text_encodes_and_decodes():
    vocab = Vocabulary.from_text("abc")
    assert len(vocab.encode("")) == 0
    assert vocab.decode([]) == ""


def test_decode_rejects_out_of_range_ids():
    vocab = Vocabulary.from_text("abc")
    with pytest.raises(DataError):
        vocab.decode([0, 3])
    with pytest.raises(DataError):
        vocab.decode(np.array([-1]))


def test_json_round_trip():
    vocab = Vocabulary.from_text("héllo 😀")
    restored = Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored == vocab
    assert all(type(c) is int for c in vocab.to_json())


@pytest.mark.parametrize("garbage", [
    {"a": 1}, "abc", 42, None, [], [2, 1], [1, 1], [-1, 5], [0x110000],
    [True], [0, False], [1.0], [1, 2.5], ["a"], [None], [[1]], [2**70],
], ids=repr)
def test_from_json_rejects_garbage(garbage):
    with pytest.raises(DataError) as caught:
        Vocabulary.from_json(garbage)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("garbage", [
    np.array([], np.int64), np.array([3, 2]), np.array([1.0, 2.0]),
    np.array([True, False]), np.array([[1, 2]]), np.array([0, 0x110000]),
], ids=repr)
def test_constructor_rejects_garbage_arrays(garbage):
    with pytest.raises(DataError):
        Vocabulary(garbage)


def test_constructor_accepts_the_extremes():
    vocab = Vocabulary([0, 0xD800, 0x10FFFF])
    assert vocab.decode([0, 1, 2]) == "\x00\ud800\U0010ffff"


def test_codepoint_helpers_are_inverse():
    text = ROUND_TRIP_TEXTS["emoji"] + ROUND_TRIP_TEXTS["surrogateescape"]
    codepoints = codepoints_of(text)
    assert codepoints.tolist() == [ord(c) for c in text]
    assert text_of(codepoints) == text
