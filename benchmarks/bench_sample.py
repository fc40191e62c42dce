"""Sampling speed at batch 1: charlm's fused Cython step against its own
per-character Python loop and, when installed, a PyTorch loop, side by side.

    python benchmarks/bench_sample.py                 # 2x128 and 2x512 LSTM
    python benchmarks/bench_sample.py --cells lstm gru rnn --hidden 128 512

All three start from the same weights and sample with temperature 1 from a
one-character prime. PyTorch runs the usual loop: one nn.LSTM/GRU/RNN call on
a (1, 1, V) one-hot, the linear decoder, softmax and torch.multinomial per
character, under torch.no_grad(). Rounds interleave the three so that machine
drift hits them alike, with a short pause before each block (the other's idle
threads spin for a while); the table gives medians of characters per second.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from charlm.model import Config, Model  # noqa: E402
from charlm.sampling import generate_ids, generate_ids_reference  # noqa: E402
from torch_twin import torch_twin  # noqa: E402

VOCAB = 65
SETTLE_SECONDS = 0.3   # pause before each block, as in bench_train.py: PyTorch's idle
                       # OpenMP threads spin for a while after its block and would take
                       # the core that charlm's sampler team (two threads) runs on


def rate(function, length):
    started = time.perf_counter()
    function(length)
    return length / (time.perf_counter() - started)


def charlm_runner(model, generator):
    def run(length):
        rng = np.random.default_rng(0)
        for _ in generator(model, [0], length, rng):
            pass
    return run


def torch_runner(model):
    import torch
    c = model.config
    twin = torch_twin(model, torch)
    module, decoder = twin["rnn"], twin["decoder"]

    def run(length):
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
    return run


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
    print("\n| model | charlm fused | charlm Python loop | PyTorch | fused / PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for cell in args.cells:
        for hidden in args.hidden:
            model = Model(Config(vocab_size=VOCAB, cell=cell, hidden=hidden, layers=args.layers))
            runners = {"fused": charlm_runner(model, generate_ids),
                       "python": charlm_runner(model, generate_ids_reference)}
            if torch is not None:
                runners["torch"] = torch_runner(model)
            # size each block to about --seconds from a short warm-up
            lengths = {name: max(50, int(rate(run, 200) * args.seconds))
                       for name, run in runners.items()}
            rates = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, run in runners.items():
                    time.sleep(SETTLE_SECONDS)
                    rates[name].append(rate(run, lengths[name]))
            med = {name: statistics.median(r) for name, r in rates.items()}
            torch_rate = med.get("torch")
            ratio = f"{med['fused'] / torch_rate:.1f}x" if torch_rate else "n/a"
            print(f"| {cell} {args.layers}x{hidden} | {med['fused']:,.0f} | {med['python']:,.0f} | "
                  f"{f'{torch_rate:,.0f}' if torch_rate else 'n/a'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
