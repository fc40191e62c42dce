"""The Python API: a trained model with its vocabulary.

    >>> import charlm
    >>> m = charlm.load("runs/demo.safetensors")        # doctest: +SKIP
    >>> print(m.sample(200, temperature=0.8, prime="ANNA:\\n", seed=1))   # doctest: +SKIP
    >>> m.bits_per_char("some held-out text")           # doctest: +SKIP
"""

import reprlib

import numpy as np

from . import checkpoint, evaluate
from .errors import DataError, UsageError
from .sampling import check_decoding, default_prime_ids, generate_id_blocks

# sample_batch holds all its text in memory (generate streams instead): a
# bound on the batch, and on the characters it returns, keeps a typo in
# --num-samples or --length a usage error rather than an out-of-memory kill.
MAX_BATCH_SAMPLES = 1 << 16
MAX_BATCH_CHARS = 1 << 27


def load(path):
    """Load a model or checkpoint file written by `charlm train` (safetensors,
    validated; no pickle). Returns a LanguageModel.

    >>> m = charlm.load("runs/demo.safetensors")        # doctest: +SKIP
    """
    loaded = checkpoint.load(path)
    return LanguageModel(loaded.model, loaded.vocab, loaded.meta)


class LanguageModel:
    """A character-level model and its vocabulary: sample, score, save."""

    def __init__(self, model, vocab, meta=None):
        if model.config.vocab_size != vocab.size:
            raise UsageError("the vocabulary does not match the model's vocab_size")
        self.model = model
        self.vocab = vocab
        self.meta = dict(meta or {})

    @property
    def config(self):
        return self.model.config

    def generate(self, length=500, temperature=1.0, prime=None, seed=None, top_k=None,
                 top_p=None, argmax=False):
        """Yield generated characters one at a time (length 0: unbounded).

        The prime (default: a newline, or the first character of the
        vocabulary) conditions the model and is not repeated in the output.

        >>> "".join(m.generate(50, seed=0))                 # doctest: +SKIP
        """
        pieces = self.generate_pieces(length, temperature, prime, seed, top_k, top_p, argmax)
        return (character for piece in pieces for character in piece)

    def generate_pieces(self, length=500, temperature=1.0, prime=None, seed=None, top_k=None,
                        top_p=None, argmax=False):
        """The text of generate, yielded in pieces as the sampler produces them
        (1, 2, 4, ... characters, then up to 1,024 at a time): what `charlm
        sample` writes. Each piece is decoded at once; character by
        character, decoding took a 2x128 LSTM's sampling from 4.8 to 8.4 us
        per character (Intel Xeon).

        >>> for piece in m.generate_pieces(0): print(piece, end="")   # doctest: +SKIP
        """
        # Checked here, before the first character is asked for, so that a bad
        # prime or option fails before anything is printed.
        check_decoding(temperature, top_k, top_p)
        prime_ids = self._prime_ids(prime)
        rng = _generator(seed)
        blocks = generate_id_blocks(self.model, prime_ids, length, rng, temperature=temperature,
                                    top_k=top_k, top_p=top_p, argmax=argmax)
        return (self.vocab.decode(block[:, 0]) for block in blocks)

    def sample(self, length=500, temperature=1.0, prime=None, seed=None, top_k=None,
               top_p=None, argmax=False):
        """The generated text as one str (see generate).

        >>> m.sample(100, temperature=0.8, prime="ROMEO:", seed=1)   # doctest: +SKIP
        """
        if not length:
            raise UsageError("sample() needs a length > 0; use generate() for unbounded text")
        return "".join(self.generate_pieces(length, temperature, prime, seed, top_k, top_p,
                                            argmax))

    def sample_batch(self, count, length=500, temperature=1.0, prime=None, seed=None,
                     top_k=None, top_p=None, argmax=False):
        """`count` independent samples drawn together as one batch (a list of str).

        >>> m.sample_batch(3, 100, temperature=0.8, seed=1)   # doctest: +SKIP
        """
        if not length:
            raise UsageError("sample_batch() needs a length > 0")
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 1 <= count <= MAX_BATCH_SAMPLES:
            raise UsageError(f"the number of samples must be an integer in "
                             f"1..{MAX_BATCH_SAMPLES}, got {reprlib.repr(count)}")
        if count * length > MAX_BATCH_CHARS:
            raise UsageError(f"{count} samples of {length} characters are more than "
                             f"{MAX_BATCH_CHARS:,} characters in memory at once; "
                             f"generate long text one sample at a time")
        rng = _generator(seed)
        blocks = list(generate_id_blocks(self.model, self._prime_ids(prime), length, rng,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         argmax=argmax, batch=count))
        ids = np.concatenate(blocks).T             # (count, length)
        return [self.vocab.decode(row) for row in ids]

    def log_probs(self, text):
        """log p(character k | characters before it) in nats, for k = 2..n (float64 array).

        >>> m.log_probs("hello").shape                      # doctest: +SKIP
        (4,)
        """
        return evaluate.log_probs(self.model, self.vocab.encode(text))

    def bits_per_char(self, text):
        """Mean -log2 p over characters 2..n of text, from a zero state: the
        same figure as `charlm eval` and the training validation.

        >>> m.bits_per_char("To be, or not to be")          # doctest: +SKIP
        """
        return evaluate.score(self.model, self.vocab.encode(text)).bits_per_char

    def save(self, path):
        """Write the model (weights, config, vocabulary) as a model file."""
        checkpoint.save(path, self.model, self.vocab, meta={
            k: v for k, v in self.meta.items() if k in ("train", "corpus", "summary")})

    def torch_state_dict(self):
        """The weights under torch's rnn.* / decoder.* keys (see Model.torch_state_dict)."""
        return self.model.torch_state_dict()

    def _prime_ids(self, prime):
        if prime is None or prime == "":
            return default_prime_ids(self.vocab)
        try:
            return self.vocab.encode(prime)
        except DataError as error:
            raise DataError(f"the prime cannot be used: {error}") from None

    def __repr__(self):
        c = self.config
        return (f"LanguageModel({c.cell} {c.layers}x{c.hidden}, vocabulary {self.vocab.size}, "
                f"{self.model.num_parameters:,} parameters)")


def _generator(seed):
    """numpy's Generator for ``seed`` (None: fresh entropy); UsageError for a
    seed numpy refuses, such as a negative number."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise UsageError(f"seed must be a non-negative integer, got {reprlib.repr(seed)}") from None
