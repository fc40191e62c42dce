"""SIGKILL a real `charlm train` again and again; count the runs that lost anything.

    python benchmarks/kill_test.py --kills 200           # the figure in the README
    python benchmarks/kill_test.py --kills 25 --seed 3   # what CI runs (tests/test_crash_safety.py)

One run is: start `charlm train` (resuming the checkpoint when there is one),
let it train, and SIGKILL it. The run checkpoints at every step, so the
checkpoint, the best weights and the metrics line are written over and over;
half of the kills wait for a checkpoint's temporary file to appear and land
while it is being written, the other half come at a random moment (start-up,
corpus preparation, a step, a save). The dead process gets no chance to
clean up, which is the point.

After each kill the run has lost something if
  - the checkpoint does not load (charlm.checkpoint.load validates everything),
  - it holds an earlier step than the checkpoint the run started from,
  - the best-weights file, once there, does not load,
  - a metrics line is not JSON, or the steps in the log are not increasing,
  - or the resumed run that comes next fails to start.
The report counts those runs; the guarantee is that the count is 0. It also
counts the kills that landed inside a checkpoint write (a new temporary file
is left behind: only a killed writer leaves one), and checks that later saves
clean those up. At the end the run resumes once more to a fixed step and must
get there.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from charlm import checkpoint  # noqa: E402

TEXT = "abcdefgh ijklmnop qrstuvwx yz.\n" * 200
# Big enough that a checkpoint (weights + Adam moments, ~0.3 MB) takes a
# moment to write, small enough that a step is a few milliseconds.
TRAIN_OPTIONS = ["--hidden", "64", "--layers", "1", "--batch-size", "4", "--seq-length", "8",
                 "--max-epochs", "0", "--eval-every", "1", "--sample-every", "0",
                 "--no-progress", "--threads", "1"]
START_TIMEOUT = 60.0        # seconds for a run to reach its first save
RANDOM_DELAY = (0.0, 1.5)   # seconds after start for a random kill (start-up takes ~1 s)
SAVES_BEFORE_KILL = (1, 6)  # a kill in a write waits for this many saves to begin
# The processes run this checkout's charlm, whatever is installed.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


@dataclass
class KillReport:
    kills: int = 0
    in_write: int = 0                            # kills that left a new temp file
    lost: list = field(default_factory=list)     # one description per run that lost anything
    final_step: int = 0
    stale_temp_files: int = 0                    # of the checkpoint, left at the very end

    def summary(self):
        return (f"{self.kills} SIGKILLs ({self.in_write} during a checkpoint write): "
                f"{len(self.lost)} runs lost anything; final step {self.final_step}; "
                f"{self.stale_temp_files} stale temp files left")


def run_kills(workdir, kills, seed=0, log=None):
    """Kill `kills` training runs in `workdir`; return a KillReport."""
    workdir = Path(workdir)
    corpus = workdir / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = workdir / "m.safetensors"
    rng = random.Random(seed)
    report = KillReport()
    last_step = 0
    for attempt in range(kills):
        during_write = attempt % 2 == 1
        temps_before = _temp_files(workdir)
        process = subprocess.Popen(_command(corpus, out, resume=out.exists()),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        if during_write:
            _wait_for_saves(process, workdir, temps_before, rng.randint(*SAVES_BEFORE_KILL))
        else:
            _sleep_while_running(process, rng.uniform(*RANDOM_DELAY))
        exited_by_itself = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        stderr = process.communicate()[1].decode(errors="replace").strip()
        report.kills += 1
        if _temp_files(workdir) - temps_before:
            report.in_write += 1
        problem = _problem_after_kill(workdir, out, last_step)
        if exited_by_itself:
            problem = f"the run stopped by itself (exit {process.returncode}): {stderr}"
        if problem:
            report.lost.append(f"kill {attempt + 1}: {problem}")
        elif out.exists():
            last_step = _step(out)
        if log:
            log(f"kill {attempt + 1:>4}/{kills} {'in a write' if during_write else 'at random '}"
                f" -> step {last_step}{'  LOST: ' + problem if problem else ''}")
    report.final_step = _finish(corpus, out, last_step, report)
    report.stale_temp_files = len(_temp_files(workdir, out.name))
    return report


def _command(corpus, out, resume):
    command = [sys.executable, "-m", "charlm", "train", str(corpus), "--out", str(out)]
    if resume:
        command += ["--resume", str(out)]
    return command + TRAIN_OPTIONS


def _temp_files(directory, target=None):
    """Names of charlm's temporary files in `directory` (of one target, if given)."""
    name = re.escape(target) if target else r".+"
    pattern = re.compile(rf"\.{name}\.[0-9a-f]{{12}}\.tmp")
    return {entry for entry in os.listdir(directory) if pattern.fullmatch(entry)}


def _wait_for_saves(process, directory, before, saves):
    """Return as soon as this process has begun its `saves`-th save (created
    that save's temp file), so that the kill lands inside the write."""
    seen = set()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        seen |= _temp_files(directory) - before
        if len(seen) >= saves:
            return
        # no sleep: a save lasts only milliseconds


def _sleep_while_running(process, seconds):
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def _step(path):
    return checkpoint.load(str(path)).meta["progress"]["step"]


def _problem_after_kill(workdir, out, last_step):
    """What this kill broke, or None."""
    if not out.exists():
        return None if last_step == 0 else "the checkpoint is gone"
    try:
        step = _step(out)
    except Exception as error:      # anything at all: that is what is being counted
        return f"the checkpoint does not load: {error}"
    if step < last_step:
        return f"the checkpoint went back from step {last_step} to {step}"
    best = workdir / "m.best.safetensors"
    if best.exists():
        try:
            checkpoint.load(str(best))
        except Exception as error:
            return f"the best weights do not load: {error}"
    return _metrics_problem(workdir / "m.metrics.jsonl")


def _metrics_problem(path):
    if not path.exists():
        return None
    steps = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return f"metrics line {number} is not a JSON record: {line[:80]!r}"
    if any(b <= a for a, b in zip(steps, steps[1:])):
        return "the steps in the metrics log are not increasing"
    return None


def _finish(corpus, out, last_step, report):
    """Resume once more to a fixed step; that must work. Returns the step reached."""
    if not out.exists():
        report.lost.append("no checkpoint was ever written")
        return 0
    target = last_step + 2
    finish = subprocess.run(_command(corpus, out, resume=True) + ["--max-steps", str(target)],
                            capture_output=True, text=True, timeout=300, env=ENV)
    if finish.returncode != 0:
        report.lost.append(f"the final resume failed (exit {finish.returncode}): "
                           f"{finish.stderr.strip()}")
        return last_step
    step = _step(out)
    if step != target:
        report.lost.append(f"the final resume ended at step {step}, not {target}")
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="charlm-kill-") as workdir:
        started = time.perf_counter()
        report = run_kills(workdir, args.kills, args.seed, log=None if args.quiet else print)
        print(report.summary() + f" ({time.perf_counter() - started:.0f} s)")
        for problem in report.lost:
            print("  " + problem)
    sys.exit(1 if report.lost or report.stale_temp_files else 0)


if __name__ == "__main__":
    main()
