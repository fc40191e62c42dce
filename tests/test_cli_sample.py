"""`charlm sample` from the command line: options, errors, streaming."""

import codecs
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import charlm
from charlm.cli import main
from charlm.sampling import generate_ids

TEXT = "Ça va? naïve façade, 日本.\nROMEO: to be or not to be.\n" * 80


@pytest.fixture(scope="module")
def model_path(train_tiny):
    _, out, _ = train_tiny(TEXT, eval_every=20, max_steps=20)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_same_seed_same_text_and_the_prime_is_echoed(model_path):
    first = invoke("sample", model_path, "--length", 120, "--seed", 7, "--prime", "ROMEO:")
    second = invoke("sample", model_path, "--length", 120, "--seed", 7, "--prime", "ROMEO:")
    other = invoke("sample", model_path, "--length", 120, "--seed", 8, "--prime", "ROMEO:")
    assert first.exit_code == 0, first.output
    assert first.output == second.output != other.output
    assert first.output.startswith("ROMEO:")
    assert len(first.output) == len("ROMEO:") + 120 + 1      # and a final newline
    assert set(first.output) <= set(TEXT) | {"\n"}


def test_prime_file_and_num_samples(model_path, tmp_path):
    prime = tmp_path / "prime.txt"
    prime.write_text("naïve", encoding="utf-8")
    result = invoke("sample", model_path, "--prime-file", prime, "--length", 30,
                    "--num-samples", 3, "--seed", 1, "--top-k", 3)
    assert result.exit_code == 0, result.output
    blocks = result.output.split("===== sample ")[1:]
    assert len(blocks) == 3
    assert all(block.split("=====\n", 1)[1].startswith("naïve") for block in blocks)
    assert len({block.split("=====\n", 1)[1] for block in blocks}) > 1


@pytest.mark.parametrize("args, words", [
    (["--prime", "Z☃"], "'☃'"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "1.5"], "top-p"),
    (["--top-k", "0"], "top-k"),
    (["--length", "-1"], "--length"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_bad_options_print_nothing_but_one_error_line(model_path, args, words):
    result = CliRunner().invoke(main, ["sample", str(model_path), *args])
    assert result.exit_code in (2, 3), result.output
    assert words in result.output
    assert "Traceback" not in result.output
    assert "☃" not in result.output.split("error")[0]         # the prime was not echoed first


def test_output_streams_before_a_long_sample_ends(model_path):
    """Unbounded sampling (--length 0): characters arrive at once, as valid UTF-8."""
    env = dict(os.environ, LC_ALL="C", LANG="C")              # UTF-8 whatever the locale
    process = subprocess.Popen([sys.executable, "-m", "charlm", "sample", str(model_path),
                                "--length", "0", "--seed", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        started = time.time()
        first = process.stdout.read(64)
        elapsed = time.time() - started
    finally:
        process.kill()
        process.wait()
    assert len(first) == 64 and elapsed < 30
    # valid UTF-8: a strict incremental decoder accepts it (the read may end
    # inside a character, which it keeps for later instead of failing)
    text = codecs.getincrementaldecoder("utf-8")("strict").decode(first)
    assert len(text) >= 64 // 4


def test_api_sample_batch_and_generate(model_path):
    lm = charlm.load(str(model_path))
    texts = lm.sample_batch(4, 50, seed=2, temperature=0.9)
    assert len(texts) == 4 and all(len(t) == 50 for t in texts)
    assert "".join(lm.generate(50, seed=2)) == lm.sample(50, seed=2)
    assert lm.sample(40, argmax=True) == lm.sample(40, argmax=True, seed=99)


def test_text_decoded_in_pieces_is_the_text_of_the_ids(model_path):
    """generate_pieces (what sample, generate and `charlm sample` write) decodes
    each block of the sampler at once: the same text as the ids one by one,
    non-ASCII characters included, in pieces of 1, 2, 4, ... characters."""
    lm = charlm.load(str(model_path))
    length = 1500
    pieces = list(lm.generate_pieces(length, seed=5, prime="Ça"))
    assert [len(p) for p in pieces][:4] == [1, 2, 4, 8]
    ids = generate_ids(lm.model, lm.vocab.encode("Ça"), length, np.random.default_rng(5))
    one_by_one = "".join(lm.vocab.decode(step[:1]) for step in ids)
    assert "".join(pieces) == one_by_one and len(one_by_one) == length
    assert set(one_by_one) - set("ROMEO: to be or not to be.\n")    # not only ASCII drawn
    assert lm.sample(length, seed=5, prime="Ça") == one_by_one
    assert "".join(lm.generate(length, seed=5, prime="Ça")) == one_by_one
    batch = lm.sample_batch(2, 300, seed=6, prime="Ça")
    ids = np.stack(list(generate_ids(lm.model, lm.vocab.encode("Ça"), 300,
                                     np.random.default_rng(6), batch=2)), axis=1)
    assert batch == [lm.vocab.decode(row) for row in ids]


def test_api_save_load_and_torch_state_dict(model_path, tmp_path):
    lm = charlm.load(str(model_path))
    copy = tmp_path / "copy.safetensors"
    lm.save(str(copy))
    again = charlm.load(str(copy))
    assert again.vocab == lm.vocab and again.config == lm.config
    assert again.sample(60, seed=5) == lm.sample(60, seed=5)
    assert again.bits_per_char(TEXT[:300]) == lm.bits_per_char(TEXT[:300])
    state = again.torch_state_dict()
    assert "rnn.weight_hh_l1" in state and state["decoder.weight"].shape == (lm.vocab.size, 24)
    assert "sample" in charlm.__doc__ and "bits_per_char" in charlm.__doc__
