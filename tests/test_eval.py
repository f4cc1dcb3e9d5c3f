"""The evaluator against an independent `transformers` computation, its batching against the plain way, bad inputs."""
import dataclasses
import json
import random

import pytest
import torch

from hippocrates.eval import EvalError, evaluate, load_spec, load_task
from hippocrates.eval.run import main as run_main
from hippocrates.eval.scoring import (EncodedRequest, default_add_bos, encode_request, score_requests,
                          score_requests_reference)
from hippocrates.eval.tasks import build_request, build_requests
from hippocrates.models import ModelConfig, build_model, load_model, load_tokenizer


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def oracle(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def oracle_loglikelihoods(oracle, context: str, continuations: list[str], memo: dict,
                          separate: bool = False) -> list[tuple[float, int]]:
    """Each choice as its own full sequence through transformers; the boundary as lm-evaluation-harness 0.4 draws it,
    or (separate) as its v0.3 did: context and continuation encoded each on its own, no special tokens."""
    model, tokenizer = oracle
    out = []
    for continuation in continuations:
        if separate:
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            cont_ids = tokenizer.encode(continuation, add_special_tokens=False)
        else:
            context_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + continuation)
            cont_ids = whole[len(context_ids):]
        key = (tuple(context_ids + cont_ids[:-1]), len(cont_ids))  # one-token choices share one forward
        if key not in memo:
            with torch.no_grad():
                logits = model(torch.tensor([key[0]])).logits[0, -len(cont_ids):]  # [len(cont), V]
            memo[key] = torch.log_softmax(logits.double(), -1)
        logprobs = memo[key]
        out.append((logprobs[torch.arange(len(cont_ids)), torch.tensor(cont_ids)].sum().item(), len(cont_ids)))
    return out


def shortest_items(name: str, n: int):
    task = load_task(name)
    items = sorted(task.items, key=lambda i: len(i.question) + sum(map(len, i.choices)) + len(str(i.fields)))[:n]
    return dataclasses.replace(task, items=items)


@pytest.mark.parametrize("name, protocol, shots, n, batch_size", [
    ("medqa", "letter", 0, 3, 2),
    ("medmcqa", "letter", 0, 3, 8),
    ("pubmedqa", "letter", 0, 2, 2),
    ("medqa", "text", 0, 2, 2),
    ("medmcqa", "text", 0, 3, 1),
    ("medmcqa", "letter", 2, 3, 2),
    ("medmcqa", "text", 1, 2, 2),
])
def test_loglikelihoods_match_transformers(ours, oracle, name, protocol, shots, n, batch_size):
    model, tokenizer = ours
    task = shortest_items(name, n)
    run = evaluate(model, tokenizer, [task], num_fewshot=shots, protocol=protocol, batch_size=batch_size,
                   progress=False)
    memo = {}
    assert len(run["samples"]) == n
    for sample, request, item in zip(run["samples"], build_requests(task, task.items, protocol, shots), task.items):
        expected = oracle_loglikelihoods(oracle, request.context, request.continuations, memo,
                                         separate=protocol == "text")
        assert sample["num_tokens"] == [count for _, count in expected]
        assert sample["loglikelihoods"] == pytest.approx([ll for ll, _ in expected], abs=1e-3)
        lls = [ll for ll, _ in expected]
        norm = [ll / len(label) for ll, label in zip(lls, request.labels)]
        assert sample["prediction"] == max(range(len(lls)), key=lls.__getitem__)
        assert sample["prediction_norm"] == max(range(len(norm)), key=norm.__getitem__)
        assert sample["gold"] == item.gold
    result = run["results"][name]
    assert result["n"] == n and result["truncated"] == 0
    assert result["acc"] == pytest.approx(sum(s["acc"] for s in run["samples"]) / n)


def tiny_model(max_len=64, vocab=49152, seed=0, sliding_window=None):
    config = ModelConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=max_len, tie_word_embeddings=False,
                         sliding_window=sliding_window, architecture="mistral" if sliding_window else "llama")
    return build_model(config).init_weights(std=0.2, seed=seed).eval()


@pytest.mark.parametrize("sliding_window", [None, 12])
def test_prefix_sharing_equals_full_sequences(sliding_window):
    """Shared prefixes, padded batches, deduplicated rows and one-token contexts give the plain per-choice numbers."""
    rng = random.Random(0)
    model = tiny_model(vocab=101, sliding_window=sliding_window)
    requests = []
    for _ in range(9):
        context = [rng.randrange(101) for _ in range(rng.choice([1, 2, 7, 19, 30]))]
        shared = [rng.randrange(101) for _ in range(2)]
        continuations = [[rng.randrange(101)] for _ in range(2)]  # one-token choices share one row
        continuations += [shared + [rng.randrange(101)] for _ in range(2)]  # same cont[:-1]: one row
        continuations += [[rng.randrange(101) for _ in range(rng.randint(1, 6))]]
        requests.append(EncodedRequest(context, continuations))
    expected = score_requests_reference(model, requests)
    for batch_size in (1, 3, 16):
        got = score_requests(model, requests, batch_size=batch_size, progress=False)
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=1e-5)


