"""Training throughput of charlm against PyTorch, side by side.

What one training step is, for both frameworks: forward over a (T, B) chunk
of one-hot characters, mean cross-entropy, full truncated-BPTT backward over
the chunk, a global-norm gradient clip at 5, and an Adam update. The hidden
state is carried (detached) from chunk to chunk. Both models start from the
same weights (charlm's init, copied into torch), the same threads and dtype.

- charlm: ``Model.loss_and_grads(x, y, state)``, then
  ``charlm.optim.clip_by_global_norm`` and ``make_optimizer("adam", ...)``.
- PyTorch: nn.LSTM/GRU/RNN(V, H, L) + nn.Linear(H, V) on a (T, B, V) one-hot
  float tensor built once per chunk outside the timed region,
  F.cross_entropy, clip_grad_norm_, torch.optim.Adam (its defaults).

Method. After a warm-up (not timed), which also picks K, the steps per block,
so that a block lasts about a second, each of R rounds times a block of K
charlm steps, a block of torch steps, then two blocks of sgemm calls (the
recurrent step's (B x H) @ (H x G) and the input projection's (T*B x H) @
(H x G)) through scipy's BLAS, the very OpenBLAS that charlm's kernels call.
Interleaving the blocks makes slow drift of the machine (clock, neighbours)
hit all four alike. A block's rate is K*T*B / seconds in characters per
second (FLOP/s for sgemm); the table gives the median over rounds, the ratio
of the medians, charlm's matmul GFLOP/s (see flops_per_char) and that as a
fraction of the faster sgemm's median GFLOP/s.

Run from the repository root (charlm built in place):
    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --threads 2 --json bench.json
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
sys.path.insert(0, str(REPO_ROOT))   # use the charlm of this checkout

import numpy as np              # noqa: E402  (after the path set-up above)
import scipy                    # noqa: E402
import scipy.linalg.blas        # noqa: E402

import charlm                   # noqa: E402
from charlm.errors import UsageError   # noqa: E402
from charlm.model import Config, Model  # noqa: E402
from charlm.parallel import DataParallel, single_threaded_blas, usable_cores, worker_count  # noqa: E402
from torch_twin import torch_twin  # noqa: E402

CLIP_NORM = 5.0
LEARNING_RATE = 2e-3
BLOCK_BUDGET = 3       # a block stops after this many times its planned length
SETTLE_SECONDS = 0.3   # pause before each block: idle BLAS/OpenMP threads of the previous
                       # contender spin for a while before they sleep, and would steal
                       # a core from the next block
N_CHUNKS = 4           # distinct chunks cycled through; their one-hots are prebuilt
FALLBACK_VOCAB = 65    # tiny-shakespeare's alphabet size, for the random text


@dataclass(frozen=True)
class BenchConfig:
    cell: str
    layers: int
    hidden: int
    batch: int
    seq: int

    @property
    def name(self):
        return f"{self.cell}-{self.layers}x{self.hidden}-b{self.batch}-s{self.seq}"

    @property
    def label(self):
        cell = "rnn(tanh)" if self.cell == "rnn" else self.cell
        return f"{cell} {self.layers}x{self.hidden} b{self.batch} s{self.seq}"


DEFAULT_CONFIGS = [
    BenchConfig("lstm", 1, 128, 32, 64),
    BenchConfig("lstm", 2, 128, 50, 50),
    BenchConfig("lstm", 2, 512, 50, 50),
    BenchConfig("gru", 2, 512, 50, 50),
    BenchConfig("rnn", 2, 512, 50, 50),
]
EXTRA_CONFIGS = [   # with --all
    BenchConfig("gru", 1, 128, 32, 64),
    BenchConfig("rnn", 1, 128, 32, 64),
    BenchConfig("gru", 2, 128, 50, 50),
    BenchConfig("rnn", 2, 128, 50, 50),
]


@dataclass(frozen=True)
class Timing:
    """How long to measure: quick for a smoke test, default for real numbers."""

    rounds: int
    warmup_steps: int
    warmup_seconds: float
    block_seconds: float


QUICK = Timing(rounds=2, warmup_steps=2, warmup_seconds=0.1, block_seconds=0.2)
FULL = Timing(rounds=7, warmup_steps=3, warmup_seconds=1.0, block_seconds=1.0)


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------

def limit_threads(n):
    """Give charlm's BLAS (scipy's OpenBLAS), numpy's and torch the same n threads.

    With threadpoolctl the BLAS pools are resized in-process. Without it, the
    only way is OPENBLAS_NUM_THREADS/OMP_NUM_THREADS read when OpenBLAS loads,
    which has already happened: set them and re-exec this script once.
    Returns a description for the header.
    """
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        pools = [f"{p['prefix']} {p['version']} ({p.get('architecture', '?')}): "
                 f"{p['num_threads']}" for p in threadpoolctl.threadpool_info()
                 if p["user_api"] == "blas"]
        return "BLAS via threadpoolctl [" + "; ".join(pools) + "]"
    wanted = str(n)
    if os.environ.get("OPENBLAS_NUM_THREADS") != wanted:
        os.environ["OPENBLAS_NUM_THREADS"] = wanted
        os.environ["OMP_NUM_THREADS"] = wanted
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return f"BLAS via OPENBLAS_NUM_THREADS={wanted}"


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def load_ids():
    """(int32 ids of the text, vocabulary size, description)."""
    if DATA_FILE.is_file():
        text = DATA_FILE.read_text(encoding="utf-8")
        alphabet = sorted(set(text))
        index = {ch: i for i, ch in enumerate(alphabet)}
        ids = np.fromiter((index[ch] for ch in text), np.int32, len(text))
        return ids, len(alphabet), f"tiny-shakespeare ({len(text):,} chars, V={len(alphabet)})"
    ids = np.random.default_rng(0).integers(0, FALLBACK_VOCAB, 1_000_000).astype(np.int32)
    return ids, FALLBACK_VOCAB, (f"RANDOM text, V={FALLBACK_VOCAB} ({DATA_FILE} not found; "
                                 "speeds are unaffected, losses are meaningless)")


def make_chunks(ids, cfg, count):
    """`count` consecutive char-rnn chunks: B streams, each a contiguous slice
    of the text; chunk k holds positions [k*T, (k+1)*T) of every stream."""
    T, B = cfg.seq, cfg.batch
    stream_len = (len(ids) - 1) // B
    if count * T > stream_len:
        raise UsageError(f"text too short for {count} chunks of {cfg.label}")
    rows = np.arange(B) * stream_len
    chunks = []
    for k in range(count):
        pos = rows[None, :] + (k * T + np.arange(T))[:, None]     # (T, B)
        chunks.append((ids[pos].copy(), ids[pos + 1].copy()))
    return chunks


# ---------------------------------------------------------------------------
# charlm
# ---------------------------------------------------------------------------

def charlm_optimiser_api():
    """(make_optimizer, clip_by_global_norm, description) from charlm.optim."""
    from charlm.optim import clip_by_global_norm, make_optimizer
    return make_optimizer, clip_by_global_norm, "charlm.optim Adam"


class CharlmTrainer:
    """charlm's training step as `charlm train` runs it: `threads` workers, each
    on a share of the batch (charlm.parallel), with BLAS on one thread each."""

    def __init__(self, cfg, vocab_size, dtype, chunks, optimiser_api, threads):
        self.units_per_step = cfg.seq * cfg.batch
        make_optimizer, self.clip, _ = optimiser_api
        config = Config(vocab_size=vocab_size, cell=cfg.cell, hidden=cfg.hidden,
                        layers=cfg.layers, dtype=dtype)
        self.model = Model(config, seed=0)
        self.workers = worker_count(threads, cfg.batch)
        self.parallel = DataParallel(self.model, self.workers)
        self.optimiser = make_optimizer("adam", self.model.params, LEARNING_RATE)
        self.chunks = chunks
        self.state = self.model.zero_state(cfg.batch)
        self.cursor = 0

    def step(self):
        x, y = self.chunks[self.cursor % len(self.chunks)]
        self.cursor += 1
        loss, grads, self.state = self.parallel.loss_and_grads(x, y, self.state)
        self.clip(grads, CLIP_NORM)       # scales `grads` in place when over the limit
        self.optimiser.step(grads)
        return loss

    def blas_context(self):
        return single_threaded_blas(self.workers)


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

class TorchTrainer:
    def __init__(self, torch, cfg, vocab_size, dtype, chunks, charlm_model):
        self.units_per_step = cfg.seq * cfg.batch
        self.torch, self.V = torch, vocab_size
        tdtype = getattr(torch, dtype)
        H, L = cfg.hidden, cfg.layers
        self.module = torch_twin(charlm_model, torch, tdtype)   # the same initial weights
        self.params = list(self.module.parameters())
        self.optimiser = torch.optim.Adam(self.params, lr=LEARNING_RATE)
        eye = torch.eye(vocab_size, dtype=tdtype)
        self.chunks = [(eye[torch.from_numpy(x).long()],              # (T, B, V) one-hot
                        torch.from_numpy(y).long().reshape(-1)) for x, y in chunks]
        zeros = torch.zeros(L, cfg.batch, H, dtype=tdtype)
        self.state = (zeros, zeros.clone()) if cfg.cell == "lstm" else zeros
        self.cursor = 0

    def step(self):
        torch = self.torch
        one_hot, y = self.chunks[self.cursor % len(self.chunks)]
        self.cursor += 1
        hidden, state = self.module["rnn"](one_hot, self.state)
        logits = self.module["decoder"](hidden).reshape(-1, self.V)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimiser.step()
        # truncated BPTT: the next chunk starts from the values, not the graph
        self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        return loss.detach()


def import_torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def blas_context(contender):
    """The BLAS thread setting a contender runs under (charlm: one per worker)."""
    return getattr(contender, "blas_context", contextlib.nullcontext)()


def time_block(contender, steps, budget=math.inf):
    """Run up to `steps` steps; stop early once `budget` seconds have passed,
    so that a block sized while the machine was quiet cannot run for minutes
    when it gets busy. Returns (steps run, seconds)."""
    with blas_context(contender):
        start = time.perf_counter()
        done = 0
        while done < steps:
            contender.step()
            done += 1
            if time.perf_counter() - start > budget:
                break
        return done, time.perf_counter() - start


def steps_per_block(contender, timing):
    """Untimed warm-up steps (allocations, caches, lazy init), which also give
    K, the steps per block that make a block last about block_seconds."""
    durations = []
    start = time.perf_counter()
    while len(durations) < timing.warmup_steps or time.perf_counter() - start < timing.warmup_seconds:
        durations.append(time_block(contender, 1)[1])
    per_step = statistics.median(durations[-timing.warmup_steps:])
    return max(1, round(timing.block_seconds / per_step))


def flops_per_char(cfg, vocab_size, gates_per_unit):
    """Matmul FLOPs of forward + backward for one character (one of N = T*B rows).

    With H hidden, G = gates_per_unit*H gate rows, L layers, V vocab, per row:
      forward   layer 0 input projection: a row gather, 0
                layers 1..L-1 input projection: 2*H*G each
                recurrent product, every layer:  2*H*G
                output layer:                    2*H*V
      backward  every product above costs twice its forward (one product for
                the weight gradient, one for the gradient of its other operand);
                layer 0's scatter-add again counts 0
      total     3 * 2 * (H*G*(2L - 1) + H*V) = 6 * (H*G*(2L - 1) + H*V)
    Element-wise cell maths, softmax, clipping and Adam are not counted.
    """
    H, L, V = cfg.hidden, cfg.layers, vocab_size
    G = gates_per_unit * H
    return 6 * (H * G * (2 * L - 1) + H * V)


class GemmProbe:
    """One ?gemm on charlm's shape (rows, H) @ (H, G) through scipy's BLAS, called
    exactly as the kernels call it (gates += h @ W_hh.T, row-major, handed to
    column-major BLAS as transposes: no copies). A "step" is one call; its
    units are FLOPs, so a block's rate is FLOP/s."""

    def __init__(self, rows, H, G, dtype, rng):
        self.gemm = scipy.linalg.blas.sgemm if dtype == "float32" else scipy.linalg.blas.dgemm
        self.h = (rng.standard_normal((rows, H)) * 0.1).astype(dtype)
        self.W = (rng.standard_normal((G, H)) * 0.1).astype(dtype)
        self.gates = np.zeros((rows, G), dtype)
        self.units_per_step = 2 * rows * H * G

    def step(self):
        self.gemm(1.0, self.W.T, self.h.T, beta=1.0, c=self.gates.T, trans_a=1, overwrite_c=1)


