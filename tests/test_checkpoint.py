"""Tests for charlm.checkpoint: the model file format, its validation, and atomic saving.

Bad files are built byte by byte (or by re-serialising a good file's parts with
one thing changed), so each test knows exactly which check must fire.
"""

import errno
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from charlm import checkpoint
from charlm.checkpoint import NonFiniteError, load, save
from charlm.errors import CharlmError, DataError, ModelFileError
from charlm.model import CELLS, Config, Model
from charlm.vocab import Vocabulary

TEXT = "hello, wide world\n"
VOCAB = Vocabulary.from_text(TEXT)


def make_model(cell="lstm", dtype="float32", seed=0):
    config = Config(vocab_size=VOCAB.size, cell=cell, hidden=3, layers=2, dtype=dtype)
    model = Model(config, seed=seed)
    # Non-zero biases, so a bias lost or swapped in the file changes the loss.
    rng = np.random.default_rng(seed + 1)
    for name, p in model.params.items():
        if "bias" in name:
            p[...] = rng.normal(0, 0.5, p.shape)
    return model


def sample_extras(model):
    dtype = model.config.np_dtype
    return {
        "optim": {f"adam.m/{name}": np.full(p.shape, 0.25, dtype)
                  for name, p in model.params.items()},
        "best": {name: p * 2 for name, p in model.params.items()},
        "state": {"h": np.arange(2 * 1 * 3, dtype=dtype).reshape(2, 1, 3)},
        "counters": {"step": np.array(7, np.int64), "ids": np.arange(4, dtype=np.uint16),
                     "empty": np.zeros((0, 3), np.int32)},
    }


SAMPLE_META = {"step": 1234, "rng": {"state": 2**100 + 7, "inc": 3},
               "history": [{"step": 100, "val_loss": 2.5}], "note": "naïve 😀"}


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save(path, make_model(), VOCAB, meta={"step": 5})
    return path


def file_parts(path):
    """A file's tensors and its safetensors metadata, to rebuild it with a change."""
    with safe_open(str(path), framework="numpy") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}, reader.metadata()


def write_parts(path, tensors, metadata):
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    return path


def with_document(metadata, **changes):
    """The metadata with the 'charlm' JSON object changed."""
    document = json.loads(metadata["charlm"])
    document.update(changes)
    return {**metadata, "charlm": json.dumps(document)}


def a_loss(model):
    rng = np.random.default_rng(3)
    x = rng.integers(0, VOCAB.size, (5, 2))
    y = rng.integers(0, VOCAB.size, (5, 2))
    return model.loss(x, y, model.zero_state(2))[0]


# --- round trip ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", CELLS)
def test_round_trip_keeps_everything(tmp_path, cell, dtype):
    model = make_model(cell, dtype)
    extras = sample_extras(model)
    path = tmp_path / "m.safetensors"
    save(path, model, VOCAB, extra_tensors=extras, meta=SAMPLE_META)

    loaded = load(path)

    assert loaded.model.config == model.config
    assert loaded.vocab == VOCAB
    assert loaded.meta == SAMPLE_META
    assert set(loaded.model.params) == set(model.params)
    for name, p in model.params.items():
        q = loaded.model.params[name]
        assert q.dtype == p.dtype and q.flags.c_contiguous and q.flags.writeable
        np.testing.assert_array_equal(q, p)
    assert {prefix: set(group) for prefix, group in loaded.extra.items()} == \
        {prefix: set(group) for prefix, group in extras.items()}
    for prefix, group in extras.items():
        for name, array in group.items():
            got = loaded.extra[prefix][name]
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_array_equal(got, array)
    assert a_loss(loaded.model) == a_loss(model)


def test_loaded_model_trains(good_file):
    """Loaded parameters are writable contiguous arrays the kernels accept."""
    model = load(good_file).model
    x = np.zeros((3, 2), np.int32)
    loss, grads, _ = model.loss_and_grads(x, x + 1, model.zero_state(2))
    for name, g in grads.items():
        model.params[name] -= 0.1 * g
    assert model.loss(x, x + 1, model.zero_state(2))[0] < loss


def test_without_extras_or_meta(tmp_path):
    path = tmp_path / "m.safetensors"
    save(path, make_model(), VOCAB)
    loaded = load(path)
    assert loaded.meta == {} and loaded.extra == {}