def test_left_truncation(ours):
    """A context past the window keeps its last tokens, as lm-evaluation-harness does for the longest choice."""
    _, tokenizer = ours
    window = 24
    model = tiny_model(max_len=window)
    context = "Question: " + " ".join(f"word{i}" for i in range(40)) + "\nAnswer:"
    continuations = [" yes", " no, certainly not"]
    encoded = encode_request(tokenizer, context, continuations, add_bos=False, max_length=window)
    full_context = tokenizer.encode(context)
    longest = max(map(len, encoded.continuations))
    assert encoded.truncated and len(encoded.context) + longest - 1 == window
    assert encoded.context == full_context[-len(encoded.context):]
    [lls] = score_requests(model, [encoded], progress=False)
    i = max(range(len(continuations)), key=lambda j: len(encoded.continuations[j]))
    cont = encoded.continuations[i]
    lm_eval_input = (full_context + cont)[-(window + 1):][:-1]  # lm-evaluation-harness's truncation
    with torch.no_grad():
        logprobs = model(torch.tensor([lm_eval_input]))[0, -len(cont):].double().log_softmax(-1)
    assert lls[i] == pytest.approx(logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum().item(), abs=1e-4)
    task = shortest_items("medqa", 2)
    run = evaluate(model, tokenizer, [task], progress=False)
    assert run["results"]["medqa"]["truncated"] == 2


def test_token_boundary_and_bos_sentencepiece(data_dir):
    """LLaMA-2's SentencePiece: BOS first (its default), trailing context spaces move into the continuation."""
    import sentencepiece
    path = data_dir / "tokenizers" / "llama2_tokenizer.model"
    tokenizer = load_tokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert default_add_bos(tokenizer) is True
    for context, conts in [("Question: Is aspirin an NSAID?\nAnswer:", [" yes", " no", " maybe"]),
                           ("Answer: ", ["A", "Bradycardia"])]:
        encoded = encode_request(tokenizer, context, conts, add_bos=True, max_length=4096)
        stripped = context.rstrip()
        assert encoded.context == [sp.bos_id()] + sp.encode(stripped)
        for cont, ids in zip(conts, encoded.continuations):
            whole = [sp.bos_id()] + sp.encode(stripped + context[len(stripped):] + cont)
            assert ids == whole[len(encoded.context):]
    assert encode_request(tokenizer, "Answer:", [" A"], True, 4096).continuations == [[sp.piece_to_id("\u2581A")]]


def test_smollm2_has_no_bos_and_trainer_mode_restored(ours):
    model, tokenizer = ours
    assert default_add_bos(tokenizer) is False
    tiny = tiny_model().train()
    evaluate(tiny, tokenizer, [shortest_items("medmcqa", 1)], progress=False)
    assert tiny.training


# ---- bad inputs ----

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_row(**changes):
    row = {"question": "Which vitamin deficiency causes scurvy?", "opa": "A", "opb": "C", "opc": "D", "opd": "K",
           "cop": 2, "id": "q"}
    row.update(changes)
    return row


def medmcqa_like(tmp_path, rows):
    spec = {"name": "mine", "data": str(write_jsonl(tmp_path / "mine.jsonl", rows)), "question": "question",
            "options": ["opa", "opb", "opc", "opd"], "answer": "cop", "answer_format": "index1", "id": "id"}
    (tmp_path / "mine.json").write_text(json.dumps(spec))
    return tmp_path / "mine.json"


def test_unknown_task():
    with pytest.raises(EvalError, match="unknown task 'medqa5'"):
        load_task("medqa5")


def test_missing_field_names_file_and_line(tmp_path):
    row = good_row()
    del row["opc"]
    spec = medmcqa_like(tmp_path, [good_row(), row])
    with pytest.raises(EvalError, match=r"mine\.jsonl:line 2: missing field 'opc'"):
        load_task(str(spec))
    (tmp_path / "mine.jsonl").write_text(json.dumps(good_row()) + "\n{\"question\": \n")
    with pytest.raises(EvalError, match=r"mine\.jsonl:line 2: not valid JSON"):
        load_task(str(spec))


