"""Killed and interrupted runs never cost the last checkpoint.

Real `charlm train` processes, checkpointing at every step, are killed with
SIGKILL again and again (benchmarks/kill_test.py holds the harness; CI runs
CHARLM_KILLS kills, 25 by default): half at random moments, half timed to
land inside a checkpoint write. The count of runs that lost anything must be
0. A writer killed mid-save leaves its temporary file behind; the next save
of the same target removes it, but never the temporary file of a save that is
still running. Ctrl-C and SIGTERM stop after the step and save; a second
Ctrl-C stops at once and keeps the last checkpoint.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from charlm import checkpoint
from charlm.model import Config, Model
from charlm.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kill_test  # noqa: E402

KILLS = int(os.environ.get("CHARLM_KILLS", "25"))
VOCAB = Vocabulary.from_text("abc")


def small_model(seed=0):
    return Model(Config(vocab_size=VOCAB.size, cell="gru", hidden=4, layers=1), seed=seed)


def temp_files(directory):
    pattern = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
    return sorted(name for name in os.listdir(directory) if pattern.fullmatch(name))


def test_sigkill_many_times_loses_nothing(tmp_path):
    report = kill_test.run_kills(tmp_path, KILLS, seed=1234)
    print(report.summary())
    assert report.kills == KILLS
    assert report.lost == [], report.summary()
    # the kills timed to land in a write did so (a killed writer leaves a temp file) ...
    assert report.in_write >= 1, report.summary()
    # ... and later saves removed those temp files again
    assert report.stale_temp_files == 0
    assert report.final_step > 0


# --- temp files of killed writers ---------------------------------------------------

STALLED_WRITER = """
import os, sys, time
from charlm import checkpoint
from charlm.model import Config, Model
from charlm.vocab import Vocabulary

real_write = os.write
def write_a_little_then_hang(fd, data):
    real_write(fd, bytes(data[:100]))
    print("writing", flush=True)
    time.sleep(600)
os.write = write_a_little_then_hang
vocab = Vocabulary.from_text("abc")
checkpoint.save(sys.argv[1], Model(Config(vocab_size=vocab.size, cell="gru", hidden=4,
                                          layers=1), seed=7), vocab)
"""


def test_a_killed_writers_temp_file_is_removed_by_the_next_save_but_not_before(tmp_path):
    target = tmp_path / "m.safetensors"
    checkpoint.save(target, small_model(seed=1), VOCAB, meta={"step": 1})
    good = target.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(target)],
                              stdout=subprocess.PIPE, text=True, env=kill_test.ENV)
    try:
        assert writer.stdout.readline() == "writing\n"
        [in_progress] = temp_files(tmp_path)
        assert (tmp_path / in_progress).stat().st_size == 100
        # the writer is alive and holds its lock: a save of the same target leaves its file
        checkpoint.save(target, small_model(seed=2), VOCAB, meta={"step": 2})
        assert temp_files(tmp_path) == [in_progress]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    # killed mid-write: the previous checkpoint is whole, and the temp file is abandoned
    assert checkpoint.load(target).meta == {"step": 2}
    assert temp_files(tmp_path) == [in_progress]
    checkpoint.save(target, small_model(seed=3), VOCAB, meta={"step": 3})
    assert temp_files(tmp_path) == []
    assert checkpoint.load(target).meta == {"step": 3}
    assert good != target.read_bytes()


def test_only_the_targets_own_temp_files_are_removed(tmp_path):
    target = tmp_path / "m.safetensors"
    abandoned = [".m.safetensors.0123456789ab.tmp", ".m.safetensors.ffffffffffff.tmp"]
    others = [".m.safetensors.backup.tmp",            # not a name charlm makes
              ".m.safetensors.0123456789AB.tmp",      # not lower-case hex
              ".m.best.safetensors.0123456789ab.tmp",  # another target's
              "m.safetensors.0123456789ab.tmp",       # not hidden
              ".xm.safetensors.0123456789ab.tmp"]
    for name in abandoned + others:
        (tmp_path / name).write_bytes(b"partial")
    checkpoint.save(target, small_model(), VOCAB)
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["m.safetensors"])


def test_saving_works_where_listing_the_directory_does_not(tmp_path, monkeypatch):
    real_listdir = os.listdir

    def refuse(path="."):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "listdir", refuse)
    checkpoint.save(tmp_path / "m.safetensors", small_model(), VOCAB, meta={"step": 4})
    monkeypatch.setattr(os, "listdir", real_listdir)
    assert checkpoint.load(tmp_path / "m.safetensors").meta == {"step": 4}
    np.testing.assert_array_equal(
        checkpoint.load(tmp_path / "m.safetensors").model.params["out.bias"],
        small_model().params["out.bias"])


# --- signals --------------------------------------------------------------------------

def _start_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(kill_test.TEXT, encoding="utf-8")
    out = tmp_path / "m.safetensors"
    command = kill_test._command(corpus, out, resume=False)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=kill_test.ENV)
    deadline = time.monotonic() + kill_test.START_TIMEOUT
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert out.exists(), process.communicate()[1]
    return process, corpus, out


def test_sigterm_stops_after_the_step_and_saves(tmp_path):
    process, _, out = _start_training(tmp_path)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == "charlm: interrupted\n"
    step = checkpoint.load(out).meta["progress"]["step"]
    assert f"interrupted at step {step}; checkpoint saved" in stdout
    assert temp_files(tmp_path) == []


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    process, corpus, out = _start_training(tmp_path)
    process.send_signal(signal.SIGINT)
    time.sleep(0.002)      # the second one lands in the final save, or just before it
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == "charlm: interrupted\n"
    step = checkpoint.load(out).meta["progress"]["step"]
    assert step >= 1
    resumed = subprocess.run(kill_test._command(corpus, out, resume=True)
                             + ["--max-steps", str(step + 1)],
                             capture_output=True, text=True, timeout=120, env=kill_test.ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(out).meta["progress"]["step"] == step + 1
    assert [name for name in temp_files(tmp_path) if ".m.safetensors." in name] == []