def test_file_layout(good_file):
    """The documented format: model/<name> tensors and the three metadata keys."""
    tensors, metadata = file_parts(good_file)
    assert set(tensors) == {f"model/{name}" for name in make_model().params}
    assert set(metadata) == {"format", "format_version", "charlm"}
    assert (metadata["format"], metadata["format_version"]) == ("charlm", "1")
    document = json.loads(metadata["charlm"])
    assert document["config"] == make_model().config.to_dict()
    assert document["vocab"] == VOCAB.to_json()
    assert document["step"] == 5


def test_saving_again_replaces_the_file(good_file):
    save(good_file, make_model(seed=9), VOCAB, meta={"step": 6})
    loaded = load(good_file)
    assert loaded.meta == {"step": 6}
    np.testing.assert_array_equal(loaded.model.params["out.weight"],
                                  make_model(seed=9).params["out.weight"])


# --- bad files ----------------------------------------------------------------------

def _bytes_file(content):
    def build(tmp_path, good):
        path = tmp_path / "bad"
        path.write_bytes(content)
        return path
    return build


def _changed_parts(change):
    """A bad file made by change(tensors, metadata) -> (tensors, metadata)."""
    def build(tmp_path, good):
        tensors, metadata = change(*file_parts(good))
        return write_parts(tmp_path / "bad", tensors, metadata)
    return build


def _zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}))
    return buffer.getvalue()


def _with_tensor(name, value):
    return _changed_parts(lambda t, m: ({**t, name: value}, m))


def _without_tensor(name):
    return _changed_parts(lambda t, m: ({k: v for k, v in t.items() if k != name}, m))


def _with_metadata(**changes):
    return _changed_parts(lambda t, m: (t, {**m, **changes}))


def _with_document(**changes):
    return _changed_parts(lambda t, m: (t, with_document(m, **changes)))


def _nan_in(name):
    def change(tensors, metadata):
        bad = tensors[name].copy()
        bad.flat[1] = np.nan
        return {**tensors, name: bad}, metadata
    return _changed_parts(change)


def _missing_file(tmp_path, good):
    return tmp_path / "nothing-here.safetensors"


def _directory(tmp_path, good):
    return tmp_path


def _length_then(header_length, rest):
    return _bytes_file(header_length.to_bytes(8, "little") + rest)


# (id, builder, words the message must contain)
BAD_FILES = [
    ("missing", _missing_file, ["No such file"]),
    ("directory", _directory, ["directory"]),
    ("empty", _bytes_file(b""), ["0 bytes"]),
    ("shorter than 8 bytes", _bytes_file(b"\x10\0\0\0"), ["4 bytes"]),
    ("truncated", lambda tmp_path, good: _bytes_file(good.read_bytes()[:-5])(tmp_path, good),
     ["not a valid safetensors"]),
    ("header length 2**60", _length_then(2**60, b"{}" * 20), ["header length", "limit"]),
    ("header longer than file", _length_then(1000, b"{}" * 20), ["header length", "file"]),
    ("random bytes", _bytes_file(np.random.default_rng(0).bytes(300)), ["header length"]),
    ("random header", _length_then(16, np.random.default_rng(1).bytes(40)),
     ["not a valid safetensors"]),
    ("pickle", _bytes_file(pickle.dumps({"weight": [0.5] * 50})), ["pickle"]),
    ("zip", _bytes_file(_zip_bytes()), ["zip"]),
    ("text", _bytes_file(b"This is a text file, not a model.\n" * 5), ["header length"]),
    ("no metadata", _changed_parts(lambda t, m: (t, None)), ["format 'charlm'"]),
    ("wrong format tag", _with_metadata(format="other"), ["format 'charlm'"]),
    ("unknown version", _with_metadata(format_version="2"), ["version '2'"]),
    ("no JSON", _changed_parts(lambda t, m: (t, {k: v for k, v in m.items() if k != "charlm"})),
     ["no 'charlm' JSON"]),
    ("bad JSON", _with_metadata(charlm='{"config": '), ["invalid JSON"]),
    ("NaN in JSON", _with_metadata(charlm='{"x": NaN}'), ["invalid JSON", "NaN"]),
    ("deeply nested JSON", _with_metadata(charlm="[" * 100_000 + "]" * 100_000),
     ["invalid JSON"]),
    ("JSON not an object", _with_metadata(charlm="[1, 2]"), ["JSON object", "list"]),
    ("no config", _with_document(config=None), ["invalid model config"]),
    ("config missing a key", _with_document(config={"cell": "gru"}), ["invalid model config"]),
    ("config bad value", _with_document(config={"vocab_size": 12, "cell": "transformer"}),
     ["invalid model config", "transformer"]),
    ("vocab not sorted", _with_document(vocab=[98, 97]), ["invalid vocabulary", "increasing"]),
    ("vocab not a list", _with_document(vocab="abc"), ["invalid vocabulary"]),
    ("vocab size mismatch", _with_document(vocab=list(range(97, 97 + VOCAB.size + 1))),
     ["vocabulary has", "vocab_size"]),
    ("missing tensor", _without_tensor("model/weight_hh_l1"), ["missing", "weight_hh_l1"]),
    ("extra model tensor", _with_tensor("model/weight_ih_l2", np.zeros((12, 3), np.float32)),
     ["unexpected model tensor", "weight_ih_l2"]),
    ("wrong shape", _with_tensor("model/out.bias", np.zeros(VOCAB.size + 1, np.float32)),
     ["model/out.bias", "shape"]),
    ("wrong dtype", _with_tensor("model/out.bias", np.zeros(VOCAB.size, np.float64)),
     ["model/out.bias", "float64", "expected float32"]),
    ("unsupported dtype", _with_tensor("model/out.bias", np.zeros(VOCAB.size, np.float16)),
     ["model/out.bias", "F16"]),
    ("unsupported extra dtype", _with_tensor("optim/flags", np.zeros(3, bool)),
     ["optim/flags", "unsupported dtype"]),
    ("NaN weights", _nan_in("model/weight_hh_l0"), ["model/weight_hh_l0", "NaN"]),
    ("infinite extra", _with_tensor("state/h", np.array([1.0, np.inf])), ["state/h", "NaN or inf"]),
    ("tensor without prefix", _with_tensor("weights", np.zeros(2, np.float32)),
     ["'weights'", "<prefix>/<name>"]),
]


