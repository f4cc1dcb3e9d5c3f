"""Faults injected on purpose, for the fault-tolerance tests only; each is off unless its variable is set.

HIPPO_FAULT_NAN_STEP=N         the loss of optimizer step N becomes NaN
HIPPO_FAULT_RAISE=R:N          rank R raises a RuntimeError at step N
HIPPO_FAULT_SAVE_PAUSE=N:S     the checkpoint save of step N sleeps S seconds after writing its files, before the
                               commit (a window in which to kill the process mid-save)
HIPPO_FAULT_STEP_PAUSE=S       every step sleeps S seconds (a window in which to signal a running job)
"""
import os
import sys
import time


def _pair(name: str):
    value = os.environ.get(name)
    if not value:
        return None
    first, _, second = value.partition(":")
    return int(first), float(second)


def poison_loss(step: int, loss):
    if os.environ.get("HIPPO_FAULT_NAN_STEP") == str(step):
        return loss * float("nan")
    return loss


def maybe_raise(step: int, rank: int):
    target = _pair("HIPPO_FAULT_RAISE")
    if target and target[0] == rank and int(target[1]) == step:
        raise RuntimeError(f"injected failure on rank {rank} at step {step} (HIPPO_FAULT_RAISE)")


def pause_during_save(step: int):
    target = _pair("HIPPO_FAULT_SAVE_PAUSE")
    if target and target[0] == step:
        print(f"checkpoint step {step}: files written, pausing {target[1]} s before the commit", file=sys.stderr,
              flush=True)
        time.sleep(target[1])


def pause_step():
    seconds = os.environ.get("HIPPO_FAULT_STEP_PAUSE")
    if seconds:
        time.sleep(float(seconds))
