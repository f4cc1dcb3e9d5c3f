"""Sharded loading: two CPU ranks (torchrun, Gloo) each read only their own rows of a 600 MB sharded checkpoint.

The test writes the checkpoints, launches this file as the ranks' script, and checks what they report: each rank's
peak RSS growth during the load, and logits / gathered weights against a plain one-process `load_model`.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hippocrates.models import ModelConfig, Transformer, build_model, load_model, save_pretrained
from hippocrates.models.lora import LoraConfig, add_lora

BIG = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_layers=8, num_heads=8,
                  num_kv_heads=4)  # 149M parameters: 598 MB in fp32
SMALL = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    tie_word_embeddings=True)
LORA = LoraConfig(rank=4, alpha=8.0)
LORA_SEED = 3
INPUT_IDS = [[5, 17, 250, 9, 100, 42, 7, 257], [1, 2, 3, 4, 5, 6, 7, 8]]  # [2, 8], below every vocab size


def status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def worker(big_dir: str, small_dir: str, gguf_path: str, out: str):
    """One rank: load each checkpoint sharded, write what the test checks."""
    from hippocrates.engine import distributed
    env = distributed.setup()
    ids = torch.tensor(INPUT_IDS)
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM (the peak RSS) from the current RSS
    model = distributed.load_sharded_model(big_dir, env, None, seed=0)
    growth = status_mb("VmHWM") - before
    with torch.no_grad():
        big_logits = model(ids)
    del model
    with_lora = distributed.load_sharded_model(small_dir, env, LORA, seed=LORA_SEED)
    lora_state = distributed.gather_full_state(with_lora)
    reference = distributed.load_sharded_model(small_dir, env, None, seed=0, trainable=False)
    frozen = not any(p.requires_grad for p in reference.parameters())
    reference_state = distributed.gather_full_state(reference)
    from_gguf = distributed.load_sharded_model(gguf_path, env, None, seed=0)
    with torch.no_grad():
        gguf_logits = from_gguf(ids)
    (Path(out) / f"rank{env.rank}.json").write_text(json.dumps({"rss_growth_mb": growth, "frozen": frozen}))
    if env.is_main:
        torch.save({"big": big_logits, "gguf": gguf_logits, "lora_state": lora_state,
                    "reference_state": reference_state}, Path(out) / "results.pt")
    distributed.teardown()


def write_gguf(model: Transformer, path: Path):
    """The model as llama.cpp writes a llama GGUF (F32 tensors, q/k rows permuted), with a byte-level vocabulary
    (the 256 byte symbols, no merges, then bos and eos)."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel
    from hippocrates.models.gguf import TENSOR_NAMES, BLOCK_TENSOR_NAMES, permute_rows
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_context_length(config.max_position_embeddings)
    tokens = sorted(ByteLevel.alphabet()) + ["<s>", "</s>"]
    assert len(tokens) == config.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    hf_to_gguf = {hf: name for name, hf in TENSOR_NAMES.items()}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            layer, module = name.split(".", 3)[2], name.split(".", 3)[3].removesuffix(".weight")
            short = next(k for k, v in BLOCK_TENSOR_NAMES.items() if v == module)
            gguf_name = f"blk.{layer}.{short}.weight"
        else:
            gguf_name = hf_to_gguf[name]
        if name.endswith("q_proj.weight"):
            tensor = permute_rows(tensor, config.num_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_rows(tensor, config.num_kv_heads)
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    big = build_model(BIG).init_weights(std=0.02, seed=0)
    save_pretrained(big, root / "big", max_shard_bytes=256 * 1024**2)
    del big
    small = Transformer(SMALL).init_weights(std=0.1, seed=1).to(torch.bfloat16)  # a bf16 file, loaded as fp32
    save_pretrained(small, root / "small", max_shard_bytes=40_000)
    tiny = ModelConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2)
    write_gguf(Transformer(tiny).init_weights(std=0.1, seed=2), root / "tiny.gguf")
    return root


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    from hippocrates.tests.train_helpers import REPO, run_env
    out = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "--monitor_interval=0.2", __file__, str(checkpoints / "big"), str(checkpoints / "small"),
               str(checkpoints / "tiny.gguf"), str(out)]
    result = subprocess.run(command, cwd=REPO, env=run_env(HIPPO_CACHE_DIR=str(out / "cache")),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, torch.load(out / "results.pt")


def test_checkpoint_is_sharded_and_large(checkpoints):
    index = json.loads((checkpoints / "big" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and index["metadata"]["total_size"] >= 500 * 1024**2


def test_each_rank_reads_only_its_rows(checkpoints, two_ranks):
    ranks, _ = two_ranks
    size_mb = sum(p.stat().st_size for p in (checkpoints / "big").glob("*.safetensors")) / 1024**2
    growth = [r["rss_growth_mb"] for r in ranks]
    print(f"model {size_mb:.0f} MB, RSS growth per rank during the load: {growth} MB")
    assert all(g <= 0.6 * size_mb + 200 for g in growth), (growth, size_mb)


def test_logits_equal_one_process_load(checkpoints, two_ranks):
    _, results = two_ranks
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        expected = load_model(checkpoints / "big")(ids)
    torch.testing.assert_close(results["big"], expected, rtol=1e-5, atol=1e-5)


def test_lora_dtype_and_tied_embeddings(checkpoints, two_ranks):
    """bf16 file -> fp32, tied embedding, adapters initialized as add_lora(seed) draws them, not loaded."""
    _, results = two_ranks
    expected = add_lora(load_model(checkpoints / "small"), LORA, seed=LORA_SEED).state_dict()
    got = results["lora_state"]
    assert set(got) == set(expected) and "lm_head.weight" not in got
    assert any("lora_a" in k for k in got)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value), key


def test_frozen_reference_copy(checkpoints, two_ranks):
    ranks, results = two_ranks
    assert all(r["frozen"] for r in ranks)
    expected = load_model(checkpoints / "small").state_dict()
    assert set(results["reference_state"]) == set(expected)
    assert all(torch.equal(results["reference_state"][k], v) for k, v in expected.items())


def test_gguf_loads_through_converted_safetensors(checkpoints, two_ranks):
    _, results = two_ranks
    with torch.no_grad():
        expected = load_model(checkpoints / "tiny.gguf")(torch.tensor(INPUT_IDS))
    torch.testing.assert_close(results["gguf"], expected, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    worker(*sys.argv[1:])
