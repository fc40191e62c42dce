"""Tests for charlm.data: preparing a corpus on disk, and the batch stream."""

import json
import os

import numpy as np
import pytest

from charlm import data
from charlm.data import BatchStream, prepare_corpus
from charlm.errors import DataError, UsageError

MIXED_TEXT = "Ça va? 日本語 😀 naïve façade\n" * 7 + "end 👍🏽."


def write_file(tmp_path, content, name="corpus.txt"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def prepare(tmp_path, content, **options):
    return prepare_corpus(write_file(tmp_path, content), tmp_path / "work", **options)


def texts_of(corpus):
    return corpus.vocab.decode(corpus.train_ids), corpus.vocab.decode(corpus.val_ids)


# --- prepare_corpus: results ----------------------------------------------------

@pytest.mark.parametrize("n, val_frac, n_val", [
    (30, 0.1, 3),     # 30 * 0.1 is 3.0000000000000004 in floats; must still be 3
    (31, 0.1, 4),     # rounded up
    (11, 0.5, 6),
    (10, 0.0, 0),
    (7, 0.01, 1),     # any positive fraction holds out at least one character
])
def test_split_sizes_and_contents(tmp_path, n, val_frac, n_val):
    text = ("abcde" * 8)[:n]
    corpus = prepare(tmp_path, text, val_frac=val_frac)
    assert (corpus.n_chars, corpus.n_train, corpus.n_val) == (n, n - n_val, n_val)
    assert corpus.val_skipped == 0  # every character occurs in the training part
    assert texts_of(corpus) == (text[:n - n_val], text[n - n_val:])


def test_mixed_text_split_exactly(tmp_path):
    corpus = prepare(tmp_path, MIXED_TEXT, val_frac=0.2)
    n_val = -(-len(MIXED_TEXT) * 2 // 10)
    train_text, val_text = texts_of(corpus)
    assert train_text == MIXED_TEXT[:-n_val]
    expected_val = "".join(c for c in MIXED_TEXT[-n_val:] if c in set(train_text))
    assert val_text == expected_val
    assert corpus.val_skipped == n_val - len(expected_val)


def test_vocabulary_comes_from_the_training_part_only(tmp_path):
    corpus = prepare(tmp_path, "abababbaab" + "aXbYX", val_frac=1 / 3)
    assert corpus.vocab.chars == ["a", "b"]
    assert corpus.n_val == 5
    assert corpus.val_skipped == 3
    assert texts_of(corpus) == ("abababbaab", "ab")


def test_no_validation_gives_an_empty_val_array(tmp_path):
    corpus = prepare(tmp_path, "hello world", val_frac=0)
    assert len(corpus.val_ids) == 0 and corpus.val_ids.dtype == corpus.vocab.id_dtype
    assert texts_of(corpus) == ("hello world", "")
    assert os.path.getsize(tmp_path / "work" / "val.ids") == 0


def test_ids_are_compact_read_only_memory_maps(tmp_path):
    corpus = prepare(tmp_path, MIXED_TEXT)
    assert corpus.train_ids.base is not None       # a view on the mapped file, not a copy
    assert corpus.train_ids.dtype == np.uint8
    with pytest.raises(ValueError):
        corpus.train_ids[0] = 1
    work = tmp_path / "work"
    assert os.path.getsize(work / "train.ids") == corpus.n_train
    assert sorted(os.listdir(work)) == ["train.ids", "val.ids"]  # no temp files left


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 64])
def test_tiny_blocks_give_the_same_corpus(tmp_path, monkeypatch, block_bytes):
    reference = prepare(tmp_path, MIXED_TEXT, val_frac=0.3)
    monkeypatch.setattr(data, "BLOCK_BYTES", block_bytes)
    streamed = prepare_corpus(tmp_path / "corpus.txt", tmp_path / "work2", val_frac=0.3)
    assert np.array_equal(streamed.train_ids, reference.train_ids)
    assert np.array_equal(streamed.val_ids, reference.val_ids)
    assert streamed.vocab == reference.vocab
    assert streamed.val_skipped == reference.val_skipped
    assert streamed.fingerprint == reference.fingerprint


