"""engine.dryrun: parameter counts, the FSDP2 plan on the meta device and the memory estimate's arithmetic.

`LiveBytes` measures what the plan estimates: the peak of live CPU tensor storage, counted at every op through a
TorchDispatchMode (each op's output storages are registered; a storage counts until torch frees it). Run
`torchrun --standalone --nproc_per_node=N -m hippocrates.tests.test_dryrun` to print measured vs planned peaks of a
tiny model's training steps (LoRA and full, with and without activation checkpointing).
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def test_dropout_masks_and_skipped_sync_gradients_are_counted(tmp_path):
    base = "model: smollm2-135m\nseq_len: 128\nbatch_size: 2\nlora:\n  rank: 8\n"
    plain = read_config(write_recipe(tmp_path, base + "  dropout: 0.0\n"))
    dropped = read_config(write_recipe(tmp_path, base + "  dropout: 0.1\n", "cpt_drop.yaml"))
    cfg = PRESETS["smollm2-135m"]
    q = cfg.num_heads * cfg.head_dim
    inputs = 5 * cfg.hidden_size + q + cfg.intermediate_size  # q, k, v, gate, up read the hidden size
    extra = estimate_memory(dropped, 1)["activation_bytes_per_token_per_block"] - \
        estimate_memory(plain, 1)["activation_bytes_per_token_per_block"]
    assert extra == inputs * (2 + 1)  # the bf16 dropped-out input and its bool mask
    full = read_config(write_recipe(tmp_path, "model: smollm2-135m\nlora.rank: 0\ngrad_accum: 4\n", "cpt_f.yaml"))
    skipped, synced = estimate_memory(full, 8), estimate_memory(full, 8, sync_every_micro_batch=True)
    trainable = skipped["params"].trainable
    assert skipped["gradient_sync"] == "skipped until the last micro-batch"
    assert skipped["components"]["grads (fp32, unsharded: sync skipped between micro-batches)"] == trainable * 4
    assert synced["components"]["grads (fp32, sharded)"] == trainable * 4 // 8
    one, two = estimate_memory(full, 1, device="cpu"), estimate_memory(full, 2, device="cpu")
    assert one["components"]["CUDA context, NCCL buffers (assumed)"] == 0
    block = skipped["params"].block
    assert one["components"]["all-gathered blocks (fp32)"] == block * 4  # the block in use
    assert two["components"]["all-gathered blocks (fp32)"] == 2 * block * 4  # and the all-gather buffer


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live CPU tensor storage while active; `track` adds tensors made before (the weights).

    Each op's output storages are registered under their StorageImpl's address (stable across `resize_`) with a
    weak reference; after every op the freed ones are dropped and the sum of the rest is the live total. FSDP2
    frees and re-allocates unsharded weights with `UntypedStorage.resize_`, which is no op of the dispatcher, so
    it is patched while the mode is active to update the storage's size.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # StorageImpl address -> [weak ref, bytes]
        self.peak = 0

    def track(self, tensor):
        if hasattr(tensor, "to_local"):  # an FSDP2 DTensor: its local shard
            tensor = tensor.to_local()
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            if storage._cdata not in self.live:
                self.live[storage._cdata] = [StorageWeakRef(storage), storage.nbytes()]

    def sample(self):
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self.track(tensor)
        self.sample()
        return out

    def __enter__(self):
        original = self._original_resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            result = original(storage, size)
            if storage.device.type == "cpu":
                self.live.setdefault(storage._cdata, [StorageWeakRef(storage), 0])[1] = storage.nbytes()
                self.sample()
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)


def test_live_bytes_counts_storages_once_until_freed():
    n = 2 * int(torch.randint(500, 2500, ()).item())
    weights = torch.randn(n)  # made before: tracked by hand, 4n bytes
    mode = LiveBytes()
    mode.track(weights)
    with mode:
        a = torch.empty(n)                       # 4n
        view = a[: n // 2]                       # a view of a's storage: no new bytes
        b = (view * 2).double()                  # the fp32 product (2n) is alive while .double() makes 4n
        del a, view                              # a's storage is freed
        c = torch.zeros(n, dtype=torch.int8)     # n
        c.untyped_storage().resize_(3 * n)       # 3n: resized in place, as FSDP2 does with unsharded weights
    assert mode.peak == 4 * n + 4 * n + 2 * n + 4 * n
    assert sum(nbytes for _, nbytes in mode.live.values()) == 4 * n + 4 * n + 3 * n
    assert b.numel() == n // 2 and c.numel() == n


@pytest.mark.parametrize("world_size", [1, 2])
def test_plan_is_within_15_percent_of_the_measured_peak(world_size, tmp_path):
    """The CPU plan (`device="cpu"`) against the measured peak of a tiny model's training step under torchrun:
    LoRA (with and without dropout) and full fine-tuning, with and without activation checkpointing, gradient sync
    skipped between micro-batches (the trainer) or done on each."""
    import subprocess

    from hippocrates.tests.train_helpers import REPO, run_env
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}", "--standalone",
               "--monitor_interval=0.2", "-m", "hippocrates.tests.test_dryrun", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    peaks = json.loads((tmp_path / f"peaks_{world_size}.json").read_text())
    assert len(peaks) == len(CASES)
    for case in peaks:
        assert 0.85 <= case["planned"] / case["measured"] <= 1.15, case


# (lora.rank, lora.dropout, activation checkpointing, gradient sync on every micro-batch); rank 0 = full fine-tuning
CASES = [(8, 0.1, False, False), (8, 0.1, True, False), (0, 0.0, False, False), (0, 0.0, True, False),
         (8, 0.0, False, False), (0, 0.0, False, True)]


def measure(out_dir: Path):
    """Measured and planned peaks of two training steps (2 micro-batches each) of a tiny model, per case in CASES,
    written by rank 0 to out_dir/peaks_{world_size}.json (the plan's `device="cpu"` mode: fp32 everywhere)."""
    from hippocrates.engine import distributed
    from hippocrates.engine.dryrun import estimate_memory
    from hippocrates.engine.losses import token_cross_entropy
    from hippocrates.models import ModelConfig, build_model
    from hippocrates.models.lora import LoraConfig, add_lora

    env = distributed.setup(60)
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    model_dir = out_dir / f"tiny_model_{env.rank}"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg.to_hf()))
    rows, seq_len, accum = 2, 64, 2
    peaks = []
    for rank, dropout, checkpointing, sync_every in CASES:
        torch.manual_seed(0)
        model = build_model(cfg)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        if rank:
            add_lora(model, LoraConfig(rank=rank, alpha=16, dropout=dropout), seed=0)
        distributed.shard(model, torch.float32, checkpointing)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step():
            for micro in range(accum):
                ids = torch.randint(0, cfg.vocab_size, (rows, seq_len))
                model.set_requires_gradient_sync(sync_every or micro == accum - 1)
                token_cross_entropy(model, {"input_ids": ids, "labels": ids}, rows * seq_len * accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # the first step makes the AdamW state; the second, measured, runs with it
        mode = LiveBytes()
        for tensor in [*model.parameters(), *model.buffers(),
                       *(t for state in optimizer.state.values() for t in state.values())]:
            mode.track(tensor)
        with mode:
            step()
        plan = estimate_memory({"model": str(model_dir), "seq_len": seq_len, "batch_size": rows, "grad_accum": accum,
                                "lora.rank": rank, "lora.alpha": 16, "lora.dropout": dropout, "_source": "tiny"},
                               env.world_size, activation_checkpointing=checkpointing, device="cpu",
                               sync_every_micro_batch=sync_every)
        peaks.append({"lora.rank": rank, "lora.dropout": dropout, "activation_checkpointing": checkpointing,
                      "sync_every_micro_batch": sync_every, "measured": mode.peak, "planned": plan["total"]})
        print(f"rank {env.rank}/{env.world_size} lora.rank={rank} lora.dropout={dropout} activation_checkpointing="
              f"{checkpointing} sync_every_micro_batch={sync_every}: measured "
              f"{mode.peak / 1e6:.3f} MB, planned {plan['total'] / 1e6:.3f} MB "
              f"(planned / measured {plan['total'] / mode.peak:.3f})", file=sys.stderr)
    if env.is_main:
        (out_dir / f"peaks_{env.world_size}.json").write_text(json.dumps(peaks))
    distributed.teardown()


if __name__ == "__main__":
    measure(Path(sys.argv[1]))