@pytest.mark.parametrize("build, words", [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_bad_file_is_a_model_file_error(tmp_path, good_file, build, words):
    path = build(tmp_path, good_file)
    with pytest.raises(ModelFileError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message and len(message) < 400
    for word in words:
        assert word in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions that apply (not root)")
def test_unreadable_file(good_file):
    good_file.chmod(0)
    with pytest.raises(ModelFileError, match="Permission denied"):
        load(good_file)


def test_huge_header_length_is_refused_before_the_library_reads(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("safe_open must not see this file")
    monkeypatch.setattr(checkpoint, "safe_open", fail)
    path = _length_then(2**60, b"x" * 100)(tmp_path, None)
    with pytest.raises(ModelFileError, match="header length 1152921504606846976"):
        load(path)


def test_long_untrusted_text_is_clipped_in_messages(tmp_path, good_file):
    build = _with_document(config={"vocab_size": 12, "cell": "x" * 1_000_000})
    with pytest.raises(ModelFileError) as caught:
        load(build(tmp_path, good_file))
    assert len(str(caught.value)) < 400


# --- atomic saving ----------------------------------------------------------------------

def assert_unchanged(path, original_bytes):
    assert path.read_bytes() == original_bytes
    assert sorted(os.listdir(path.parent)) == [path.name]   # no temp file left


def test_failed_rename_leaves_the_old_file(good_file, monkeypatch):
    before = good_file.read_bytes()

    def failing_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DataError) as caught:
        save(good_file, make_model(seed=5), VOCAB)
    monkeypatch.undo()
    assert str(caught.value) == f"{good_file}: cannot save the model: Invalid cross-device link"
    assert_unchanged(good_file, before)


def test_disk_full_midway_leaves_the_old_file(good_file, monkeypatch):
    before = good_file.read_bytes()
    real_write = os.write
    calls = []

    def write_then_fill_the_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:100]))   # a partial write ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # ... then the disk is full
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write_then_fill_the_disk)
        with pytest.raises(DataError, match="No space left on device") as caught:
            save(good_file, make_model(seed=5), VOCAB)
    assert len(calls) == 2
    assert str(good_file) in str(caught.value)
    assert_unchanged(good_file, before)


def test_fsync_failure_leaves_the_old_file(good_file, monkeypatch):
    before = good_file.read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(DataError, match="Input/output error"):
        save(good_file, make_model(seed=5), VOCAB)
    monkeypatch.undo()
    assert_unchanged(good_file, before)