def test_latin1_encoding(tmp_path):
    corpus = prepare(tmp_path, "café crème àéî".encode("latin-1"), encoding="latin-1",
                     val_frac=0)
    assert texts_of(corpus) == ("café crème àéî", "")


def test_utf16_text_is_not_mistaken_for_binary(tmp_path):
    corpus = prepare(tmp_path, "héllo wörld".encode("utf-16"), encoding="utf-16", val_frac=0)
    assert texts_of(corpus) == ("héllo wörld", "")


def test_errors_replace_substitutes_bad_bytes(tmp_path):
    corpus = prepare(tmp_path, b"ab\xffcd\xe9", errors="replace", val_frac=0)
    assert texts_of(corpus) == ("ab\ufffdcd\ufffd", "")


def test_errors_surrogateescape_keeps_bad_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 2)
    raw = b"ab\xff\xfecd\xc3\xa9"
    corpus = prepare(tmp_path, raw, errors="surrogateescape", val_frac=0)
    train_text, _ = texts_of(corpus)
    assert train_text.encode("utf-8", "surrogateescape") == raw


def test_fingerprint_tracks_the_data_not_the_file_name(tmp_path):
    first = prepare_corpus(write_file(tmp_path, MIXED_TEXT, "a.txt"), tmp_path / "w1")
    same = prepare_corpus(write_file(tmp_path, MIXED_TEXT, "b.txt"), tmp_path / "w2")
    edited = prepare_corpus(write_file(tmp_path, MIXED_TEXT[:-1] + "!", "c.txt"),
                            tmp_path / "w3")
    resplit = prepare_corpus(tmp_path / "a.txt", tmp_path / "w4", val_frac=0.2)
    assert first.fingerprint == same.fingerprint
    assert len({first.fingerprint, edited.fingerprint, resplit.fingerprint}) == 3


def test_corpus_records_its_origin(tmp_path):
    corpus = prepare(tmp_path, MIXED_TEXT, encoding="utf-8")
    assert corpus.path == str(tmp_path / "corpus.txt")
    assert corpus.encoding == "utf-8"
    assert corpus.n_chars == len(MIXED_TEXT)


# --- prepare_corpus: errors -----------------------------------------------------

def assert_error_names_path(error_type, path, call, *fragments):
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    assert_error_names_path(DataError, path, lambda: prepare_corpus(path, tmp_path / "w"),
                            "no such file")


def test_directory(tmp_path):
    assert_error_names_path(DataError, tmp_path, lambda: prepare_corpus(tmp_path, tmp_path / "w"),
                            "directory")


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_file(tmp_path, "hello")

    # chmod cannot lock root out, so simulate what open() says to other users.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", refuse, raising=False)
    assert_error_names_path(DataError, path, lambda: prepare_corpus(path, tmp_path / "w"),
                            "permission denied")


def test_empty_file(tmp_path):
    path = write_file(tmp_path, b"")
    assert_error_names_path(DataError, path, lambda: prepare_corpus(path, tmp_path / "w"),
                            "empty")


