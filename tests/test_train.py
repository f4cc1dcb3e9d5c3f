"""The training engine end to end, as users launch it: train/cpt.py as one process and under torchrun with Gloo.

Runs use a tiny random LLaMA-shaped model with the real LLaMA-2 tokenizer on real MedQuAD answers (helpers in
train_helpers.py), so each takes seconds; the DPO run uses the real default model.
"""
from __future__ import annotations

import json

import pytest
import torch

from hippocrates.tests.train_helpers import checkpoint_steps, cpt_args, losses, make_tiny_model, records, relative_diff, run, run_env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", data_dir)


@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "full"])
def test_two_ranks_give_the_losses_of_one_rank(tiny_model, tmp_path, lora_rank):
    """Global batch 4 as 1 rank x 2 rows x 2 accumulation and as 2 ranks x 1 row x 2 accumulation."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    run("cpt", cpt_args(tiny_model, one, **{"lora.rank": lora_rank, "batch_size": 2}))
    run("cpt", cpt_args(tiny_model, two, **{"lora.rank": lora_rank, "batch_size": 1}), nproc=2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert len(set(a.values())) > 1, "the loss never changed: nothing trained"
    worst = max(relative_diff(a[s], b[s]) for s in a)
    assert worst <= 1e-5, f"per-step losses differ by {worst:.2e} (relative): {a} vs {b}"

    from hippocrates.models import load_model
    final_one, final_two = load_model(one / "final"), load_model(two / "final")
    initial = load_model(tiny_model)
    moved = max((p1 - p0).abs().max().item() for p1, p0 in zip(final_one.parameters(), initial.parameters()))
    assert moved > 1e-4, "training did not change the exported weights"
    # the gradients' summation order differs between 1 and 2 ranks; AdamW turns that into up to a few 1e-6 on
    # embedding rows whose gradient nearly cancels (measured 3.2e-6 before and after per-rank export), vs moves of 1e-2
    for (name, p1), p2 in zip(final_one.named_parameters(), final_two.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=f"{name} differs between 1 and 2 ranks")
    check_per_rank_export(one / "final", two / "final")


def check_per_rank_export(one_rank_dir, two_rank_dir):
    """Each of the 2 ranks wrote its own shard of final/ (with an index); transformers loads the result with the
    engine's logits, and the 1-rank export is the same tensors in one file."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hippocrates.models import load_model
    assert sorted(p.name for p in one_rank_dir.glob("*.safetensors")) == ["model.safetensors"]
    index = json.loads((two_rank_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [load_file(two_rank_dir / f) for f in files]
    assert all(shards) and not set(shards[0]) & set(shards[1])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for s in shards for t in s.values())
    single = load_file(one_rank_dir / "model.safetensors")
    assert set(single) == set(index["weight_map"])
    ids = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(two_rank_dir, dtype=torch.float32).eval()(ids).logits
        ours = load_model(two_rank_dir)(ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_resume_after_a_crash_reproduces_the_remaining_losses(tiny_model, tmp_path):
    """LoRA dropout on, so the restored RNG states matter as much as the weights and AdamW state."""
    keys = {"lora.dropout": 0.1}
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run("cpt", cpt_args(tiny_model, full, **keys))
    died = run("cpt", cpt_args(tiny_model, crashed, **keys), env=run_env(HIPPO_FAULT_RAISE="0:5"), check=False)
    assert died.returncode != 0 and "injected failure on rank 0 at step 5" in died.stdout
    assert checkpoint_steps(crashed) == [2, 4]
    assert sorted(losses(crashed)) == [1, 2, 3, 4]

    resumed = run("cpt", cpt_args(tiny_model, crashed, resume="true", **keys))
    assert "resumed from" in resumed.stdout and "step_4" in resumed.stdout
    assert losses(crashed) == losses(full), "the resumed run's losses are not bitwise those of the uninterrupted run"


def test_one_process_checkpoint_resumes_on_two_ranks(tiny_model, tmp_path):
    """One fp32 process trains without FSDP2 (plain tensors in its checkpoint); two ranks resume it as FSDP2 shards
    and continue with the losses of the uninterrupted one-process run (global batch 4 both ways)."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run("cpt", cpt_args(tiny_model, full, batch_size=2))
    run("cpt", cpt_args(tiny_model, crashed, batch_size=2), env=run_env(HIPPO_FAULT_RAISE="0:5"), check=False)
    assert checkpoint_steps(crashed) == [2, 4]
    resumed = run("cpt", cpt_args(tiny_model, crashed, resume="true", batch_size=1), nproc=2)
    assert "step_4" in resumed.stdout
    a, b = losses(full), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    worst = max(relative_diff(a[s], b[s]) for s in (5, 6))
    assert worst <= 1e-5, f"steps 5-6 differ by {worst:.2e} (relative): {a} vs {b}"


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "run"
    run("cpt", cpt_args(tiny_model, out, max_steps=2))
    again = run("cpt", cpt_args(tiny_model, out, max_steps=2), check=False)
    assert again.returncode == 1
    assert "already holds checkpoints" in again.stdout and "Traceback" not in again.stdout


def test_checkpoint_of_another_config_is_refused_naming_the_difference(tiny_model, tmp_path):
    out = tmp_path / "run"
    run("cpt", cpt_args(tiny_model, out, max_steps=2))
    other = run("cpt", cpt_args(tiny_model, out, max_steps=4, resume="true", **{"lora.rank": 8}), check=False)
    assert other.returncode == 1 and "Traceback" not in other.stdout
    assert "written by a different run" in other.stdout
    assert "lora.rank: checkpoint has 4, this run has 8" in other.stdout


def test_run_dir_holds_metrics_config_versions_and_plot(tiny_model, tmp_path):
    out = tmp_path / "run"
    run("cpt", cpt_args(tiny_model, out, max_steps=4, **{"checkpoint.keep_last": 1, "optim.warmup_steps": 2}))
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "padded_tokens_per_s", "peak_memory_mb"):
        assert all(isinstance(r[key], float) and r[key] > 0 for r in rows), key
    assert all(r["tokens_per_s"] <= r["padded_tokens_per_s"] for r in rows)
    # lr=3e-3 with min_lr_ratio=0.1: linear warmup over 2 steps, then the cosine from lr down to lr/10
    assert [r["lr"] for r in rows] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-4], rel=1e-12)
    assert checkpoint_steps(out) == [4]  # keep_last=1 rotated step_2 away
    info = json.loads((out / "run.json").read_text())
    assert info["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert (out / "config.yaml").read_text().count("seq_len: 16") == 1
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "final" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()


def test_exported_adapter_loads_in_peft_with_the_engine_logits(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hippocrates.models import load_model

    out = tmp_path / "run"
    run("cpt", cpt_args(tiny_model, out, max_steps=4, lr=2e-2))
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(7))
    ours = load_model(out / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
        our_logits = ours(ids)
    assert (peft_logits - base_logits).abs().max() > 1e-3, "the adapter changes nothing: the test would be void"
    diff = (peft_logits - our_logits).abs().max().item()
    assert diff <= 1e-4, f"peft(base + adapter) vs the engine's merged export: max |diff| {diff:.2e}"


def test_short_dpo_run_on_the_default_model_wins_on_held_out_pairs(smollm2_dir, tmp_path):
    """The default DPO recipe, shortened: SmolLM2-135M + LoRA on the LiveQA pairs, scored on 32 held-out pairs."""
    out = tmp_path / "dpo"
    result = run("dpo", [f"out_dir={out}", "max_steps=12", "seq_len=160", "lr=1e-3", "checkpoint.save_every=0"],
                 timeout=900)
    assert "skipped" in result.stdout  # pairs longer than seq_len are skipped and counted, not truncated
    rows = records(out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in rows[-1], key
    last = rows[-1]
    assert last["eval/rewards/accuracies"] > 0.5, f"held-out reward accuracy {last['eval/rewards/accuracies']}"
    assert last["eval/rewards/margins"] > 0


def test_eval_every_scores_tasks_during_training_like_the_evaluator(tiny_model, tmp_path):
    """eval_every=3 on two ranks: the step-6 scores equal eval.evaluate on the exported final model."""
    from hippocrates.eval import evaluate
    from hippocrates.models import load_model, load_tokenizer

    out = tmp_path / "run"
    run("cpt", cpt_args(tiny_model, out, batch_size=1, eval_every=3, **{"eval.tasks": "[medqa,pubmedqa]",
                                                                          "eval.limit": 6}), nproc=2)
    rows = {r["step"]: r for r in records(out)}
    assert [s for s in rows if "eval/medqa/acc" in rows[s]] == [3, 6]
    final = evaluate(load_model(out / "final"), load_tokenizer(out / "final"), ["medqa", "pubmedqa"], limit=6,
                     progress=False)["results"]
    for task in ("medqa", "pubmedqa"):
        for metric in ("acc", "acc_norm"):
            assert rows[6][f"eval/{task}/{metric}"] == pytest.approx(final[task][metric]), (task, metric)


def test_real_tokens_leave_out_the_padding_of_each_stage():
    """Rows built by engine.data from examples of known lengths, pad_id equal to eos_id (as with many tokenizers):
    the count is the examples' tokens, for CPT, SFT (padded and packed) and DPO."""
    import numpy as np

    from hippocrates.engine.data import RowDataset
    from hippocrates.engine.data.examples import Tokenized
    from hippocrates.engine.data.rows import cpt_rows, dpo_rows, sft_rows
    from hippocrates.engine.metrics import real_tokens

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    eos = pad = 2
    seq_len = 16

    def example(length, prompt, untrained_tail):
        ids = torch.randint(3, 100, (length,), generator=gen).numpy()
        ids[-1] = eos
        trainable = np.arange(length) >= prompt
        if untrained_tail:  # a chat template's text after eos, which carries no loss
            ids[-1], trainable[-1] = 7, False
        return Tokenized(ids, trainable)

    def every_row(columns):
        dataset = RowDataset(columns)
        return dataset[np.arange(len(dataset))]

    lengths = torch.randint(4, seq_len + 1, (7,), generator=gen).tolist()
    examples = [example(n, int(torch.randint(1, n - 2, (1,), generator=gen)), i % 2 == 1)
                for i, n in enumerate(lengths)]
    documents = [Tokenized(e.ids, np.ones(len(e.ids), dtype=bool)) for e in examples]
    # A CPT stream whose last row holds only the final eos (== pad, and no target) counts that row as padding.
    lone_final_eos = sum(lengths) % seq_len == 1
    assert real_tokens(every_row(cpt_rows(documents, seq_len, pad)), pad) == sum(lengths) - lone_final_eos
    for pack in (False, True):
        assert real_tokens(every_row(sft_rows(examples, seq_len, pad, pack)), pad) == sum(lengths), pack
    pairs = list(zip(examples[:3], examples[3:6]))
    assert real_tokens(every_row(dpo_rows(pairs, seq_len, pad)), pad) == sum(lengths[:6])
