"""benchmarks/cpu_sides.py: its reference side really runs the references, and they agree with the torch side."""
import pytest
import torch

from hippocrates.benchmarks import cpu_sides
from hippocrates.kernels.test_model_step import TINY, build, step


def test_reference_side_runs_no_torch_side_and_matches_it(monkeypatch):
    model = build(TINY, lora_rank=4)
    input_ids = torch.randint(0, TINY.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("HIPPO_KERNELS", "torch")
    loss_torch, grads_torch = step(model, input_ids, None)

    def refuse(*args, **kwargs):
        raise AssertionError("a torch side ran inside the reference side")
    for module, name in cpu_sides.torch_sides():
        monkeypatch.setattr(module, f"{name}_torch", refuse)
    with cpu_sides._references_as_torch_paths(True):
        loss_reference, grads_reference = step(model, input_ids, None)
    with pytest.raises(AssertionError, match="torch side ran"):  # and the context put the torch sides back
        step(model, input_ids, None)

    assert loss_reference.item() == pytest.approx(loss_torch.item(), rel=1e-5)
    assert grads_reference.keys() == grads_torch.keys()
    for name, expected in grads_torch.items():
        torch.testing.assert_close(grads_reference[name], expected, rtol=1e-4, atol=1e-6, msg=name)
