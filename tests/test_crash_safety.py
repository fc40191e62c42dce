"""SIGKILL at random moments never costs the last checkpoint.

A real `charlm train` process checkpoints at every step (so kills land during
writes as often as between them) and is killed with SIGKILL after a random
delay, again and again. After every kill the checkpoint must load, hold a
step no earlier than before, and a resumed run must continue from it.
"""

import random
import signal
import subprocess
import sys
import time

from charlm import checkpoint

KILLS = 8
TEXT = "abcdefgh ijklmnop qrstuvwx yz.\n" * 400


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "m.safetensors"
    command = [sys.executable, "-m", "charlm", "train", str(corpus), "--out", str(out),
               "--hidden", "16", "--batch-size", "4", "--seq-length", "8", "--max-epochs", "0",
               "--eval-every", "1", "--sample-every", "0", "--no-progress", "--threads", "1"]
    rng = random.Random(1234)
    lost, last_step = 0, 0
    for attempt in range(KILLS):
        args = command if not out.exists() else command[:5] + ["--resume", str(out)] + command[5:]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # let it start (imports, corpus) and then kill it somewhere in its steps
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
        process.send_signal(signal.SIGKILL)
        process.wait()
        try:
            step = checkpoint.load(str(out)).meta["progress"]["step"]
        except Exception:
            lost += 1
            continue
        if step < last_step:
            lost += 1
        last_step = step
    assert lost == 0
    assert last_step > 0
    # and the run continues from the last checkpoint
    finish = subprocess.run(command[:5] + ["--resume", str(out), "--max-steps",
                                           str(last_step + 2)] + command[5:],
                            capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr
    assert checkpoint.load(str(out)).meta["progress"]["step"] == last_step + 2