def bench_config(cfg, ids, vocab_size, dtype, timing, torch, optimiser_api, log, threads):
    """Interleaved rounds of: K charlm steps, K' torch steps and the two sgemm
    probes, so that whatever else the machine is doing hits all four alike."""
    chunks = make_chunks(ids, cfg, N_CHUNKS)
    ours = CharlmTrainer(cfg, vocab_size, dtype, chunks, optimiser_api, threads)
    G = ours.model.config.gates
    rng = np.random.default_rng(1)
    contenders = {"charlm": ours}
    if torch is not None:
        contenders["torch"] = TorchTrainer(torch, cfg, vocab_size, dtype, chunks, ours.model)
    # Both start from the same weights, so their first losses must agree.
    first_loss = {}
    for name, trainer in contenders.items():
        with blas_context(trainer):
            first_loss[name] = float(trainer.step())
    contenders["gemm_step"] = GemmProbe(cfg.batch, cfg.hidden, G, dtype, rng)
    contenders["gemm_rows"] = GemmProbe(cfg.batch * cfg.seq, cfg.hidden, G, dtype, rng)
    steps = {name: steps_per_block(c, timing) for name, c in contenders.items()}
    rates = {name: [] for name in contenders}
    for r in range(timing.rounds):
        for name, c in contenders.items():
            time.sleep(SETTLE_SECONDS)
            done, seconds = time_block(c, steps[name], BLOCK_BUDGET * timing.block_seconds)
            rates[name].append(done * c.units_per_step / seconds)
        log(f"  round {r + 1}/{timing.rounds}: " + ", ".join(
            f"{name} {rates[name][-1]:,.0f} chars/s" for name in contenders if "gemm" not in name)
            + ", sgemm " + "/".join(f"{rates[n][-1] / 1e9:.1f}" for n in ("gemm_step", "gemm_rows"))
            + " GFLOP/s")

    medians = {name: statistics.median(v) for name, v in rates.items()}
    charlm_gflops = medians["charlm"] * flops_per_char(cfg, vocab_size, G // cfg.hidden) / 1e9
    gemm_peak = max(medians["gemm_step"], medians["gemm_rows"]) / 1e9
    return {
        "config": cfg.name, "label": cfg.label,
        "T": cfg.seq, "B": cfg.batch, "H": cfg.hidden, "L": cfg.layers, "G": G, "V": vocab_size,
        "steps_per_block": steps, "first_step_loss": first_loss,
        "rate_units": "chars/s for charlm and torch, FLOP/s for gemm_*",
        "rates_per_round": rates, "rates_median": medians,
        "ratio": medians["charlm"] / medians["torch"] if "torch" in medians else None,
        # PyTorch's rounds are bimodal on some machines (its threads run fast in some
        # blocks and ~25% slower in others); this ratio assumes its fastest round.
        "ratio_vs_best_torch": (medians["charlm"] / max(rates["torch"])
                                if "torch" in medians else None),
        "flops_per_char": flops_per_char(cfg, vocab_size, G // cfg.hidden),
        "charlm_gflops": charlm_gflops,
        "gemm_step_gflops": medians["gemm_step"] / 1e9,
        "gemm_rows_gflops": medians["gemm_rows"] / 1e9,
        "pct_of_gemm_peak": 100 * charlm_gflops / gemm_peak,
        "load_average_after": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_note(when):
    """The 1-minute load average: other processes on the machine take cores
    from both contenders, and oversubscribed BLAS threads slow down sharply."""
    load = os.getloadavg()[0]
    busy = "  <-- BUSY MACHINE: absolute rates are unreliable" if load > usable_cores() else ""
    return f"Load average ({when}): {load:.2f} on {usable_cores()} usable cores{busy}"


def header_lines(threads, thread_note, dtype, torch, data_note, optimiser_note, load_before):
    usable = usable_cores()
    versions = (f"python {platform.python_version()}, numpy {np.__version__}, "
                f"scipy {scipy.__version__}, charlm {charlm.__version__}, "
                f"torch {torch.__version__ if torch else 'not installed'}")
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    return [
        f"Machine: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable)"
        + (f", OPENBLAS_CORETYPE={coretype}" if coretype else ""),
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"Versions: {versions}",
        f"Threads: {threads} ({thread_note}"
        + (f"; torch.set_num_threads({threads}))" if torch else ")"),
        f"dtype: {dtype}; data: {data_note}; charlm optimiser: {optimiser_note}; "
        f"step = forward + mean CE + BPTT + clip {CLIP_NORM:g} + Adam lr {LEARNING_RATE:g}",
        load_before,
        load_note("after"),
    ]


def markdown_table(results):
    lines = ["| config | charlm chars/s | torch chars/s | ratio | ratio vs torch's best round "
             "| charlm GFLOP/s | % of GEMM peak | sgemm BxH@HxG GFLOP/s | sgemm TBxH@HxG GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        med = r["rates_median"]
        torch_rate = f"{med['torch']:,.0f}" if "torch" in med else "—"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        worst = f"{r['ratio_vs_best_torch']:.2f}" if r["ratio"] is not None else "—"
        lines.append(f"| {r['label']} | {med['charlm']:,.0f} | {torch_rate} | {ratio} | {worst} "
                     f"| {r['charlm_gflops']:.1f} | {r['pct_of_gemm_peak']:.0f}% "
                     f"| {r['gemm_step_gflops']:.1f} | {r['gemm_rows_gflops']:.1f} |")
    return lines


CONFIG_NAME = re.compile(r"(lstm|gru|rnn)-(\d+)x(\d+)-b(\d+)-s(\d+)")


def select_configs(names, include_all):
    """The configs named (comma-separated), each a standard one or any other
    of the form cell-LxH-bB-sT (e.g. gru-2x256-b64-s64, charlm train's
    defaults); none named: the standard ones."""
    if not names:
        return DEFAULT_CONFIGS + EXTRA_CONFIGS if include_all else DEFAULT_CONFIGS
    return [parse_config(name) for name in (n.strip() for n in names.split(",")) if name]


def parse_config(name):
    match = CONFIG_NAME.fullmatch(name)
    if match is None:
        raise UsageError(f"config {name!r} is not of the form cell-LxH-bB-sT with cell "
                         f"lstm, gru or rnn (e.g. lstm-2x128-b50-s50)")
    cell, *sizes = match.groups()
    layers, hidden, batch, seq = (int(v) for v in sizes)
    if not (1 <= layers <= 8 and 1 <= hidden <= 4096 and 1 <= batch <= 4096
            and 1 <= seq <= 4096):
        raise UsageError(f"config {name!r}: layers 1-8, hidden, batch and seq 1-4096")
    return BenchConfig(cell, layers, hidden, batch, seq)


def parse_args(argv):
    all_names = ", ".join(c.name for c in DEFAULT_CONFIGS + EXTRA_CONFIGS)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="",
                   help=f"comma-separated configs, cell-LxH-bB-sT (default: the standard "
                        f"five). Standard: {all_names}")
    p.add_argument("--all", action="store_true", help="also the small GRU/RNN configs")
    p.add_argument("--quick", action="store_true", help="few short rounds: a smoke test")
    p.add_argument("--threads", type=int, default=2, help="threads for BLAS and torch (default 2)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    p.add_argument("--json", metavar="PATH", help="also write the raw per-round numbers here")
    return p.parse_args(argv)


def run(args):
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    thread_note = limit_threads(args.threads)
    timing = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            raise UsageError("--rounds must be at least 1")
        timing = Timing(args.rounds, timing.warmup_steps, timing.warmup_seconds, timing.block_seconds)
    configs = select_configs(args.configs, args.all)
    torch = import_torch(args.threads)
    optimiser_api = charlm_optimiser_api()
    ids, vocab_size, data_note = load_ids()

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load_before = load_note("before")
    results = []
    for cfg in configs:
        log(f"{cfg.label}:")
        results.append(bench_config(cfg, ids, vocab_size, args.dtype, timing, torch,
                                    optimiser_api, log, args.threads))
    header = header_lines(args.threads, thread_note, args.dtype, torch, data_note,
                          optimiser_api[2], load_before)
    print("\n".join(header + [""] + markdown_table(results)))
    print(f"\nMedians over {timing.rounds} interleaved rounds. GFLOP/s counts matmul FLOPs only "
          "(6*(H*G*(2L-1) + H*V) per char); % of GEMM peak is against the faster of the two "
          "sgemm shapes timed through the same OpenBLAS. \"ratio vs torch's best round\" divides "
          "charlm's median by PyTorch's fastest round: the ratio if PyTorch always ran that fast.")
    if torch is None:
        print("torch is not installed: charlm's numbers only.")
    else:
        # Both start from the same weights, so their first losses must agree.
        gap = max(abs(r["first_step_loss"]["charlm"] - r["first_step_loss"]["torch"])
                  for r in results)
        print(f"Same initial weights: first-step losses agree to {gap:.1e} nats.")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"header": header, "timing": asdict(timing), "results": results}, indent=2))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
