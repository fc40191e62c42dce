"""How far back can each cell remember? The copy task over a grid of cells and lags.

Every cell of the table is `charlm task copy --lag L --cell C` with one fixed
budget (the same steps, batch, hidden size, optimiser and learning rate for
all), run for each seed: held-out accuracy at the answer, against chance 1/8,
and the seconds the runs took. Besides the cells as `charlm task` trains them
(global-norm clipping at 1), the tanh RNN also runs without clipping and with
element-wise value clipping, to show what clipping changes for it.

The runs are independent, so they go to a pool of worker processes (--jobs),
each with one BLAS thread (models this small only lose from more).

Run from the repository root (charlm built in place):
    python benchmarks/lag_table.py                       # the README's table, ~3-5 min
    python benchmarks/lag_table.py --lags 10,40 --seeds 1 --steps 500   # a quick look
    python benchmarks/lag_table.py --json lag_table.json # + every run's figures
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))   # use the charlm of this checkout

from charlm.model import CELLS       # noqa: E402  (after the path set-up above)
from charlm.tasks import TaskOptions, run_task   # noqa: E402

DEFAULTS = TaskOptions()
CLIP_VALUE = 0.01        # the value-clipping row: each gradient element to [-0.01, 0.01]
SOLVED = 0.9             # accuracy counted as "solved" in the summary line of a row


def table_rows():
    """(label, cell, clip_norm, clip_value) for each row of the table."""
    rows = [(f"rnn (tanh), clip-norm {DEFAULTS.clip_norm:g}", "rnn", DEFAULTS.clip_norm, 0.0),
            ("rnn (tanh), no clipping", "rnn", 0.0, 0.0),
            (f"rnn (tanh), clip-value {CLIP_VALUE:g}", "rnn", 0.0, CLIP_VALUE)]
    for cell in ("lstm", "gru", "lstm-peephole"):
        if cell in CELLS:            # the peephole LSTM, once the model has it
            rows.append((f"{cell}, clip-norm {DEFAULTS.clip_norm:g}", cell,
                         DEFAULTS.clip_norm, 0.0))
    return rows


def _run(options):
    """One run in a worker: the result as a plain dict (picklable, JSON-able)."""
    return run_task(options).to_dict()


def run_grid(args):
    """Every (row, lag, seed) run, longest first so the pool ends together.
    Returns {(label, lag): [result dicts, one per seed]}."""
    jobs = []
    for label, cell, clip_norm, clip_value in table_rows():
        for lag in args.lags:
            for seed in range(args.seeds):
                options = TaskOptions(task="copy", lag=lag, cell=cell, hidden=args.hidden,
                                      steps=args.steps, batch_size=args.batch_size,
                                      lr=args.lr, optimizer=args.optimizer,
                                      clip_norm=clip_norm, clip_value=clip_value, seed=seed,
                                      eval_sequences=args.eval_sequences, threads=1).validate()
                jobs.append(((label, lag), options))
    jobs.sort(key=lambda job: -job[1].lag * (1 if job[1].cell == "rnn" else 3))
    results = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_run, options): key for key, options in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            key, result = futures[future], future.result()
            results.setdefault(key, []).append(result)
            print(f"[{done}/{len(jobs)}] {key[0]}, lag {key[1]}, seed {result['seed']}: "
                  f"accuracy {result['accuracy']:.3f} ({result['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
    return results


def markdown_table(results, lags):
    """Rows: cell and clipping; columns: lags. A table cell: the mean held-out
    accuracy over seeds, each seed's in brackets when there are several, and
    the seconds the runs took together."""
    lines = ["| cell | " + " | ".join(f"lag {lag}" for lag in lags) + " |",
             "|---|" + "---:|" * len(lags)]
    for label, *_ in table_rows():
        cells = []
        for lag in lags:
            runs = sorted(results[(label, lag)], key=lambda r: r["seed"])
            accuracies = [r["accuracy"] for r in runs]
            text = f"{sum(accuracies) / len(accuracies):.2f}"
            if len(runs) > 1:
                text += " (" + "/".join(f"{a:.2f}" for a in accuracies) + ")"
            text += f", {sum(r['seconds'] for r in runs):.0f} s"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args, wall_seconds):
    command = "python benchmarks/lag_table.py " + " ".join(sys.argv[1:])
    seeds = "seed 0" if args.seeds == 1 else f"the mean of seeds 0..{args.seeds - 1}"
    return "\n".join([
        f"<!-- {command.strip()} -->",
        f"Copy task, held-out accuracy at the answer over {args.eval_sequences} sequences "
        f"per run (chance 0.125), {seeds}; "
        f"1 layer x {args.hidden} units, {args.steps} steps of batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr:g}. "
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{args.jobs} worker(s) x 1 thread, {wall_seconds / 60:.1f} min in all.",
    ])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lags", type=lambda s: [int(v) for v in s.split(",")],
                   default=[5, 10, 20, 40, 80], help="comma-separated lags")
    p.add_argument("--seeds", type=int, default=2, help="runs per table cell: seeds 0..n-1")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--hidden", type=int, default=DEFAULTS.hidden)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--optimizer", default=DEFAULTS.optimizer)
    p.add_argument("--eval-sequences", type=int, default=DEFAULTS.eval_sequences)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    results = run_grid(args)
    wall = time.perf_counter() - start
    print(header(args, wall))
    print()
    print(markdown_table(results, args.lags))
    if args.json:
        flat = [run for runs in results.values() for run in runs]
        args.json.write_text(json.dumps(flat, indent=1))


if __name__ == "__main__":
    main()
