"""eval.run on a PEFT adapter (merged as peft's merge_and_unload does), its dtype, and its lm-eval-schema file."""
import json
import shutil

import pytest
import torch

from hippocrates.eval.loading import choose_dtype, load_for_eval
from hippocrates.eval.run import main as run_main
from hippocrates.models import ModelConfig, build_model, save_pretrained
from hippocrates.models.lora import LoraConfig, add_lora, peft_state_dict, save_peft_adapter


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, data_dir):
    """A tiny LLaMA with the LLaMA-2 tokenizer, and a LoRA adapter with random (non-zero) A and B."""
    root = tmp_path_factory.mktemp("adapter")
    config = ModelConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    model = build_model(config).init_weights(std=0.2, seed=2).eval()
    save_pretrained(model, root / "base")
    shutil.copy(data_dir / "tokenizers" / "llama2_tokenizer.model", root / "base" / "tokenizer.model")
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    add_lora(model, lora, seed=0)
    generator = torch.Generator().manual_seed(5)
    for p in peft_state_dict(model).values():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    save_peft_adapter(peft_state_dict(model), lora, root / "adapter", base_model=str(root / "base"))
    return root / "base", root / "adapter"


def test_adapter_merge_equals_peft(base_and_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter = base_and_adapter
    ours = load_for_eval(str(adapter), dtype="float32")  # the adapter dir as the model: its config names the base
    assert ours.base == str(base) and ours.adapter == str(adapter)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          adapter).merge_and_unload().eval()
    ids = torch.randint(0, 32000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours.model(ids)
    assert torch.allclose(got, expected, atol=1e-4)
    plain = load_for_eval(str(base), dtype="float32").model
    with torch.no_grad():
        assert not torch.allclose(plain(ids), got, atol=1e-2)  # the adapter changed something


def test_dtype_auto_follows_the_checkpoint():
    assert choose_dtype("auto", "float16", "cuda") == "float16"
    assert choose_dtype("auto", "bfloat16", "cuda:0") == "bfloat16"
    assert choose_dtype("auto", "bfloat16", "cpu") == "float32"  # no fast half-precision matmul on these CPUs
    assert choose_dtype("auto", None, "cuda") == "float32"
    assert choose_dtype("bfloat16", "float32", "cpu") == "bfloat16"


def test_run_with_adapter_writes_lm_eval_schema(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    args = ["--tasks", "medqa,pubmedqa", "--limit", "2", "--no-progress"]
    assert run_main(["--model", str(adapter), "--out", str(tmp_path / "a"), *args]) == 0
    assert run_main(["--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "b"), *args]) == 0
    assert run_main(["--model", str(base), "--out", str(tmp_path / "c"), *args]) == 0
    samples = {d: [json.loads(line) for line in (tmp_path / d / "samples.jsonl").open()] for d in "abc"}
    assert [s["loglikelihoods"] for s in samples["a"]] == [s["loglikelihoods"] for s in samples["b"]]
    assert [s["loglikelihoods"] for s in samples["a"]] != [s["loglikelihoods"] for s in samples["c"]]
    ours = json.loads((tmp_path / "a" / "results.json").read_text())
    assert ours["config"]["adapter"] == str(adapter) and ours["config"]["dtype"] == "float32"
    assert ours["config"]["checkpoint_dtype"] == "float32" and ours["results"]["medqa"]["dtype"] == "float32"
    lm = json.loads((tmp_path / "a" / "lm_eval_results.json").read_text())
    for task in ("medqa", "pubmedqa"):
        mine = ours["results"][task]
        assert lm["results"][task]["acc,none"] == mine["acc"]
        assert lm["results"][task]["acc_stderr,none"] == mine["acc_stderr"]
        assert lm["results"][task]["acc_norm,none"] == mine["acc_norm"]
        assert lm["results"][task]["acc_norm_stderr,none"] == mine["acc_norm_stderr"]
        assert lm["n-samples"][task] == {"original": 2, "effective": 2} and lm["n-shot"][task] == 0
        assert lm["configs"][task]["num_fewshot"] == 0
    assert f"adapter={adapter}" in lm["config"]["model_args"]


def test_run_rejects_a_dir_that_is_not_an_adapter(base_and_adapter, tmp_path, capsys):
    base, _ = base_and_adapter
    assert run_main(["--model", str(base), "--adapter", str(tmp_path), "--tasks", "medqa", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a PEFT adapter dir" in err
