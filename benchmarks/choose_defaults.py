"""Pick `charlm train`'s defaults by measurement: which configuration gives
the best validation bits per character after a fixed wall-clock budget on a
~1 MB text, on this machine's cores?

    python benchmarks/choose_defaults.py --minutes 4            # tiny-shakespeare
    python benchmarks/choose_defaults.py --corpus my.txt --minutes 10

Each candidate trains from scratch with `charlm train`'s own code (validation
= the last 10%, evaluated exactly as `charlm eval` does), one after another
so they do not compete for the cores. The time budget includes the periodic
validation passes, as a user's run would. Prints a markdown table.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
sys.path.insert(0, str(REPO_ROOT))

from charlm.train import Trainer, TrainOptions  # noqa: E402

CANDIDATES = {
    "lstm 2x128 b50 s50": dict(cell="lstm", layers=2, hidden=128, batch_size=50, seq_length=50),
    "lstm 2x256 b64 s64": dict(cell="lstm", layers=2, hidden=256, batch_size=64, seq_length=64),
    "lstm 2x512 b32 s64": dict(cell="lstm", layers=2, hidden=512, batch_size=32, seq_length=64),
    "gru 2x256 b64 s64": dict(cell="gru", layers=2, hidden=256, batch_size=64, seq_length=64),
}


def run(corpus, name, changes, seconds, eval_every):
    with tempfile.TemporaryDirectory() as work:
        options = TrainOptions(max_time=seconds, eval_every=eval_every, sample_every=0,
                               **changes)
        trainer = Trainer(corpus, os.path.join(work, "m.safetensors"), options,
                          echo=lambda *a: None, progress_bar=False)
        started = time.perf_counter()
        progress = trainer.run()
        wall = time.perf_counter() - started
    last = progress.history[-1]
    return {"name": name, "steps": progress.step, "wall_s": round(wall, 1),
            "chars_per_sec": last.get("chars_per_sec"),
            "best_val_bpc": progress.best_val_nats / 0.6931471805599453,
            "final_train_bpc": last.get("train_bpc"), "history": progress.history}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(DATA_FILE))
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--evals", type=int, default=6, help="validation passes per run (about)")
    parser.add_argument("--only", nargs="*", help="candidate names to run")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    if not os.path.exists(args.corpus):
        sys.exit(f"{args.corpus} not found; pass --corpus")
    results = []
    for name, changes in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        # a short probe to size eval_every so that about --evals passes fit the budget
        probe = run(args.corpus, name, changes, 15, 10**6)
        step_s = 15 / max(probe["steps"], 1)
        eval_every = max(10, int(args.minutes * 60 / step_s / args.evals))
        result = run(args.corpus, name, changes, args.minutes * 60, eval_every)
        results.append(result)
        print(f"{name}: best val {result['best_val_bpc']:.4f} bpc after {result['steps']} steps",
              flush=True)
    print(f"\n| config ({args.minutes:g} min, {os.cpu_count()} cores) | steps | train char/s "
          f"| best val bpc | last train bpc |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['steps']} | {r['chars_per_sec']:,.0f} | "
              f"{r['best_val_bpc']:.4f} | {r['final_train_bpc']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
