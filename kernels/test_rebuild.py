"""kernels/rebuild.py: activations rebuilt in the backward give the same gradients as kept ones, and are not kept."""
import gc
import weakref

import pytest
import torch

from hippocrates.kernels import activation, rebuild
from hippocrates.kernels.test_model_step import TINY, build, step


def set_rebuild(model, enabled):
    for block in model.model.layers:
        block.rebuild_activations = enabled


def count_rebuilds(monkeypatch):
    """Count the recipes actually rerun (not the cached reuses)."""
    counts = {"rebuilt": 0}
    real = rebuild._Recipe.rebuild

    def counted(self):
        counts["rebuilt"] += self.value is None
        return real(self)
    monkeypatch.setattr(rebuild._Recipe, "rebuild", counted)
    return counts


def inputs(packed):
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, TINY.vocab_size, (2, 19), generator=generator)
    segment_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 3 + [1] * 9 + [2] * 7]) if packed else None
    return input_ids, segment_ids


@pytest.mark.parametrize("side,packed", [("torch", False), ("torch", True), ("triton", True)])
def test_rebuilt_activations_give_bitwise_equal_gradients(side, packed, monkeypatch):
    monkeypatch.setenv("HIPPO_KERNELS", side)
    model = build(TINY, 4)
    input_ids, segment_ids = inputs(packed)
    set_rebuild(model, False)
    loss_kept, grads_kept = step(model, input_ids, segment_ids)
    set_rebuild(model, True)
    counts = count_rebuilds(monkeypatch)
    loss_rebuilt, grads_rebuilt = step(model, input_ids, segment_ids)

    # per block: both norm outputs and the SwiGLU output (the attention output is kept: its backward needs it)
    assert counts["rebuilt"] == TINY.num_layers * 3
    assert torch.equal(loss_kept, loss_rebuilt)
    assert grads_kept.keys() == grads_rebuilt.keys() and grads_kept
    for name, expected in grads_kept.items():
        assert expected.abs().max() > 0, f"{name}: zero gradient, the check would be vacuous"
        assert torch.equal(grads_rebuilt[name], expected), f"{name}: gradients differ"


def test_swiglu_backward_reuses_the_rebuilt_silu(monkeypatch):
    """Bitwise equality with the kept path is the test above; here: each layer's SwiGLU backward got the rebuild's
    silu(gate) instead of computing it again."""
    monkeypatch.setenv("HIPPO_KERNELS", "torch")
    taken = []
    real = activation.SharedSilu.take
    monkeypatch.setattr(activation.SharedSilu, "take", lambda self: taken.append(real(self)) or taken[-1])
    step(build(TINY, 4), *inputs(False))
    assert len(taken) == TINY.num_layers and all(silu is not None for silu in taken)


@pytest.mark.parametrize("enabled", [False, True])
def test_marked_activation_is_not_kept_for_the_backward(enabled, monkeypatch):
    monkeypatch.setenv("HIPPO_KERNELS", "torch")
    model = build(TINY, 4)
    set_rebuild(model, enabled)
    refs = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(args[0])))
    input_ids, _ = inputs(False)
    loss = model(input_ids).sum()
    gc.collect()
    assert (refs[0]() is None) == enabled  # the SwiGLU output: alive only while autograd keeps it
    loss.backward()


def test_scope_is_off_without_grad():
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad(), rebuild.rebuild_scope():
        rebuild.rebuild_in_backward(x * 2, lambda: None)
        assert not rebuild._scopes


def test_scratch_output_reuses_one_storage_inside_a_scope_only():
    assert rebuild.scratch_output("test", (3, 4), torch.float32, "cpu") is None  # no scope: the op allocates
    with rebuild.rebuild_scope():
        small = rebuild.scratch_output("test", (3, 4), torch.float32, "cpu")
        large = rebuild.scratch_output("test", (5, 8), torch.float32, "cpu")  # grows the storage
        again = rebuild.scratch_output("test", (2, 8), torch.float32, "cpu")
        other = rebuild.scratch_output("other", (2, 8), torch.float32, "cpu")
    assert small.shape == (3, 4) and large.shape == (5, 8) and again.shape == (2, 8)
    assert again.data_ptr() == large.data_ptr() != other.data_ptr()
    assert again is not large and again.grad_fn is None  # a new tensor object over the same memory
