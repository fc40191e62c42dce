"""charlm: character-level RNN, LSTM and GRU language models on the CPU.

Train from the shell (`charlm train corpus.txt`), then use the model here:

    >>> import charlm
    >>> m = charlm.load("runs/corpus.safetensors")          # doctest: +SKIP
    >>> print(m.sample(200, temperature=0.8, prime="ROMEO:", seed=1))   # doctest: +SKIP
    >>> m.bits_per_char("To be, or not to be")              # doctest: +SKIP
    >>> for piece in m.generate_pieces(0, seed=2): print(piece, end="")   # doctest: +SKIP

What is here:
    load(path) -> LanguageModel    a model file or checkpoint (safetensors, no pickle)
    LanguageModel                  .sample .sample_batch .generate .generate_pieces
                                   .log_probs .bits_per_char .save .torch_state_dict
                                   .vocab .config
    Model, Config, State           the network itself: loss_and_grads (truncated BPTT),
                                   log_probs, next_logits, torch_state_dict
    charlm.train.Trainer           what `charlm train` runs
    charlm.evaluate                the one definition of bits per character
    charlm.reference               the same maths in plain numpy, for reading and tests
    CharlmError and subclasses     UsageError, DataError, ModelFileError: the errors a
                                   user can cause, each with its command-line exit code

The recurrent kernels (forward and truncated-BPTT backward for each cell, and
the fused sampling step) are Cython in charlm._kernels; everything else is
plain Python and numpy.
"""

from .errors import CharlmError, DataError, ModelFileError, UsageError
from .lm import LanguageModel, load
from .model import CELLS, Config, Model, State

__version__ = "0.1.0"

__all__ = [
    "load", "LanguageModel", "CELLS", "Config", "Model", "State",
    "CharlmError", "DataError", "ModelFileError", "UsageError",
]
