"""GGUF files (llama.cpp), read: the metadata, the config, and the weights dequantized under Hugging Face names.

The lowest layer of the GGUF support: it knows the file, not the model or the tokenizer. `checkpoint.py` builds a
model from `weights(...)` and `tokenizer.py` builds a tokenizer from the vocabulary in `metadata(...)`.

llama.cpp's converter permutes the rows of q_proj / k_proj so that RoPE can rotate interleaved pairs (x0, x1), (x2, x3)
...; our RoPE rotates halves (x_i, x_{i + D/2}), so `unpermute_rows` puts the rows back. Q4_1 / Q8_0 / F16 tensors are
dequantized by the `gguf` package, one tensor at a time.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .config import CheckpointError, ModelConfig

TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight)$")


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` (memory-mapped); a clear error for a missing or corrupt file."""
    import gguf
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # ValueError for a bad magic, struct / index errors for a truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32(value: float) -> float:
    """The shortest decimal of a float32 (9.999999747e-06 -> 1e-05), as the original config.json wrote it."""
    return float(str(np.float32(value)))


def hf_tensor_name(gguf_name: str, source: str = "gguf") -> str:
    if gguf_name in TENSOR_NAMES:
        return TENSOR_NAMES[gguf_name]
    match = BLOCK_PATTERN.match(gguf_name)
    if match and match.group(2) in BLOCK_TENSOR_NAMES:
        return f"model.layers.{match.group(1)}.{BLOCK_TENSOR_NAMES[match.group(2)]}.{match.group(3)}"
    raise CheckpointError(f"{source}: tensor {gguf_name!r} has no counterpart in a LLaMA / Mistral model")


def config_from_gguf(reader, source: str = "gguf") -> ModelConfig:
    arch = metadata(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: unknown architecture general.architecture={arch!r}; supported: ['llama']")

    def need(key):
        value = metadata(reader, f"llama.{key}")
        if value is None:
            raise CheckpointError(f"{source}: missing metadata key 'llama.{key}'")
        return value

    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = metadata(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab_size is None:
        vocab_size = int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
    num_heads = need("attention.head_count")
    hidden = need("embedding_length")
    return ModelConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(hidden),
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=int(num_heads),
        num_kv_heads=int(metadata(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=int(metadata(reader, "llama.attention.key_length",
                              metadata(reader, "llama.rope.dimension_count", hidden // num_heads))),
        rms_norm_eps=_float32(metadata(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_float32(metadata(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(metadata(reader, "llama.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        architecture="llama",
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata(reader, "tokenizer.ggml.padding_token_id"),
    )


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows (pair j, member m) -> rows (half m, index j).

    weight [num_heads * head_dim, in]: llama.cpp stores row h*D + 2j + m = original row h*D + m*D/2 + j.
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of `unpermute_rows`), for writing test files."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def dequantized(tensor) -> torch.Tensor:
    """One GGUF tensor as float32 in Hugging Face layout ([out, in] for matrices)."""
    import gguf
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True).reshape(shape))


def weights(reader, config: ModelConfig, source: str = "gguf") -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor in HF layout) for every tensor of the file, one at a time."""
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        if tensor.name == "rope_freqs.weight":
            raise CheckpointError(f"{source}: tensor 'rope_freqs.weight' (scaled RoPE) is not supported")
        name = hf_tensor_name(tensor.name, source)
        try:
            value = dequantized(tensor)
        except (NotImplementedError, ValueError) as err:
            raise CheckpointError(f"{source}: tensor {tensor.name!r}: cannot dequantize "
                                  f"{tensor.tensor_type.name} ({err})") from None
        if name.endswith("q_proj.weight"):
            value = unpermute_rows(value, config.num_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_rows(value, config.num_kv_heads)
        yield name, value
