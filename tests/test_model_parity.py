"""Our Transformer against transformers' LLaMA / Mistral in fp32: logits, KV-cache decoding, packing, save/load."""
import json

import pytest
import torch

from hippocrates.models import PRESETS, KVCache, ModelConfig, Transformer, build_model, load_model, save_pretrained

TOLERANCE = 1e-4

TINY_CONFIGS = {
    # multi-head attention, untied head
    "llama-mha-untied": ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                    num_kv_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
    # grouped-query attention, tied head, hidden size not a power of two, head_dim 12
    "llama-gqa-tied-odd": ModelConfig(vocab_size=101, hidden_size=72, intermediate_size=100, num_layers=3, num_heads=6,
                                      num_kv_heads=2, rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # head_dim set apart from hidden_size / num_heads
    "llama-gqa-headdim": ModelConfig(vocab_size=89, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=4,
                                     num_kv_heads=2, head_dim=14, tie_word_embeddings=False),
    # Mistral: sliding window shorter than the sequence, one key/value head, odd hidden size
    "mistral-window": ModelConfig(vocab_size=103, hidden_size=50, intermediate_size=70, num_layers=2, num_heads=5,
                                  num_kv_heads=1, sliding_window=5, architecture="mistral", tie_word_embeddings=False),
    "mistral-window-gqa-tied": ModelConfig(vocab_size=67, hidden_size=48, intermediate_size=64, num_layers=2,
                                           num_heads=4, num_kv_heads=2, sliding_window=3, architecture="mistral",
                                           tie_word_embeddings=True),
}

PUBLISHED_PARAMETER_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
}


def hf_model(config: ModelConfig, seed: int):
    """transformers' model of this config with weights large enough that mistakes show in the logits."""
    import transformers
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    return model


def ours_from(hf, config: ModelConfig) -> Transformer:
    model = Transformer(config)
    state = {k: v for k, v in hf.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    config = TINY_CONFIGS[request.param]
    hf = hf_model(config, seed=sorted(TINY_CONFIGS).index(request.param))
    return config, hf, ours_from(hf, config)


def random_ids(config, batch, length, seed):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair):
    config, hf, ours = pair
    ids = random_ids(config, 2, 19, seed=1)
    expected = hf(ids).logits
    got = ours(ids)
    assert got.shape == (2, 19, config.vocab_size)
    assert expected.abs().max() > 1.0  # the weights make logits that differ visibly between tokens
    assert (got - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_sliding_window_is_active():
    """The window must change the logits past it (otherwise the Mistral parity above proves little)."""
    config = TINY_CONFIGS["mistral-window"]
    hf = hf_model(config, seed=7)
    windowed = ours_from(hf, config)
    full = ours_from(hf, config.replace(sliding_window=None))
    ids = random_ids(config, 1, 16, seed=2)
    diff = (windowed(ids) - full(ids)).abs()
    assert diff[:, :config.sliding_window].max() <= 1e-6
    assert diff[:, config.sliding_window:].max() > 1e-3


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(pair):
    config, _, ours = pair
    ids = random_ids(config, 2, 17, seed=3)
    full = ours(ids)
    cache = KVCache(config, batch_size=2, max_len=17)
    pieces = [ours(ids[:, :7], kv_cache=cache)]
    for t in range(7, 14):
        pieces.append(ours(ids[:, t:t + 1], kv_cache=cache))
    pieces.append(ours(ids[:, 14:], kv_cache=cache))
    assert cache.length == 17
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_kv_cache_repeat_batch_continues_each_row(pair):
    config, _, ours = pair
    prefix = random_ids(config, 1, 6, seed=4)
    cache = KVCache(config, batch_size=1, max_len=6)
    ours(prefix, kv_cache=cache)
    rows = cache.repeat_batch(3, max_len=9)
    tails = random_ids(config, 3, 3, seed=5)
    got = ours(tails, kv_cache=rows)  # [3, 3, V]
    expected = ours(torch.cat([prefix.expand(3, -1), tails], dim=1))[:, 6:]
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_packed_segments_equal_separate_documents(pair):
    config, _, ours = pair
    lengths = [5, 8, 1, 6]
    docs = [random_ids(config, 1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # [1, 20]
    segment_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    got = ours(packed, segment_ids=segment_ids)
    expected = torch.cat([ours(doc) for doc in docs], dim=1)
    assert (got - expected).abs().max().item() <= 1e-5
    unpacked = ours(packed)  # without segment ids the documents see each other
    assert (unpacked - expected)[:, lengths[0]:].abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_preset_parameter_counts(name):
    model = build_model(PRESETS[name], device="meta")
    assert model.num_parameters() == PUBLISHED_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 40_000])
@torch.no_grad()
def test_save_pretrained_loads_in_transformers(pair, tmp_path, max_shard_bytes):
    import transformers
    config, _, ours = pair
    out = save_pretrained(ours, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 2 * 1024**3)
    if sharded:
        shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(shards) > 1 and all((out / s).exists() for s in shards)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(config, 2, 13, seed=6)
    expected = ours(ids)
    assert (reloaded(ids).logits - expected).abs().max().item() <= TOLERANCE
    ours_again = load_model(out)
    assert torch.equal(ours_again(ids), expected)
