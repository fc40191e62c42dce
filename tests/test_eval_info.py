"""`charlm eval` and `charlm info`, and the one definition of bits per character."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import charlm
from charlm import evaluate
from charlm.cli import main
from charlm.train import output_paths

TEXT = "the cat sat on the mat; the dog sat on the log.\n" * 120


@pytest.fixture(scope="module")
def trained(train_tiny):
    root, out, trainer = train_tiny(TEXT, cell="lstm", eval_every=15, max_steps=30)
    val_text = trainer.corpus.vocab.decode(trainer.corpus.val_ids)
    return root, out, trainer, val_text


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_equals_the_training_validation_figure(trained):
    root, out, trainer, val_text = trained
    val_file = root / "val.txt"
    val_file.write_text(val_text, encoding="utf-8")
    best = output_paths(str(out))["best"]
    result = invoke("eval", best, val_file, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    best_val_bpc = trainer.progress.best_val_nats / math.log(2)
    assert figures["bits_per_char"] == pytest.approx(best_val_bpc, rel=1e-12)
    assert figures["characters_scored"] == len(val_text) - 1
    assert figures["perplexity"] == pytest.approx(math.exp(figures["nats_per_char"]))
    # the API gives the same figure
    assert charlm.load(best).bits_per_char(val_text) == pytest.approx(best_val_bpc, rel=1e-12)
    # and the text output has at least four decimals
    text = invoke("eval", best, val_file).output
    assert f"bits per character: {figures['bits_per_char']:.6f}" in text


def test_eval_definition_by_hand(trained):
    """Mean over characters 2..n of -log2 p(c_k | c_<k), from a zero state."""
    _, out, _, _ = trained
    lm = charlm.load(str(out))
    text = "the mat sat"
    ids = lm.vocab.encode(text).astype(np.int32)
    total, state = 0.0, lm.model.zero_state(1)
    for k in range(1, len(ids)):
        logits, state = lm.model.next_logits(ids[k - 1:k, None], state)
        z = logits[0].astype(np.float64)
        log_p = z[ids[k]] - z.max() - np.log(np.exp(z - z.max()).sum())
        total -= log_p / math.log(2)
    assert lm.bits_per_char(text) == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_scoring_in_pieces_equals_scoring_at_once(trained):
    _, out, _, _ = trained
    lm = charlm.load(str(out))
    ids = lm.vocab.encode(TEXT[:700])
    whole = evaluate.score(lm.model, ids, chunk=64)
    pieces = evaluate.score(lm.model, iter([ids[:1], ids[1:300], ids[300:301], ids[301:]]),
                            chunk=50)
    assert pieces.predicted == whole.predicted == len(ids) - 1
    assert pieces.nats_total == pytest.approx(whole.nats_total, rel=1e-6)


def test_eval_unknown_characters_error_or_skip(trained):
    root, out, _, _ = trained
    path = root / "unknown.txt"
    path.write_text("the cat ☃ sat ✓ on the mat", encoding="utf-8")
    result = invoke("eval", out, path)
    assert result.exit_code == 3
    assert "'☃'" in result.output and "'✓'" in result.output
    result = invoke("eval", out, path, "--skip-unknown", "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["skipped_unknown"] == 2
    assert figures["characters_scored"] == len("the cat ☃ sat ✓ on the mat") - 2 - 1


@pytest.mark.parametrize("make, code", [
    (lambda root: root / "missing.safetensors", 4),
    (lambda root: _write(root / "junk.safetensors", b"not a model at all"), 4),
])
def test_eval_and_info_refuse_bad_model_files(trained, make, code):
    root, _, _, _ = trained
    path = make(root)
    for args in (["eval", path, root / "corpus.txt"], ["info", path]):
        result = invoke(*args)
        assert result.exit_code == code, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_info_describes_the_model(trained):
    _, out, trainer, _ = trained
    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    assert "lstm, 2 layer(s) x 24 units, float32" in result.output
    assert f"{trainer.model.num_parameters:,}" in result.output
    assert "30 steps" in result.output
    best = trainer.progress.best_val_nats / math.log(2)
    assert f"{best:.4f} bits per character" in result.output
    details = json.loads(invoke("info", out, "--json").output)
    assert details["vocab_size"] == trainer.corpus.vocab.size
    assert details["best_val_bpc"] == pytest.approx(best)


def _write(path, data):
    path.write_bytes(data)
    return path
