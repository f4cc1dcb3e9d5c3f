"""End to end: one training step of a tiny LLaMA/Mistral with LoRA gives the same loss and gradients with every
op on the Triton side (the interpreter on CPU), or on the native side (the CPU's fused C kernels), as with every op
on the torch side."""
import pytest
import torch

from hippocrates.kernels import ops
from hippocrates.models.config import ModelConfig
from hippocrates.models.lora import LoraConfig, add_lora, lora_layers
from hippocrates.models.transformer import Transformer

TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=32, max_position_embeddings=64)


def build(config, lora_rank):
    model = Transformer(config).init_weights(std=0.1, seed=0)
    if lora_rank:
        add_lora(model, LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank), seed=1)
        generator = torch.Generator().manual_seed(2)
        for _, layer in lora_layers(model):  # nonzero B, so every adapter gradient is nonzero
            layer.lora_b.data.copy_(torch.randn(layer.lora_b.shape, generator=generator) * 0.1)
    return model


SIDE_OPS = {
    "triton": {"rmsnorm": "rms_norm_triton", "flash_attention": "attention_triton", "rope": "apply_rope_triton",
               "activation": "swiglu_triton", "cross_entropy": "fused_linear_cross_entropy_triton"},
    "native": {"rmsnorm": "rms_norm_native", "rope": "apply_rope_native", "activation": "swiglu_native",
               "cross_entropy": "fused_linear_cross_entropy_native"},
}


def spy_on_side_ops(monkeypatch, side, lora=True):
    """Count calls of every op's entry point on that side, so the test knows the side really ran."""
    import importlib
    calls = {}
    ops = dict(SIDE_OPS[side], **({"lora": "lora_linear_triton"} if lora and side == "triton" else {}))
    for module_name, fn_name in ops.items():
        module = importlib.import_module(f"hippocrates.kernels.{module_name}")
        real = getattr(module, fn_name)
        calls[fn_name] = 0

        def counted(*args, _real=real, _name=fn_name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, fn_name, counted)
    return calls


def step(model, input_ids, segment_ids):
    """Next-token loss through the fused LM head; returns the loss and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids, segment_ids=segment_ids, return_hidden=True)  # [B, T, H]
    labels = input_ids[:, 1:].clone()
    labels[:, :3] = -100  # a masked prompt
    loss = ops.fused_linear_cross_entropy(hidden[:, :-1], model.output_weight, labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config,lora_rank,packed", [
    (TINY, 4, False),
    (TINY, 4, True),
    (TINY.replace(sliding_window=6, architecture="mistral"), 4, True),
    (TINY.replace(tie_word_embeddings=True), 0, False),
])
@pytest.mark.parametrize("side", SIDE_OPS)
def test_step_matches_torch_step(side, config, lora_rank, packed, monkeypatch):
    model = build(config, lora_rank)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, config.vocab_size, (2, 19), generator=generator)
    segment_ids = torch.tensor([[0] * 7 + [1] * 12, [0] * 3 + [1] * 9 + [2] * 7]) if packed else None

    monkeypatch.setenv("HIPPO_KERNELS", "torch")
    loss_torch, grads_torch = step(model, input_ids, segment_ids)
    monkeypatch.setenv("HIPPO_KERNELS", side)
    calls = spy_on_side_ops(monkeypatch, side, lora=lora_rank > 0)
    loss_side, grads_side = step(model, input_ids, segment_ids)
    assert all(calls.values()), f"{side} ops never called: {[name for name, n in calls.items() if not n]}"

    assert torch.isfinite(loss_torch)
    assert abs(loss_side.item() - loss_torch.item()) <= 1e-5 * abs(loss_torch.item())
    assert grads_torch.keys() == grads_side.keys() and grads_torch
    for name, expected in grads_torch.items():
        error = (grads_side[name] - expected).abs().max().item()
        scale = expected.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the check would be vacuous"
        assert error <= 1e-4 * scale, f"{name}: max error {error:.3g} vs max|grad| {scale:.3g}"