def test_interrupted_save_removes_the_temp_file(good_file, monkeypatch):
    before = good_file.read_bytes()

    def interrupted(fd, data):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save(good_file, make_model(seed=5), VOCAB)
    assert_unchanged(good_file, before)


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real_write = os.write
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
        save(tmp_path / "m.safetensors", make_model(), VOCAB, meta={"step": 1})
    assert load(tmp_path / "m.safetensors").meta == {"step": 1}


def test_file_and_directory_are_synced(tmp_path, monkeypatch):
    real_fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell a directory's descriptor from a file's")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    save(tmp_path / "m.safetensors", make_model(), VOCAB)
    assert synced == ["file", "dir"]


def test_new_file_gets_the_usual_permissions(tmp_path):
    old_umask = os.umask(0o027)
    try:
        save(tmp_path / "m.safetensors", make_model(), VOCAB)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


def test_missing_directory_is_a_data_error(tmp_path):
    path = tmp_path / "no" / "such" / "m.safetensors"
    with pytest.raises(DataError, match="No such file or directory") as caught:
        save(path, make_model(), VOCAB)
    assert str(path) in str(caught.value)


def test_saving_over_a_directory_is_a_data_error(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="cannot save the model"):
        save(tmp_path / "taken", make_model(), VOCAB)
    assert os.listdir(tmp_path) == ["taken"]


@pytest.mark.parametrize("where", ["model", "extra"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_never_saved(good_file, where, bad):
    before = good_file.read_bytes()
    model, extras = make_model(seed=5), None
    if where == "model":
        model.params["weight_hh_l1"][0, 0] = bad
    else:
        extras = {"best": {"out.bias": np.array([0.0, bad])}}
    with pytest.raises(NonFiniteError) as caught:
        save(good_file, model, VOCAB, extra_tensors=extras)
    assert isinstance(caught.value, CharlmError)
    assert "NaN or infinite" in str(caught.value)
    assert ("model/weight_hh_l1" if where == "model" else "best/out.bias") in str(caught.value)
    assert_unchanged(good_file, before)


# --- caller mistakes ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"meta": {"config": {}}}, "must not contain config"),
    ({"meta": {"best": float("inf")}}, "not strict JSON"),
    ({"meta": {"when": object()}}, "not strict JSON"),
    ({"meta": [1, 2]}, "must be a dict"),
    ({"extra_tensors": {"model": {"x": np.zeros(2)}}}, "prefix 'model'"),
    ({"extra_tensors": {"a/b": {"x": np.zeros(2)}}}, "prefix 'a/b'"),
    ({"extra_tensors": {"optim": {"": np.zeros(2)}}}, "non-empty strings"),
    ({"extra_tensors": {"optim": {"x": np.zeros(2, np.float16)}}}, "unsupported dtype float16"),
    ({"vocab": Vocabulary.from_text("ab")}, "vocabulary has 2 characters"),
])
def test_caller_mistakes_are_value_errors(tmp_path, kwargs, words):
    kwargs = {"vocab": VOCAB, **kwargs}
    with pytest.raises(ValueError, match=words):
        save(tmp_path / "m.safetensors", make_model(), **kwargs)
    assert os.listdir(tmp_path) == []


def test_non_contiguous_extras_are_saved_correctly(tmp_path):
    strided = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]
    save(tmp_path / "m.safetensors", make_model(), VOCAB, extra_tensors={"x": {"s": strided}})
    np.testing.assert_array_equal(load(tmp_path / "m.safetensors").extra["x"]["s"], strided)


# --- fuzzing --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "good.safetensors"
    model = make_model("gru")
    save(path, model, VOCAB, extra_tensors={"state": {"h": np.zeros((2, 1, 3), np.float32)}},
         meta={"step": 3})
    return directory / "mutated.safetensors", path.read_bytes()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_load_or_raise_model_file_error(fuzz_target, data):
    path, good = fuzz_target
    header_end = 8 + int.from_bytes(good[:8], "little")
    mutated = bytearray(good)
    # Most bytes are tensor data, where a change is harmless or a NaN; aim
    # most changes at the header, where the parsing happens.
    for _ in range(data.draw(st.integers(0, 4), label="changes")):
        limit = header_end if data.draw(st.booleans(), label="in header") else len(mutated)
        position = data.draw(st.integers(0, limit - 1), label="position")
        mutated[position] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        mutated = mutated[:data.draw(st.integers(0, len(mutated)), label="length")]
    path.write_bytes(bytes(mutated))
    try:
        loaded = load(path)
    except ModelFileError as error:
        assert "\n" not in str(error)
    else:
        assert all(np.isfinite(p).all() for p in loaded.model.params.values())