@pytest.mark.parametrize("block_bytes", [data.BLOCK_BYTES, 3])
def test_undecodable_text_reports_the_byte_offset(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(data, "BLOCK_BYTES", block_bytes)
    path = write_file(tmp_path, "héllo wörld ".encode("utf-8") + b"\xff rest")
    assert_error_names_path(DataError, path, lambda: prepare_corpus(path, tmp_path / "w"),
                            "byte offset 14", "--encoding", "--errors replace")


def test_truncated_character_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BLOCK_BYTES", 2)
    path = write_file(tmp_path, b"abcd\xe6\x97")  # first two bytes of a 3-byte character
    assert_error_names_path(DataError, path, lambda: prepare_corpus(path, tmp_path / "w"),
                            "byte offset 4")


def test_unknown_encoding(tmp_path):
    path = write_file(tmp_path, "hello")
    assert_error_names_path(UsageError, path,
                            lambda: prepare_corpus(path, tmp_path / "w", encoding="klingon"),
                            "klingon")


@pytest.mark.parametrize("encoding", ["base64", "zlib", "rot13"])
def test_non_text_encoding(tmp_path, encoding):
    path = write_file(tmp_path, "aGVsbG8=")
    assert_error_names_path(UsageError, path,
                            lambda: prepare_corpus(path, tmp_path / "w", encoding=encoding),
                            "not a text encoding")


def test_unknown_errors_handler(tmp_path):
    path = write_file(tmp_path, "hello")
    assert_error_names_path(UsageError, path,
                            lambda: prepare_corpus(path, tmp_path / "w", errors="whatever"),
                            "whatever")


@pytest.mark.parametrize("val_frac", [-0.1, 0.6, float("nan"), "0.1", True])
def test_bad_val_frac(tmp_path, val_frac):
    path = write_file(tmp_path, "hello")
    assert_error_names_path(UsageError, path,
                            lambda: prepare_corpus(path, tmp_path / "w", val_frac=val_frac),
                            "val_frac")


@pytest.mark.parametrize("content, val_frac", [("a", 0), ("ab", 0.5), ("\ufeff", 0)])
def test_too_short(tmp_path, content, val_frac):
    path = write_file(tmp_path, content)
    assert_error_names_path(DataError, path,
                            lambda: prepare_corpus(path, tmp_path / "w", encoding="utf-8-sig",
                                                   val_frac=val_frac),
                            "too short")


def test_binary_file(tmp_path):
    path = write_file(tmp_path, b"\x7fELF\x02\x01\x01\x00\x00\x00 hello")
    assert_error_names_path(DataError, path, lambda: prepare_corpus(path, tmp_path / "w"),
                            "binary", "not a text file")


def test_failed_preparation_leaves_no_id_files(tmp_path):
    path = write_file(tmp_path, b"\x00\x00")
    with pytest.raises(DataError):
        prepare_corpus(path, tmp_path / "w")
    assert not (tmp_path / "w" / "train.ids").exists()


# --- BatchStream ------------------------------------------------------------------

B, T = 4, 5
N_IDS = 103              # L = 25 per stream, 3 ids of tail unused
L = N_IDS // B
CHUNKS = (L - 1) // T    # 4


def make_stream(n_ids=N_IDS, batch_size=B, seq_length=T):
    # Distinct ids, so every value tells where in the text it came from.
    return BatchStream(np.arange(n_ids, dtype=np.uint32), batch_size, seq_length)


def test_chunk_layout_and_types():
    stream = make_stream()
    assert stream.chunks_per_epoch == CHUNKS
    assert stream.chars_per_chunk == T * B
    for k in range(CHUNKS):
        x, y, _ = stream.next_chunk()
        assert x.shape == y.shape == (T, B)
        assert x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        t, b = np.meshgrid(np.arange(T), np.arange(B), indexing="ij")
        assert np.array_equal(x, b * L + k * T + t)


def test_targets_are_inputs_shifted_by_one_within_each_stream():
    ids = np.random.default_rng(0).integers(0, 7, size=N_IDS).astype(np.uint8)
    streams = ids[:B * L].reshape(B, L)
    stream = BatchStream(ids, B, T)
    for k in range(CHUNKS):
        x, y, _ = stream.next_chunk()
        assert np.array_equal(x, streams[:, k * T:k * T + T].T)
        assert np.array_equal(y, streams[:, k * T + 1:k * T + T + 1].T)


def test_chunks_are_contiguous_across_boundaries():
    stream = make_stream()
    previous_x, previous_y, _ = stream.next_chunk()
    for _ in range(CHUNKS - 1):
        x, y, _ = stream.next_chunk()
        assert np.array_equal(x[0], previous_x[-1] + 1)
        assert np.array_equal(x[0], previous_y[-1])
        previous_x, previous_y = x, y


def test_epoch_wraps_and_flags_its_first_chunk():
    stream = make_stream()
    first_x, _, starts = stream.next_chunk()
    assert starts and stream.epoch == 0 and stream.chunk == 1
    flags = [stream.next_chunk()[2] for _ in range(CHUNKS - 1)]
    assert flags == [False] * (CHUNKS - 1)
    assert (stream.epoch, stream.chunk) == (1, 0)
    x, _, starts = stream.next_chunk()
    assert starts and np.array_equal(x, first_x)


def test_state_round_trip_resumes_at_the_identical_next_chunk():
    stream = make_stream()
    for _ in range(CHUNKS + 2):
        stream.next_chunk()
    saved = json.loads(json.dumps(stream.state()))
    resumed = make_stream()
    resumed.set_state(saved)
    for _ in range(CHUNKS + 1):
        expected, got = stream.next_chunk(), resumed.next_chunk()
        assert np.array_equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
        assert expected[2] == got[2]
    assert (resumed.epoch, resumed.chunk) == (stream.epoch, stream.chunk)


def test_minimal_state_is_accepted():
    stream = make_stream()
    stream.set_state({"epoch": 3, "chunk": CHUNKS - 1})
    _, _, starts = stream.next_chunk()
    assert not starts and (stream.epoch, stream.chunk) == (4, 0)


@pytest.mark.parametrize("state", [
    None, [], {"epoch": 0}, {"chunk": 0},
    {"epoch": -1, "chunk": 0}, {"epoch": 0, "chunk": CHUNKS}, {"epoch": 0, "chunk": -1},
    {"epoch": 0.0, "chunk": 0}, {"epoch": True, "chunk": 0}, {"epoch": 0, "chunk": "1"},
    {"epoch": 0, "chunk": 0, "extra": 1}, {"epoch": 0, "chunk": 0, "batch_size": B + 1},
    {"epoch": 0, "chunk": 0, "n_ids": N_IDS + 1},
], ids=repr)
def test_set_state_rejects_bad_states(state):
    stream = make_stream()
    with pytest.raises(DataError):
        stream.set_state(state)
    assert (stream.epoch, stream.chunk) == (0, 0)


def test_too_short_for_one_batch():
    make_stream(n_ids=B * (T + 1))  # exactly enough for one chunk
    with pytest.raises(DataError) as caught:
        make_stream(n_ids=B * (T + 1) - 1)
    message = str(caught.value)
    assert str(B * (T + 1) - 1) in message and "batch size" in message
    assert "sequence length" in message


@pytest.mark.parametrize("batch_size, seq_length", [(0, 5), (4, 0), (2.0, 5), (True, 5)])
def test_bad_geometry_is_a_usage_error(batch_size, seq_length):
    with pytest.raises(UsageError):
        make_stream(batch_size=batch_size, seq_length=seq_length)


def test_stream_over_a_prepared_corpus(tmp_path):
    corpus = prepare(tmp_path, MIXED_TEXT, val_frac=0)
    stream = BatchStream(corpus.train_ids, batch_size=3, seq_length=8)
    x, y, _ = stream.next_chunk()
    length = corpus.n_train // 3
    assert corpus.vocab.decode(x[:, 1]) == MIXED_TEXT[length:length + 8]
    assert corpus.vocab.decode(y[:, 1]) == MIXED_TEXT[length + 1:length + 9]


def test_stream_reading_the_id_file_gives_the_same_chunks(tmp_path):
    corpus = prepare(tmp_path, MIXED_TEXT * 40, val_frac=0)
    mapped = BatchStream(corpus.train_ids, batch_size=5, seq_length=7)
    pread = BatchStream(corpus.train_ids, batch_size=5, seq_length=7, path=corpus.train_path)
    for _ in range(mapped.chunks_per_epoch + 3):          # across an epoch boundary
        for a, b in zip(mapped.next_chunk(), pread.next_chunk()):
            np.testing.assert_array_equal(a, b)


def _resident_file_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_training_and_validation_reads_keep_the_corpus_out_of_resident_memory(tmp_path):
    """Streams spread over the file would map all of it (a fault can map a
    2 MB folio); pread and release_pages keep the resident set flat."""
    from charlm.data import release_pages
    rng = np.random.default_rng(0)
    text = rng.integers(ord("a"), ord("i"), 12_000_000, dtype=np.uint8).tobytes().decode()
    corpus = prepare(tmp_path, text, val_frac=0.5)        # 6 MB of ids on each side
    before = _resident_file_kb()
    stream = BatchStream(corpus.train_ids, 64, 64, path=corpus.train_path)
    for _ in range(50):
        stream.next_chunk()
    assert _resident_file_kb() - before < 3_000
    ids = corpus.val_ids
    total = 0
    for start in range(0, len(ids), 1 << 20):         # as the evaluator reads
        total += int(ids[start:start + (1 << 20)].sum())
        release_pages(ids)
    assert _resident_file_kb() - before < 3_000
    assert total == int(corpus.val_ids.sum(dtype=np.int64))
