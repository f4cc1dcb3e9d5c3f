"""Hand-written LLaMA-2 / Mistral models, their checkpoints and tokenizers."""
from .checkpoint import build_model, load_model, save_pretrained
from .config import PRESETS, CheckpointError, ModelConfig
from .transformer import KVCache, Transformer


def load_tokenizer(path):
    from .tokenizer import load_tokenizer as _load
    return _load(path)


__all__ = ["CheckpointError", "KVCache", "ModelConfig", "PRESETS", "Transformer", "build_model", "load_model",
           "load_tokenizer", "save_pretrained"]
