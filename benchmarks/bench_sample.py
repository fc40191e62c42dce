"""Sampling speed at batch 1: charlm's fused Cython step against its own
per-character Python loop and, when installed, a PyTorch loop, side by side.

    python benchmarks/bench_sample.py                 # 2x128 and 2x512 LSTM
    python benchmarks/bench_sample.py --cells lstm gru rnn --hidden 128 512

All start from the same weights and sample with temperature 1 from a
one-character prime. "as text" is the fused sampler read as characters
through LanguageModel.generate: what `charlm sample` and `m.sample` run.
PyTorch runs the usual loop: one nn.LSTM/GRU/RNN call on a (1, 1, V)
one-hot, the linear decoder, softmax and torch.multinomial per character,
under torch.no_grad(). Rounds interleave the runs so that machine drift hits
them alike, with a short pause before each block (the other's idle threads
spin for a while); the table gives medians of characters per second.

The rate is the steady state's, startup excluded, for all alike: a
block's clock starts once its first WARM_UP characters are out (charlm then
has laid out its weights, started its team and reached its long calls;
PyTorch has made its first calls) and stops at its last. The time to those
first characters, startup included, is in a column of its own.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from charlm.lm import LanguageModel  # noqa: E402
from charlm.model import Config, Model  # noqa: E402
from charlm.sampling import generate_ids, generate_ids_reference  # noqa: E402
from charlm.vocab import Vocabulary  # noqa: E402
from torch_twin import torch_twin  # noqa: E402

VOCAB = 65
SETTLE_SECONDS = 0.3   # pause before each block, as in bench_train.py: PyTorch's idle
                       # OpenMP threads spin for a while after its block and would take
                       # the core that charlm's sampler team (two threads) runs on


WARM_UP = 64           # characters of each block before its clock starts


def timed_block(stream, length):
    """(characters per second after the first WARM_UP, seconds to those
    first WARM_UP) for a block of `length` characters from stream(length),
    an iterator that yields as the characters are drawn."""
    started = time.perf_counter()
    warm = None
    for count, _ in enumerate(stream(length), 1):
        if count == WARM_UP:
            warm = time.perf_counter()
    return (length - WARM_UP) / (time.perf_counter() - warm), warm - started


def charlm_stream(model, generator):
    def stream(length):
        rng = np.random.default_rng(0)
        return generator(model, [0], length, rng)
    return stream


def text_stream(model):
    """The fused sampler as a user reads it: LanguageModel.generate's characters
    (decoded a block at a time), over a vocabulary of VOCAB printable ones."""
    lm = LanguageModel(model, Vocabulary(range(32, 32 + VOCAB)))

    def stream(length):
        return lm.generate(length, prime=" ", seed=0)
    return stream


def torch_stream(model):
    import torch
    c = model.config
    twin = torch_twin(model, torch)
    module, decoder = twin["rnn"], twin["decoder"]

    def stream(length):
        generator = torch.Generator().manual_seed(0)
        x = torch.zeros(1, 1, c.vocab_size)
        x[0, 0, 0] = 1
        hidden = None
        with torch.no_grad():
            for _ in range(length):
                out, hidden = module(x, hidden)
                p = torch.softmax(decoder(out[0, 0]), dim=-1)
                i = int(torch.multinomial(p, 1, generator=generator))
                x.zero_()
                x[0, 0, i] = 1
                yield i
    return stream


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["lstm"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per block, about")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads, user_api="blas")
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"batch 1, float32, V={VOCAB}, {args.threads} threads, medians of {args.rounds} rounds"
          + ("" if torch else " (PyTorch not installed)"))
    print("\n| model | charlm fused | as text | charlm Python loop | PyTorch | fused / PyTorch "
          "| startup: fused, PyTorch (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cell in args.cells:
        for hidden in args.hidden:
            model = Model(Config(vocab_size=VOCAB, cell=cell, hidden=hidden, layers=args.layers))
            streams = {"fused": charlm_stream(model, generate_ids),
                       "text": text_stream(model),
                       "python": charlm_stream(model, generate_ids_reference)}
            if torch is not None:
                streams["torch"] = torch_stream(model)
            # size each block to about --seconds from a short warm-up
            lengths = {name: WARM_UP + max(50, int(timed_block(stream, 4 * WARM_UP)[0]
                                                   * args.seconds))
                       for name, stream in streams.items()}
            rates = {name: [] for name in streams}
            startups = {name: [] for name in streams}
            for _ in range(args.rounds):
                for name, stream in streams.items():
                    time.sleep(SETTLE_SECONDS)
                    rate, startup = timed_block(stream, lengths[name])
                    rates[name].append(rate)
                    startups[name].append(startup * 1e3)
            med = {name: statistics.median(r) for name, r in rates.items()}
            start = {name: statistics.median(s) for name, s in startups.items()}
            torch_rate = med.get("torch")
            ratio = f"{med['fused'] / torch_rate:.2f}x" if torch_rate else "n/a"
            torch_start = f"{start['torch']:.1f}" if torch_rate else "n/a"
            print(f"| {cell} {args.layers}x{hidden} | {med['fused']:,.0f} | {med['text']:,.0f} | "
                  f"{med['python']:,.0f} | "
                  f"{f'{torch_rate:,.0f}' if torch_rate else 'n/a'} | {ratio} | "
                  f"{start['fused']:.1f}, {torch_start} |", flush=True)


if __name__ == "__main__":
    main()
