"""OpenMP's wait policy for training processes. Torch-free: it must act before torch (and its libgomp) loads.

After each parallel region GNU OpenMP's idle team threads spin, by default for about 10 ms on this machine (a
2-thread matmul followed by a sleep burns 10 ms of CPU). The CPU attention runs documents on Python worker threads
beside that team (kernels/cpu_attention.py), so right after the q/k/v projections a spinning team thread shares a
core with a worker: 3 busy threads on 2 cores. OMP_WAIT_POLICY=PASSIVE makes idle team threads sleep at once.

Measured on the benchmark workload (SmolLM2-135M, LoRA r16, 4 x 512 tokens, 1 process, 2 threads; one process per
run, runs alternating): the engine's step used 2.5-9% fewer CPU seconds (18.4 -> 17.9 s on a quiet machine, 20.3
-> 18.4 on a loaded one, there with GOMP_SPINCOUNT=0, the spin count the passive policy sets); its wall time was
unchanged when the machine was quiet and 4-6% lower when loaded. transformers + peft, which has no worker threads,
gains nothing from it (12.0-12.3 s/step by default, 12.4-12.6 passive, three runs each).
"""
import os

WAIT_POLICY = "PASSIVE"


def prefer_passive_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment sets a policy; it takes effect only when torch loads later
    in this process (libgomp reads it once), and in the processes this one starts."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