def test_answer_outside_choices(tmp_path):
    spec = medmcqa_like(tmp_path, [good_row(cop=5)])
    with pytest.raises(EvalError, match=r"mine\.jsonl:line 1: answer cop=5 is outside the choices"):
        load_task(str(spec))
    bad_letter = tmp_path / "medqa.jsonl"
    write_jsonl(bad_letter, [{"question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "E"}])
    spec = dataclasses.replace(load_task("medqa").spec, data=str(bad_letter))
    with pytest.raises(EvalError, match=r"medqa\.jsonl:line 1: answer answer_idx='E' is outside the choices"):
        load_task(spec)


def test_bad_spec_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\ndata: x.csv\nquestion: q\nanswer: a\noptions: [a, b]\n"
                                       "colums: [q, a]\n")
    with pytest.raises(EvalError, match=r"bad\.yaml: unknown key 'colums'"):
        load_spec(tmp_path / "bad.yaml")


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert run_main(["--model", "unused", "--tasks", "medqa,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'nope'") and "\n" not in err
    spec = medmcqa_like(tmp_path, [good_row(), {"question": "q"}])
    assert run_main(["--model", "unused", "--tasks", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mine.jsonl:line 2: missing field 'opa'" in err and "\n" not in err


# ---- user-defined tasks, outputs ----

def test_csv_and_parquet_spec_tasks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"q": "Which nerve innervates the diaphragm?", "A": "Vagus", "B": "Phrenic", "C": "Ulnar", "key": "B"},
            {"q": "Which bone is in the arm?", "A": "Femur", "B": "Tibia", "C": "Humerus", "key": "C"}]
    (tmp_path / "anatomy.csv").write_text("q,A,B,C,key\n" + "".join(
        f"{r['q']},{r['A']},{r['B']},{r['C']},{r['key']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "anatomy.parquet")
    for data in ("anatomy.csv", "anatomy.parquet"):
        (tmp_path / "spec.yaml").write_text(
            f"name: anatomy\ndata: {data}\nquestion: q\noptions: [A, B, C]\nanswer: key\n"
            "prompts:\n  letter:\n    template: \"{question}\\n{options}Answer:\"\n")
        task = load_task(str(tmp_path / "spec.yaml"))
        req = build_request(task, task.items[1], "letter", num_fewshot=1)
        assert req.context == ("Which nerve innervates the diaphragm?\nA. Vagus\nB. Phrenic\nC. Ulnar\nAnswer: B\n\n"
                               "Which bone is in the arm?\nA. Femur\nB. Tibia\nC. Humerus\nAnswer:")
        assert req.continuations == [" A", " B", " C"] and req.gold == 2


def test_template_with_unknown_field(tmp_path):
    spec = json.loads(medmcqa_like(tmp_path, [good_row()]).read_text())
    spec["prompts"] = {"letter": {"template": "Q: {questoin}\n{options}Answer:"}}
    (tmp_path / "typo.json").write_text(json.dumps(spec))
    with pytest.raises(EvalError, match=r"task mine: prompts.letter cannot be filled \(KeyError: 'questoin'\)"):
        load_task(str(tmp_path / "typo.json"))


def test_sliding_window_batch_span_not_item_length():
    """Two items that each fit the window, but whose padded batch does not: a long context with a one-token choice
    and a short context with a long choice. Batched, they must score as each does alone."""
    rng = random.Random(3)
    window = 16
    model = tiny_model(vocab=101, sliding_window=window)
    long_context = EncodedRequest([rng.randrange(101) for _ in range(14)], [[rng.randrange(101)] for _ in range(2)])
    long_choice = EncodedRequest([rng.randrange(101) for _ in range(2)],
                                 [[rng.randrange(101) for _ in range(14)], [rng.randrange(101)]])
    for req in (long_context, long_choice):  # each alone reads at most the window
        assert len(req.context) + max(map(len, req.continuations)) - 1 <= window
    requests = [long_context, long_choice]
    expected = score_requests_reference(model, requests)
    got = score_requests(model, requests, batch_size=2, progress=False)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-5)


def test_text_protocol_tokenizes_as_lm_eval_v03_letter_as_v04(data_dir):
    """LLaMA-2 SentencePiece on MedQA items: the text protocol encodes context and continuation each on its own with
    no BOS (lm-eval v0.3's loglikelihood: tok_encode(context), tok_encode(continuation)); the letter protocol keeps
    lm-eval 0.4's BOS + joint encoding."""
    import sentencepiece
    from hippocrates.eval.evaluator import PROTOCOL_BOUNDARY
    path = data_dir / "tokenizers" / "llama2_tokenizer.model"
    tokenizer = load_tokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    task = load_task("medqa", limit=3)
    for item in task.items:
        text = build_request(task, item, "text")
        boundary = PROTOCOL_BOUNDARY["text"]
        encoded = encode_request(tokenizer, text.context, text.continuations,
                                 default_add_bos(tokenizer, boundary), 4096, boundary)
        assert encoded.context == sp.encode(text.context)  # no BOS
        assert encoded.continuations == [sp.encode(c) for c in text.continuations]
        letter = build_request(task, item, "letter")
        encoded = encode_request(tokenizer, letter.context, letter.continuations,
                                 default_add_bos(tokenizer, PROTOCOL_BOUNDARY["letter"]), 4096)
        assert encoded.context == [sp.bos_id()] + sp.encode(letter.context)
        assert encoded.continuations == [([sp.bos_id()] + sp.encode(letter.context + c))[len(encoded.context):]
                                         for c in letter.continuations]
    first = task.items[0]
    assert first.choices[0].startswith("Disclose")
    request = build_request(task, first, "text")
    encoded = encode_request(tokenizer, request.context, request.continuations, False, 4096, "separate")
    assert [sp.id_to_piece(i) for i in encoded.continuations[0][:3]] == ["\u2581", "\u2581Dis", "close"]
    joint = encode_request(tokenizer, request.context, request.continuations, True, 4096, "joint")
    assert [sp.id_to_piece(i) for i in joint.continuations[0][:2]] == ["\u2581Dis", "close"]
