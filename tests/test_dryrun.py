"""engine.dryrun: parameter counts, the FSDP2 plan on the meta device and the memory estimate's arithmetic."""
import math

import pytest

from hippocrates.engine.dryrun import DryRunError, estimate_memory, fsdp_plan, main, read_config
from hippocrates.models.config import PRESETS


def write_recipe(tmp_path, text, name="cpt_test.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def lora_trainable(cfg, rank):
    """r (in + out) per adapted linear, from the shapes in the config."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return cfg.num_layers * sum(rank * (a + b) for a, b in shapes)


def test_counts_and_sharding_arithmetic(tmp_path):
    path = write_recipe(tmp_path, "model: smollm2-135m\nseq_len: 256\nbatch_size: 2\nlora:\n  rank: 8\n")
    config = read_config(path)
    one, eight = (estimate_memory(config, n, activation_checkpointing=False) for n in (1, 8))
    cfg = PRESETS["smollm2-135m"]
    counts = one["params"]
    assert counts.trainable == lora_trainable(cfg, 8)
    assert counts.total - counts.trainable == 134_515_008  # SmolLM2-135M's published parameter count
    for name in ("frozen params (bf16, sharded)", "AdamW m, v (fp32, sharded)"):
        assert eight["components"][name] == pytest.approx(one["components"][name] / 8, abs=1)
    assert one["components"]["AdamW m, v (fp32, sharded)"] == counts.trainable * 8
    assert one["components"]["activations"] == cfg.num_layers * 512 * one["activation_bytes_per_token_per_block"]
    ac = estimate_memory(config, 8, activation_checkpointing=True)
    assert ac["components"]["activations"] < eight["components"]["activations"] / 4
    assert eight["total"] == sum(eight["components"].values())


def test_dpo_doubles_tokens_and_full_finetune_keeps_a_reference(tmp_path):
    path = write_recipe(tmp_path, "model: smollm2-135m\nseq_len: 128\nbatch_size: 2\nlora.rank: 0\n", "dpo_x.yaml")
    estimate = estimate_memory(read_config(path), 4)
    assert estimate["stage"] == "dpo" and estimate["tokens_per_micro_batch"] == 2 * 2 * 128
    total = estimate["params"].total
    assert estimate["params"].trainable == total
    assert estimate["components"]["reference model (bf16, sharded)"] == total * 2 // 4


def test_fsdp_plan_shards_every_block_and_the_root(tmp_path):
    config = read_config(write_recipe(tmp_path, "model: smollm2-135m\nlora:\n  rank: 4\n"))
    plan = fsdp_plan(config, world_size=4)
    cfg = PRESETS["smollm2-135m"]
    assert [row[0] for row in plan] == [f"model.layers.{i}" for i in range(cfg.num_layers)] + ["(root)"]
    for name, params, shard, shape in plan:
        assert params / 4 <= shard <= params / 4 + 64 * cfg.vocab_size  # even split up to dim-0 padding
    assert plan[-1][3] == f"{math.ceil(cfg.vocab_size / 4)}x{cfg.hidden_size}"  # tied embedding, dim-0 sharded


def test_cli_prints_tables_and_bad_configs_fail_in_one_line(tmp_path, capsys):
    good = write_recipe(tmp_path, "model: smollm2-135m\nseq_len: 128\nlora:\n  rank: 4\n")
    assert main(["--config", str(good), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 plan" in out and "trainable" in out and "total" in out
    bad = write_recipe(tmp_path, "model: no-such-model\nseq_len: 128\n", "bad.yaml")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml" in err and "model='no-such-model'" in err and len(err.splitlines()) == 1
    with pytest.raises(DryRunError, match="seq_len"):
        estimate_memory(read_config(good, ["seq_len=-3"]), 2)
