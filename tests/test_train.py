"""Training end to end: learning, exact resume, divergence handling, the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import charlm
from charlm import checkpoint
from charlm.cli import main
from charlm.errors import DataError, ModelFileError, UsageError
from charlm.train import TrainingDiverged, Trainer, TrainOptions, output_paths

ROOT = Path(__file__).resolve().parents[1]
UNICODE_TEXT = "Ça va? 日本語 😀 naïve façade, ΑΒΓ!\n"


def make_corpus(tmp_path, chars=30_000, seed=0):
    path = tmp_path / "corpus.txt"
    subprocess.run([sys.executable, str(ROOT / "data" / "make_corpus.py"), str(path),
                    "--chars", str(chars), "--seed", str(seed)], check=True,
                   capture_output=True)
    return path


def small_options(**changes):
    base = dict(cell="lstm", layers=2, hidden=32, batch_size=8, seq_length=16, lr=3e-3,
                eval_every=10, sample_every=0, max_steps=20)
    base.update(changes)
    return TrainOptions(**base)


def run(corpus, out, options, **kwargs):
    trainer = Trainer(corpus, out, options, echo=lambda *a: None, progress_bar=False, **kwargs)
    return trainer, trainer.run()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_training_learns_and_writes_its_files(tmp_path, cell):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "run" / "m.safetensors"
    trainer, progress = run(corpus, out, small_options(cell=cell, max_steps=100, lr=1e-2,
                                                       eval_every=20))
    paths = output_paths(str(out))
    records = [json.loads(line) for line in open(paths["metrics"])]
    assert [r["step"] for r in records] == [20, 40, 60, 80, 100]
    # uniform guessing over this corpus's 33 characters is log2(33) = 5.04 bits
    assert records[-1]["val_bpc"] < 3.5
    assert records[-1]["val_bpc"] < records[0]["val_bpc"] - 0.5
    assert records[-1]["train_nats"] < records[0]["train_nats"]
    assert all(0 <= r["clipped_frac"] <= 1 and r["grad_norm_max"] > 0 for r in records)
    best = min(r["val_nats"] for r in records)
    assert progress.best_val_nats == best
    # the best weights score what the log says
    lm = charlm.load(paths["best"])
    val_text = lm.vocab.decode(trainer.corpus.val_ids)
    assert lm.bits_per_char(val_text) == pytest.approx(best / math.log(2), rel=1e-9)
    assert checkpoint.load(str(out)).meta["progress"]["step"] == 100


def test_resume_continues_exactly(tmp_path):
    """Stopping after a checkpoint and resuming gives bitwise the same model as
    never stopping: weights, optimiser state, RNG, data position, carried state."""
    corpus = make_corpus(tmp_path)
    options = small_options(dropout=0.2, max_steps=30, threads=2)    # sharded dropout too
    straight, _ = run(corpus, tmp_path / "a.safetensors", options)

    run(corpus, tmp_path / "b.safetensors", small_options(dropout=0.2, max_steps=20, threads=2))
    resumed, _ = run(corpus, tmp_path / "b.safetensors",
                     small_options(dropout=0.2, max_steps=30, threads=2),
                     resume=str(tmp_path / "b.safetensors"), overrides=["max_steps"])
    assert resumed.progress.step == 30
    for name, p in straight.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[name], p, err_msg=name)
    a_opt, b_opt = straight.optimizer.state_tensors(), resumed.optimizer.state_tensors()
    for name in a_opt:
        np.testing.assert_array_equal(b_opt[name], a_opt[name])
    a_hist = [r["val_nats"] for r in straight.progress.history]
    b_hist = [r["val_nats"] for r in resumed.progress.history]
    assert a_hist == b_hist


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_worker_threads_change_only_the_rounding(tmp_path, cell):
    """--threads 2 splits each batch between two workers (charlm.parallel);
    the run must follow the single-threaded one up to float32 rounding."""
    corpus = make_corpus(tmp_path)
    runs = [run(corpus, tmp_path / f"t{threads}.safetensors",
                small_options(cell=cell, threads=threads, max_steps=15, eval_every=5))[0]
            for threads in (1, 2)]
    assert [t.workers for t in runs] == [1, 2]
    one, two = ([r["val_nats"] for r in t.progress.history] for t in runs)
    np.testing.assert_allclose(two, one, rtol=2e-4)
    for name, p in runs[0].model.params.items():
        np.testing.assert_allclose(runs[1].model.params[name], p, rtol=1e-3, atol=1e-4,
                                   err_msg=name)


def test_resume_refuses_a_different_model_or_text(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "m.safetensors"
    run(corpus, out, small_options(max_steps=10))
    with pytest.raises(UsageError, match="hidden"):
        run(corpus, out, small_options(hidden=64), resume=str(out), overrides=["hidden"])
    (tmp_path / "other").mkdir()
    other = make_corpus(tmp_path / "other", seed=5)
    with pytest.raises(DataError, match="not the text"):
        run(other, out, small_options(), resume=str(out))
    best = tmp_path / "m.best.safetensors"         # weights only: nothing to resume
    with pytest.raises(ModelFileError, match="not a training checkpoint"):
        run(corpus, tmp_path / "again.safetensors", small_options(), resume=str(best))


def test_existing_output_is_not_replaced_without_force(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "m.safetensors"
    run(corpus, out, small_options(max_steps=10))
    before = out.read_bytes()
    with pytest.raises(UsageError, match="exists"):
        run(corpus, out, small_options(max_steps=10))
    assert out.read_bytes() == before
    run(corpus, out, small_options(max_steps=10, seed=3), force=True)
    assert out.read_bytes() != before
    metrics = (tmp_path / "m.metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1                    # the replaced run's log went with it


def test_non_finite_loss_never_reaches_a_saved_model(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "m.safetensors"
    trainer, _ = run(corpus, out, small_options(max_steps=10))
    good = out.read_bytes()
    resumed = Trainer(corpus, out, small_options(max_steps=40), resume=str(out),
                      overrides=["max_steps"], echo=lambda *a: None, progress_bar=False)
    resumed.model.params["weight_hh_l0"][0, 0] = np.nan     # poison the weights
    with pytest.raises(TrainingDiverged, match="non-finite"):
        resumed.run()
    assert out.read_bytes() == good
    assert resumed.progress.skipped_nonfinite == 10


def test_unicode_corpus_trains_and_samples(tmp_path):
    corpus = tmp_path / "u.txt"
    corpus.write_text(UNICODE_TEXT * 200, encoding="utf-8")
    out = tmp_path / "u.safetensors"
    run(corpus, out, small_options(max_steps=40, eval_every=20))
    lm = charlm.load(str(out))
    text = lm.sample(300, temperature=0.5, prime="日", seed=0)
    assert set(text) <= set(UNICODE_TEXT)
    assert lm.sample(50, seed=4) == lm.sample(50, seed=4)


# --- the command line -------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_train_then_sample(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "m.safetensors"
    result = cli("train", corpus, "--out", out, "--hidden", 32, "--batch-size", 8,
                 "--seq-length", 16, "--max-steps", 20, "--eval-every", 10,
                 "--sample-every", 10, "--no-progress", "--threads", 1)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("best validation: ") and "bits per character" in lines[-1]
    assert "----- sample -----" in result.output
    # continue in place, counting steps across the resume
    result = cli("train", corpus, "--resume", out, "--out", out, "--max-steps", 30,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resumed at step 20" in result.output
    assert checkpoint.load(str(out)).meta["progress"]["step"] == 30
    result = cli("sample", out, "--length", 80, "--seed", 2, "--temperature", 0.7)
    assert result.exit_code == 0 and len(result.output) > 80


@pytest.mark.parametrize("args, code, words", [
    (["--hidden", "0"], 2, "hidden"),
    (["--lr", "nan"], 2, "lr"),
    (["--dropout", "1.5"], 2, "dropout"),
    (["--max-time", "soon"], 2, "duration"),
    (["--batch-size", "5000"], 3, "shorter than one batch"),
])
def test_cli_bad_options_give_one_line_and_an_exit_code(tmp_path, args, code, words):
    corpus = make_corpus(tmp_path, chars=3000)
    result = CliRunner().invoke(main, ["train", str(corpus), "--out", str(tmp_path / "m"),
                                       "--no-progress", *args])
    assert result.exit_code == code, result.output
    assert words in result.output
    assert "Traceback" not in result.output


def test_cli_missing_corpus_is_a_data_error(tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path / "nope.txt")])
    assert result.exit_code == 3
    assert "no such file" in result.output


def test_sigint_saves_a_clean_checkpoint_that_resumes(tmp_path):
    """A real process, no step limit: Ctrl-C stops after the current step,
    saves, says where, and exits 130; the run then continues from there."""
    import signal
    import time
    corpus = make_corpus(tmp_path)
    out = tmp_path / "m.safetensors"
    command = [sys.executable, "-m", "charlm", "train", str(corpus), "--out", str(out),
               "--max-epochs", "0",
               "--hidden", "32", "--batch-size", "8", "--seq-length", "16",
               "--eval-every", "5", "--sample-every", "0", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert out.exists()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = checkpoint.load(str(out)).meta["progress"]["step"]
    assert f"interrupted at step {step}; checkpoint saved" in stdout
    resumed = subprocess.run(command[:5] + ["--resume", str(out), "--max-steps", str(step + 3),
                                            "--no-progress"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(str(out)).meta["progress"]["step"] == step + 3
