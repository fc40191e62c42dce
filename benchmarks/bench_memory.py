"""Peak resident memory: charlm against PyTorch, and charlm against corpus size.

    python benchmarks/bench_memory.py                  # training, both frameworks
    python benchmarks/bench_memory.py --corpus-mb 1000 # a 1 GB corpus against a 10 MB one

Training. Each measurement is a fresh child process that builds the model,
runs `--steps` training steps (forward, BPTT, clip, Adam, as in
bench_train.py) on the same kind of chunk and exits; the parent reads the
child's peak resident set size (ru_maxrss from wait4), so nothing of one run
leaks into another. The torch child imports only torch and numpy; the
charlm child only charlm: each is what a user's process would hold.

Corpus size. `charlm train FILE --max-steps N` runs as a child on a
generated corpus of the given size (tiny-shakespeare repeated, or random
words when it is absent) and on a 10 MB one; with the ids memory-mapped and
the text read in blocks, the two peaks should be the same up to noise.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
sys.path.insert(0, str(REPO_ROOT))

CONFIGS = {
    "lstm-1x128-b32-s64": ("lstm", 1, 128, 32, 64),
    "lstm-2x128-b50-s50": ("lstm", 2, 128, 50, 50),
    "lstm-2x512-b50-s50": ("lstm", 2, 512, 50, 50),
    "gru-2x512-b50-s50": ("gru", 2, 512, 50, 50),
    "rnn-2x512-b50-s50": ("rnn", 2, 512, 50, 50),
}
VOCAB = 65


def child_charlm(cell, layers, hidden, batch, seq, steps):
    import numpy as np
    from charlm.model import Config, Model
    from charlm.optim import clip_by_global_norm, make_optimizer
    from charlm.parallel import DataParallel, single_threaded_blas, worker_count
    model = Model(Config(vocab_size=VOCAB, cell=cell, hidden=hidden, layers=layers))
    optimizer = make_optimizer("adam", model.params, lr=2e-3)
    rng = np.random.default_rng(0)
    state = model.zero_state(batch)
    # as `charlm train` runs: one worker per thread, each with its own buffers
    workers = worker_count(int(os.environ["OMP_NUM_THREADS"]), batch)
    with single_threaded_blas(workers), DataParallel(model, workers) as parallel:
        for _ in range(steps):
            x = rng.integers(0, VOCAB, (seq, batch)).astype(np.int32)
            y = rng.integers(0, VOCAB, (seq, batch)).astype(np.int32)
            _, grads, state = parallel.loss_and_grads(x, y, state)
            clip_by_global_norm(grads, 5.0)
            optimizer.step(grads)


def child_torch(cell, layers, hidden, batch, seq, steps):
    import numpy as np
    import torch
    modules = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
    rnn = modules[cell](VOCAB, hidden, layers)
    decoder = torch.nn.Linear(hidden, VOCAB)
    params = list(rnn.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    rng = np.random.default_rng(0)
    state = None
    for _ in range(steps):
        x = torch.from_numpy(rng.integers(0, VOCAB, (seq, batch)))
        y = torch.from_numpy(rng.integers(0, VOCAB, (seq, batch)))
        hidden_seq, state = rnn(torch.nn.functional.one_hot(x, VOCAB).float(), state)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        loss = torch.nn.functional.cross_entropy(decoder(hidden_seq).reshape(-1, VOCAB),
                                                 y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()


def peak_rss_mb(command, env=None):
    """Run a child to completion; (its peak RSS in MB, exit code, seconds)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, child.returncode, time.perf_counter() - started


def training_table(args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    try:
        import torch  # noqa: F401
        frameworks = ["charlm", "torch"]
    except ImportError:
        frameworks = ["charlm"]
        print("PyTorch is not installed: charlm only", file=sys.stderr)
    print(f"\n{time.strftime('%Y-%m-%d')}, peak RSS in MB over {args.steps} training steps, "
          f"{args.threads} threads, float32\n")
    print("| config | charlm MB | torch MB | charlm / torch |")
    print("|---|---:|---:|---:|")
    for name, spec in CONFIGS.items():
        peaks = {}
        for framework in frameworks:
            command = [sys.executable, __file__, "--child", framework, "--config", name,
                       "--steps", str(args.steps)]
            peak, code, _ = peak_rss_mb(command, env)
            if code != 0:
                sys.exit(f"{framework} child failed on {name} (exit {code})")
            peaks[framework] = peak
        torch_mb = peaks.get("torch")
        ratio = f"{peaks['charlm'] / torch_mb:.2f}" if torch_mb else "n/a"
        print(f"| {name} | {peaks['charlm']:,.0f} | "
              f"{'n/a' if torch_mb is None else f'{torch_mb:,.0f}'} | {ratio} |", flush=True)


def write_corpus(path, megabytes):
    """Repeat tiny-shakespeare (or random words) up to `megabytes` MB, streamed."""
    if DATA_FILE.exists():
        block = DATA_FILE.read_bytes()
    else:
        import numpy as np
        rng = np.random.default_rng(0)
        words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(200)]
        block = (" ".join(rng.choice(words, 200_000)) + "\n").encode()
    target = int(megabytes * 1e6)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            piece = block[:target - written]
            f.write(piece)
            written += len(piece)


def corpus_table(args):
    print(f"\n{time.strftime('%Y-%m-%d')}, `charlm train --max-steps {args.steps}`, "
          f"peak RSS by corpus size\n")
    print("| corpus | peak RSS MB | seconds (prepare + train) |")
    print("|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for megabytes in (10, args.corpus_mb):
            corpus = os.path.join(work, f"corpus-{megabytes}mb.txt")
            write_corpus(corpus, megabytes)
            command = [sys.executable, "-m", "charlm", "train", corpus, "--out",
                       os.path.join(work, f"m{megabytes}.safetensors"), "--max-steps",
                       str(args.steps), "--no-progress", "--val-frac", "0.001",
                       "--eval-every", str(10**6), "--sample-every", "0"]
            peak, code, seconds = peak_rss_mb(command)
            if code != 0:
                sys.exit(f"charlm train failed on the {megabytes} MB corpus (exit {code})")
            print(f"| {megabytes:,} MB | {peak:,.0f} | {seconds:,.0f} |", flush=True)
            os.remove(corpus)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus-mb", type=float, default=0,
                        help="measure charlm train on a corpus this large instead")
    parser.add_argument("--child", choices=["charlm", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = child_charlm if args.child == "charlm" else child_torch
        child(*CONFIGS[args.config], args.steps)
    elif args.corpus_mb:
        corpus_table(args)
    else:
        training_table(args)


if __name__ == "__main__":
    main()
