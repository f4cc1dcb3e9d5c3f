"""GGUF files (llama.cpp) in: dequantized weights under Hugging Face names, the config, and the tokenizer.

llama.cpp's converter permutes the rows of q_proj / k_proj so that RoPE can rotate interleaved pairs (x0, x1), (x2, x3)
...; our RoPE rotates halves (x_i, x_{i + D/2}), so `unpermute_rows` puts the rows back. Q4_1 / Q8_0 / F16 tensors are
dequantized by the `gguf` package, one tensor at a time, straight into the model's parameters.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import build_model
from .config import CheckpointError, ModelConfig
from .tokenizer import (HFTokenizer, TokenizerError, sentencepiece_to_tokenizers)

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

# llama.cpp pre-tokenizer names of byte-level BPE vocabularies: digits split one by one, then GPT-2's regex.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact"}
GPT2_PRE = {"gpt2", "default"}


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


@torch.no_grad()
def model_from_gguf(reader, dtype=torch.float32, device="cpu", source: str = "gguf"):
    config = config_from_gguf(reader, source)
    model = build_model(config, dtype, device)
    targets = dict(model.state_dict(keep_vars=True))
    loaded = set()
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        if tensor.name == "rope_freqs.weight":
            raise CheckpointError(f"{source}: tensor 'rope_freqs.weight' (scaled RoPE) is not supported")
        name = hf_tensor_name(tensor.name, source)
        if name not in targets:
            raise CheckpointError(f"{source}: tensor {tensor.name!r} ({name}) does not fit this config")
        try:
            value = dequantized(tensor)
        except (NotImplementedError, ValueError) as err:
            raise CheckpointError(f"{source}: tensor {tensor.name!r}: cannot dequantize "
                                  f"{tensor.tensor_type.name} ({err})") from None
        if name.endswith("q_proj.weight"):
            value = unpermute_rows(value, config.num_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_rows(value, config.num_kv_heads)
        if tuple(value.shape) != tuple(targets[name].shape):
            raise CheckpointError(f"{source}: tensor {tensor.name!r} ({name}) has shape {tuple(value.shape)}, "
                                  f"the config expects {tuple(targets[name].shape)}")
        targets[name].data.copy_(value)
        loaded.add(name)
    missing = [k for k in targets if k not in loaded and "lora_" not in k]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} missing from the GGUF ({len(missing)} missing in all)")
    return model.eval()


def load_gguf_model(path: str | Path, dtype=torch.float32, device="cpu"):
    """The Transformer a llama-architecture GGUF describes, dequantized to `dtype`."""
    return model_from_gguf(open_gguf(path), dtype, device, source=str(path))


def _byte_level_backend(tokens: list[str], merges: list[str], kinds: list[int], pre: str, source: str):
    """GPT-2 style byte-level BPE (SmolLM2): the same tokenizer a `tokenizer.json` with this vocabulary describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    if pre in DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in GPT2_PRE:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise TokenizerError(f"{source}: byte-level pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; "
                             f"supported: {sorted(DIGIT_SPLIT_PRE | GPT2_PRE)}")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"{source}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, kinds) if k == 3]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, kinds) if k == 4]
    backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    return backend


def tokenizer_from_gguf(reader, source: str = "gguf") -> HFTokenizer:
    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{source}: no tokenizer.ggml.model / tokenizer.ggml.tokens metadata in this GGUF")
    kinds = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    def token(key):
        index = metadata(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id")}
    if kind == "gpt2":
        backend = _byte_level_backend(tokens, metadata(reader, "tokenizer.ggml.merges") or [], kinds,
                                      metadata(reader, "tokenizer.ggml.pre", "default"), source)
        add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        scores = metadata(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(f"{source}: a SentencePiece vocabulary without tokenizer.ggml.scores")
        add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", True))
        backend = sentencepiece_to_tokenizers(tokens, scores, kinds, bos_token=special["bos_token"], add_bos=add_bos)
    else:
        raise TokenizerError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; supported: gpt2, llama")
    return HFTokenizer(backend, source, special_tokens=special,
                       chat_template=metadata(reader, "tokenizer.chat_template"), add_bos_token=add_bos,
                       model_max_length=metadata(reader, "llama.context_length"))


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer described by the vocabulary a GGUF carries."""
    try:
        reader = open_gguf(path)
    except CheckpointError as err:
        raise TokenizerError(str(err)) from None
    return tokenizer_from_gguf(reader, source=str(path))
