"""Evaluation speed: bits per character over a text, charlm against PyTorch.

    python benchmarks/bench_eval.py                      # 2x128 and 2x512 LSTM
    python benchmarks/bench_eval.py --cells lstm gru --hidden 256 --chars 50000

Both compute the figure `charlm eval` defines: the mean over characters 2..n
of -log2 p(c_k | c_1..c_{k-1}) from a zero state, so both read the text as a
single stream. charlm uses charlm.evaluate.score (chunks of 2,048 steps, the
state carried); PyTorch runs nn.LSTM/GRU/RNN over the same chunks of one-hot
input with the state carried, then the decoder and log_softmax, under
no_grad. Same weights; the two figures are printed and must agree. Rounds
interleave the two, with a short pause before each block (the other's idle
threads spin for a while); medians of characters per second. The footer
says how often charlm's two-thread team fell back to one thread.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from charlm import _kernels as K, evaluate  # noqa: E402
from charlm.model import Config, Model  # noqa: E402
from charlm.vocab import Vocabulary  # noqa: E402
from torch_twin import torch_twin  # noqa: E402


def load_ids(chars):
    if DATA_FILE.exists():
        text = DATA_FILE.read_text(encoding="utf-8")[-chars:]
    else:
        rng = np.random.default_rng(0)
        text = "".join(chr(97 + i) for i in rng.integers(0, 26, chars))
    vocab = Vocabulary.from_text(text)
    return vocab.encode(text).astype(np.int32), vocab.size


def torch_scorer(model):
    import torch
    c = model.config
    twin = torch_twin(model, torch)
    rnn, decoder = twin["rnn"], twin["decoder"]

    def score(ids):
        total, hidden = 0.0, None
        eye = torch.eye(c.vocab_size)
        with torch.no_grad():
            for start in range(0, len(ids) - 1, evaluate.CHUNK):
                window = torch.from_numpy(ids[start:start + evaluate.CHUNK + 1]).long()
                x = eye[window[:-1]].unsqueeze(1)            # (T, 1, V) one-hot
                out, hidden = rnn(x, hidden)
                logp = torch.log_softmax(decoder(out[:, 0]), dim=-1)
                total -= float(logp.gather(1, window[1:, None]).sum())
        return total / (len(ids) - 1) / math.log(2)
    return score


SETTLE_SECONDS = 0.3   # pause before each block, as in bench_train.py: PyTorch's idle
                       # OpenMP threads spin for a while after its block and would take
                       # the core of charlm's second thread (the team or the pipeline)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["lstm"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chars", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads, user_api="blas")
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    ids, V = load_ids(args.chars)
    print(f"{len(ids):,} characters, V={V}, float32, {args.threads} threads, "
          f"medians of {args.rounds} rounds" + ("" if torch else " (PyTorch not installed)"))
    print("\n| model | charlm chars/s | PyTorch chars/s | ratio | bpc (charlm / PyTorch) |")
    print("|---|---:|---:|---:|---|")
    for cell in args.cells:
        for hidden in args.hidden:
            model = Model(Config(vocab_size=V, cell=cell, hidden=hidden, layers=args.layers))
            scorers = {"charlm": lambda: evaluate.score(model, ids).bits_per_char}
            if torch is not None:
                torch_score = torch_scorer(model)
                scorers["torch"] = lambda: torch_score(ids)
            figures, rates = {}, {name: [] for name in scorers}
            for name, score in scorers.items():
                figures[name] = score()                      # warm-up, and the figure
            for _ in range(args.rounds):
                for name, score in scorers.items():
                    time.sleep(SETTLE_SECONDS)
                    started = time.perf_counter()
                    score()
                    rates[name].append((len(ids) - 1) / (time.perf_counter() - started))
            med = {name: statistics.median(r) for name, r in rates.items()}
            t = med.get("torch")
            torch_rate = f"{t:,.0f}" if t else "n/a"
            ratio = f"{med['charlm'] / t:.2f}" if t else "n/a"
            print(f"| {cell} {args.layers}x{hidden} | {med['charlm']:,.0f} | {torch_rate} | "
                  f"{ratio} | {figures['charlm']:.6f} / {figures.get('torch', float('nan')):.6f} |",
                  flush=True)
    print(f"\ncharlm's single-stream team (large models): {K.team_runs():,} runs, "
          f"{K.team_solos()} finished by one thread after a wait of over 3 ms (a descheduled "
          "thread; the team then stays alone for 0.1 s)")


if __name__ == "__main__":
    main()
