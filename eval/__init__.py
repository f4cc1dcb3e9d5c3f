"""Log-likelihood evaluation of multiple-choice tasks (MedQA, MedMCQA, PubMedQA, or any set from a spec file)."""
from .evaluator import evaluate
from .records import EvalError
from .tasks import BUILTIN_TASKS, TaskSpec, load_spec, load_task

__all__ = ["BUILTIN_TASKS", "EvalError", "TaskSpec", "evaluate", "load_spec", "load_task"]
