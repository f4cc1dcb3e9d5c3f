"""The real default model: ours (from the GGUF) against transformers' own GGUF loader; generation; the cached fetch."""
import json
import subprocess
import sys

import pytest
import torch

import hippocrates.models.fetch as fetch
from hippocrates.models import load_model, load_tokenizer
from hippocrates.models.generate import generate, prompt_ids_for, sample_next

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gguf_path():
    return fetch.smollm2_gguf()


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def medical_texts(data_dir):
    with open(data_dir / "eval" / "medqa" / "test.jsonl") as f:
        question = json.loads(f.readline())["question"]
    with open(data_dir / "corpus" / "medquad_qa.jsonl") as f:
        answer = json.loads(f.readline())["answer"]
    return [question, answer]


@torch.no_grad()
def test_logits_match_transformers_gguf_loader(ours, reference, tokenizer, medical_texts):
    ids = torch.tensor([tokenizer.encode(text)[:48] for text in medical_texts])  # [2, 48]
    expected = reference(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape == (2, 48, 49152)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_greedy_generation_matches_transformers(ours, reference, tokenizer):
    prompt = prompt_ids_for(tokenizer, "Explain the difference between type 1 and type 2 diabetes.", chat=True)
    got = generate(ours, tokenizer, prompt, max_new_tokens=32)
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
    assert len(got) == 32
    assert got == expected.tolist()
    assert "diabetes" in tokenizer.decode(got).lower()


@torch.no_grad()
def test_direct_gguf_load_equals_converted_dir(gguf_path, ours):
    direct = load_model(gguf_path)
    assert direct.config == ours.config
    converted = ours.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, converted[name]), name


def test_sampling_is_seeded_and_respects_top_p(ours, tokenizer):
    prompt = tokenizer.encode("Hypertension is")
    first = generate(ours, tokenizer, prompt, max_new_tokens=5, temperature=0.9, top_p=0.9, seed=11)
    again = generate(ours, tokenizer, prompt, max_new_tokens=5, temperature=0.9, top_p=0.9, seed=11)
    assert first == again
    greedy = generate(ours, tokenizer, prompt, max_new_tokens=5)
    assert generate(ours, tokenizer, prompt, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=3) == greedy

    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_next(logits, 1.0, 0.7, generator) for _ in range(3000)])
    probs = torch.softmax(logits, 0)  # [0.64, 0.24, 0.09, 0.03]: the mass before token 2 is 0.88 >= 0.7
    nucleus = probs[:2] / probs[:2].sum()
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - nucleus[0].item()) < 0.03


def test_fetch_is_idempotent(smollm2_dir, monkeypatch):
    weights = smollm2_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def must_not_run(*args):
        raise AssertionError("a cached fetch converted or downloaded again")

    monkeypatch.setattr(fetch, "_convert", must_not_run)
    monkeypatch.setattr(fetch, "_download_gguf", must_not_run)
    assert fetch.fetch_smollm2() == smollm2_dir
    assert weights.stat().st_mtime_ns == stamp
    assert (smollm2_dir / fetch.COMPLETE_MARKER).is_file()
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(("convert-", "download-"))]


def test_interrupted_conversion_leaves_nothing_half_written(tmp_path, monkeypatch, gguf_path):
    monkeypatch.setenv("HIPPO_CACHE_DIR", str(tmp_path))
    root = tmp_path / "smollm2"
    root.mkdir()
    (root / gguf_path.name).symlink_to(gguf_path)
    stale = root / fetch.SMOLLM2_DIR_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    calls = []

    def failing(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    def fake(gguf, out_dir):
        calls.append(gguf)
        (out_dir / "config.json").write_text('{"converted": true}')

    monkeypatch.setattr(fetch, "_convert", failing)
    with pytest.raises(RuntimeError, match="killed"):
        fetch.fetch_smollm2()
    assert not (stale / fetch.COMPLETE_MARKER).exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
        [gguf_path.name, fetch.SMOLLM2_DIR_NAME])
    monkeypatch.setattr(fetch, "_convert", fake)
    assert fetch.fetch_smollm2() == stale
    assert fetch.fetch_smollm2() == stale
    assert len(calls) == 1 and json.loads((stale / "config.json").read_text()) == {"converted": True}


def test_fetch_cli_prints_the_dir(smollm2_dir):
    result = subprocess.run([sys.executable, "-m", "hippocrates.models.fetch", "smollm2"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip().splitlines()[-1] == str(smollm2_dir)


def test_generate_cli_streams_the_greedy_answer(smollm2_dir, ours, tokenizer, capsys):
    from hippocrates.models.generate import main
    question = "What is hypertension?"
    main(["--model", str(smollm2_dir), "--prompt", question, "--chat", "--max-new-tokens", "6"])
    streamed = capsys.readouterr().out
    expected = generate(ours, tokenizer, prompt_ids_for(tokenizer, question, chat=True), max_new_tokens=6)
    assert streamed == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    with pytest.raises(SystemExit, match="error: .*nowhere"):
        main(["--model", str(smollm2_dir.parent / "nowhere"), "--prompt", question])
