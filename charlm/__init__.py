"""charlm: character-level RNN, LSTM and GRU language models on the CPU.

The recurrent kernels (forward and truncated-BPTT backward for each cell)
are Cython in charlm._kernels; everything else is plain Python and numpy.
"""

from .errors import CharlmError, DataError, ModelFileError, UsageError
from .lm import LanguageModel, load
from .model import CELLS, Config, Model, State

__version__ = "0.1.0"

__all__ = [
    "load", "LanguageModel", "CELLS", "Config", "Model", "State",
    "CharlmError", "DataError", "ModelFileError", "UsageError",
]
