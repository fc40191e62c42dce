"""Time to quality: the best validation loss each configuration reaches in a
fixed wall-clock budget on a ~1 MB text, on this machine's cores. It is how
`charlm train`'s defaults and the README's recommended settings are chosen.

    python benchmarks/time_to_quality.py                       # 10 min each, tiny-shakespeare
    python benchmarks/time_to_quality.py --minutes 4 --only gru-2x256
    python benchmarks/time_to_quality.py --corpus my.txt --minutes 10 --json ttq.json

Each candidate trains from scratch with `charlm train`'s own code (the
Trainer), validation = the last 10% of the file (as nanoGPT splits
tiny-shakespeare), scored exactly as `charlm eval` scores it. Candidates run
one after another, so they do not compete for the cores. The budget is wall
clock and includes the periodic validation passes, as a user's run would.

Schedules that decay to a floor (cosine) need a step count: a 20-second probe
of each candidate measures its step rate, and the decay is laid over the
steps that fit the budget after the validation passes. The target line is
issue 5's: at most 1.47 nats per character (2.12 bits) in 10 minutes.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
sys.path.insert(0, str(REPO_ROOT))

from charlm.evaluate import LOG2_E  # noqa: E402
from charlm.train import Trainer, TrainOptions  # noqa: E402

TARGET_NATS = 1.47
PROBE_SECONDS = 20

CANDIDATES = {
    "gru-2x256": dict(cell="gru", layers=2, hidden=256, batch_size=64, seq_length=64),
    "gru-2x256-cosine": dict(cell="gru", layers=2, hidden=256, batch_size=64, seq_length=64,
                             schedule="cosine", lr=3e-3),
    "gru-2x256-cosine-dropout": dict(cell="gru", layers=2, hidden=256, batch_size=64,
                                     seq_length=64, schedule="cosine", lr=3e-3, dropout=0.2),
    "gru-2x384-cosine": dict(cell="gru", layers=2, hidden=384, batch_size=64, seq_length=64,
                             schedule="cosine", lr=3e-3, dropout=0.1),
    "gru-2x384-cosine-dropout": dict(cell="gru", layers=2, hidden=384, batch_size=64,
                                     seq_length=64, schedule="cosine", lr=3e-3, dropout=0.2),
    "lstm-2x256-cosine": dict(cell="lstm", layers=2, hidden=256, batch_size=64, seq_length=64,
                              schedule="cosine", lr=3e-3),
    "lstm-2x512-cosine": dict(cell="lstm", layers=2, hidden=512, batch_size=32, seq_length=64,
                              schedule="cosine", lr=2e-3, dropout=0.1),
    "gru-2x512-cosine-dropout": dict(cell="gru", layers=2, hidden=512, batch_size=64,
                                     seq_length=64, schedule="cosine", lr=2e-3, dropout=0.2),
    "lstm-2x512-cosine-dropout": dict(cell="lstm", layers=2, hidden=512, batch_size=64,
                                      seq_length=64, schedule="cosine", lr=2e-3, dropout=0.2),
}


def train(corpus, changes, seconds, eval_every, max_steps=0):
    """One run from scratch; returns (Progress, wall seconds)."""
    with tempfile.TemporaryDirectory() as work:
        options = TrainOptions(max_time=seconds, eval_every=eval_every, sample_every=0,
                               max_epochs=0, max_steps=max_steps, **changes)
        trainer = Trainer(corpus, os.path.join(work, "m.safetensors"), options,
                          echo=lambda *a: None, progress_bar=False)
        started = time.perf_counter()
        progress = trainer.run()
        return progress, time.perf_counter() - started


def plan(corpus, changes, seconds, evals):
    """Probe the step rate; return (eval_every, max_steps for the schedule)."""
    probe, wall = train(corpus, dict(changes, schedule="constant"), PROBE_SECONDS, 1 << 20)
    step_s = probe.history[-1]["train_seconds"] / max(probe.step, 1)
    eval_s = max(wall - probe.history[-1]["train_seconds"], 0.0)     # one validation pass
    steps = max(int((seconds - evals * eval_s) / step_s), evals)
    return max(steps // evals, 1), steps


def run(corpus, name, changes, seconds, evals):
    eval_every, steps = plan(corpus, changes, seconds, evals)
    decays = changes.get("schedule", "constant") != "constant"
    progress, wall = train(corpus, changes, seconds, eval_every, steps if decays else 0)
    last = progress.history[-1]
    best = progress.best_val_nats
    return {"name": name, "options": changes, "steps": progress.step,
            "planned_steps": steps, "wall_s": round(wall, 1),
            "chars_per_sec": last.get("chars_per_sec"),
            "best_val_nats": best, "best_val_bpc": best * LOG2_E,
            "last_train_nats": last.get("train_nats"),
            "history": progress.history}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(DATA_FILE))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--evals", type=int, default=8, help="validation passes per run (about)")
    parser.add_argument("--only", nargs="*", choices=sorted(CANDIDATES),
                        help="candidate names to run (default: all)")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    if not os.path.exists(args.corpus):
        sys.exit(f"{args.corpus} not found; pass --corpus")
    results = []
    for name, changes in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        result = run(args.corpus, name, changes, args.minutes * 60, args.evals)
        results.append(result)
        print(f"{name}: best val {result['best_val_nats']:.4f} nats "
              f"({result['best_val_bpc']:.4f} bpc) after {result['steps']} steps", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.minutes:g} min per "
          f"run, target <= {TARGET_NATS} nats\n")
    print("| config | steps | train char/s | best val nats | best val bpc | last train nats "
          "| target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        hit = "yes" if r["best_val_nats"] <= TARGET_NATS else "no"
        print(f"| {r['name']} | {r['steps']:,} | {r['chars_per_sec']:,.0f} | "
              f"{r['best_val_nats']:.4f} | {r['best_val_bpc']:.4f} | "
              f"{r['last_train_nats']:.4f} | {hit} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if any(math.isfinite(r["best_val_nats"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
