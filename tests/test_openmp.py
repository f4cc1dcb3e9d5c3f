"""The training command line sets OpenMP's passive wait policy before torch loads (engine/openmp.py)."""
import os
import subprocess
import sys

IDLE_CPU_PROBE = """
import time
import hippocrates.train.cli  # sets the policy, then loads torch
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
worst = 0.0
for _ in range(3):
    a @ a  # a parallel region: afterwards the team threads are idle
    started = time.process_time()  # CPU seconds of every thread of the process
    time.sleep(0.2)
    worst = max(worst, time.process_time() - started)
print(worst)
"""


def test_idle_openmp_threads_do_not_spin_in_a_training_process():
    # GNU OpenMP's default spins about 10 ms after each region on the project's machines; passive sleeps at once
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", IDLE_CPU_PROBE], capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="2"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 0.003


def test_an_explicit_policy_is_kept():
    probe = "import os, hippocrates.train.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.split()[-1] == "ACTIVE", done.stderr[-2000:]
