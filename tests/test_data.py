"""engine.data on real records: SFT masks token by token, CPT packing, DPO labels, bad input, the tokenized cache."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hippocrates.engine.data import (DEFAULT_CPT_DATA, DEFAULT_DPO_DATA, DEFAULT_SFT_DATA, DataConfig, DataError, RowDataset,
                         build_dataset)
from hippocrates.models import load_tokenizer

ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{}\n\n### Response:")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Tokenized rows go to a fresh dir (the model fetch keeps the shared cache)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("engine.data.cache.cache_dir", lambda: folder)
        yield


@pytest.fixture(scope="module")
def llama_tok(data_dir):
    return load_tokenizer(data_dir / "tokenizers" / "llama2_tokenizer.model")


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def first_records(path, n):
    if str(path).endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(next(f)) for _ in range(n)]
    return json.loads(Path(path).read_text())[:n]


def split_example(row, labels, segment_ids, segment):
    """One segment of a row -> its input ids, the positions whose labels are set, and its labels (plain lists)."""
    where = (segment_ids == segment).nonzero().flatten()
    ids = row[where].tolist()
    targets = [i for i, t in enumerate(where.tolist()) if labels[t] != -100]
    return ids, targets, labels[where].tolist()


def check_masked_example(tok, ids, targets, labels, prompt, response, bos, eos=True):
    """Token by token: labels[t] == ids[t+1] exactly on the response tokens, which decode to the response text
    (followed by eos, when `eos`)."""
    assert targets, "no target tokens"
    first = targets[0] + 1  # the first response token
    assert targets == list(range(targets[0], len(ids) - 1)), "targets are not one contiguous response span"
    target_set = set(targets)
    for t, label in enumerate(labels):
        assert label == (ids[t + 1] if t in target_set else -100)
    assert ids[:first] == tok.encode(prompt, bos=bos and tok.add_bos_token)
    if eos:
        assert ids[-1] == tok.eos_id
        ids = ids[:-1]
    assert tok.decode(ids[first:]) == response


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("source", DEFAULT_SFT_DATA)
def test_sft_alpaca_loss_only_on_response(source, pack, data_dir, smol_tok):
    n = 6
    ds = build_dataset("sft", DataConfig(path=source, limit=n, pack=pack), smol_tok, seq_len=1024)
    path, _, mapping = source.partition(":")
    fields = dict(pair.split("=") for pair in mapping.split(",")) if mapping else {}
    records = first_records(data_dir / path, n)
    examples = []
    for row in range(len(ds)):
        batch = ds[torch.tensor([row])]
        segments = batch["segment_ids"][0]
        for segment in segments.unique().tolist():
            ids, targets, labels = split_example(batch["input_ids"][0], batch["labels"][0], segments, segment)
            if targets:
                examples.append((ids, targets, labels))
            else:
                assert set(ids) == {smol_tok.pad_id}, "a segment without targets must be padding"
    assert len(examples) == n and (len(ds) < n) == pack
    for record, (ids, targets, labels) in zip(records, examples):
        instruction = record[fields.get("instruction", "instruction")]
        output = record[fields.get("output", "output")]
        given = record.get(fields.get("input", "input")) or ""
        prompt = ALPACA_INPUT.format(instruction, given) if given.strip() else ALPACA_NO_INPUT.format(instruction)
        check_masked_example(smol_tok, ids, targets, labels, prompt, output, bos=True)


def test_sft_chat_template_loss_only_on_response(data_dir, smol_tok):
    n = 8
    ds = build_dataset("sft", DataConfig(path="instruct/medalpaca_medical_meadow_small.json", limit=n,
                                         template="chat"), smol_tok, seq_len=1024)
    assert len(ds) == n
    for row, record in enumerate(first_records(data_dir / "instruct/medalpaca_medical_meadow_small.json", n)):
        user = f"{record['instruction']}\n\n{record['input']}" if record["input"].strip() else record["instruction"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        prompt = smol_tok.apply_chat_template(messages[:1], add_generation_prompt=True)
        full = smol_tok.apply_chat_template(messages)
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert full.startswith(prompt)
        b = ds[row]
        ids, targets, labels = split_example(b["input_ids"], b["labels"], b["segment_ids"], 0)
        check_masked_example(smol_tok, ids, targets, labels, prompt, full[len(prompt):], bos=False, eos=False)


def test_sft_chat_messages_train_every_assistant_turn(tmp_path, smol_tok):
    conversation = [{"role": "user", "content": "I have a headache."},
                    {"role": "assistant", "content": "How long have you had it?"},
                    {"role": "user", "content": "Two days, with fever."},
                    {"role": "assistant", "content": "Please see a doctor today."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    ds = build_dataset("sft", DataConfig(path=str(path), template="chat"), smol_tok, seq_len=256)
    b = ds[0]
    ids = b["input_ids"][b["segment_ids"] == 0].tolist()
    labels = b["labels"].tolist()
    targets = [ids[t + 1] for t in range(len(ids) - 1) if labels[t] != -100]
    assert smol_tok.decode(targets) == "How long have you had it?<|im_end|>\nPlease see a doctor today.<|im_end|>\n"
    assert smol_tok.decode(ids) == smol_tok.apply_chat_template(conversation)


def test_prompt_not_a_token_prefix_is_handled(tmp_path, llama_tok):
    # SentencePiece merges "Response:" and a response starting with "-" into one token ":-"
    path = tmp_path / "dash.jsonl"
    path.write_text(json.dumps({"instruction": "List signs of edema.", "output": "- Swelling of the legs"}) + "\n")
    prompt = ALPACA_NO_INPUT.format("List signs of edema.")
    assert llama_tok.encode(prompt + "- Swelling", bos=True)[:-1] != llama_tok.encode(prompt, bos=True)
    b = build_dataset("sft", DataConfig(path=str(path)), llama_tok, seq_len=128)[0]
    ids, targets, labels = split_example(b["input_ids"], b["labels"], b["segment_ids"], 0)
    check_masked_example(llama_tok, ids, targets, labels, prompt, "- Swelling of the legs", bos=True)


def test_cpt_rows_reconstruct_stream_and_segments(data_dir, smol_tok):
    n, seq_len = 25, 128
    ds = build_dataset("cpt", DataConfig(path=DEFAULT_CPT_DATA, limit=n), smol_tok, seq_len)
    assert not smol_tok.add_bos_token  # SmolLM2's documents are separated by eos only
    documents = [smol_tok.encode(r["answer"]) + [smol_tok.eos_id]
                 for r in first_records(data_dir / "corpus/medquad_qa.jsonl", n)]
    stream = [t for d in documents for t in d]
    doc_of = [i for i, d in enumerate(documents) for _ in d]
    ids, labels, segments = (ds.tensors[k] for k in ("input_ids", "labels", "segment_ids"))
    assert ids.shape == (-(-len(stream) // seq_len), seq_len) and ds.num_tokens == len(stream)
    flat_ids, flat_labels = ids.flatten().tolist(), labels.flatten().tolist()
    assert flat_ids[:len(stream)] == stream
    assert set(flat_ids[len(stream):]) <= {smol_tok.pad_id}
    for t, label in enumerate(flat_labels):
        same_document = t + 1 < len(stream) and doc_of[t] == doc_of[t + 1]
        assert label == (stream[t + 1] if same_document else -100), f"position {t}"
    for r in range(len(ids)):
        row_docs = doc_of[r * seq_len:(r + 1) * seq_len]
        row_docs += [None] * (seq_len - len(row_docs))  # padding
        expected = [0]
        for t in range(1, seq_len):
            expected.append(expected[-1] + (row_docs[t] != row_docs[t - 1]))
        assert segments[r].tolist() == expected


def test_dpo_labels_only_on_responses(data_dir, smol_tok):
    n = 6
    ds = build_dataset("dpo", DataConfig(path=DEFAULT_DPO_DATA, limit=n), smol_tok, seq_len=2048)
    assert set(ds.tensors) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert len(ds) == n
    for row, record in enumerate(first_records(data_dir / DEFAULT_DPO_DATA, n)):
        prompt = ALPACA_NO_INPUT.format(record["prompt"])
        b = ds[row]
        for side in ("chosen", "rejected"):
            ids, labels = b[f"{side}_input_ids"], b[f"{side}_labels"].tolist()
            length = len(smol_tok.encode(prompt + record[side])) + 1
            assert set(ids[length:].tolist()) <= {smol_tok.pad_id} and set(labels[length - 1:]) == {-100}
            targets = [i for i, label in enumerate(labels) if label != -100]
            check_masked_example(smol_tok, ids[:length].tolist(), targets, labels[:length], prompt,
                                 record[side], bos=True)


def test_held_out_and_limit(tmp_path, llama_tok):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(20)))
    cfg = DataConfig(path=str(path), held_out=5)
    train = build_dataset("sft", cfg, llama_tok, 64)
    held = build_dataset("sft", cfg, llama_tok, 64, part="held_out")
    limited = build_dataset("sft", DataConfig(path=str(path), held_out=5, limit=3), llama_tok, 64)
    assert (len(train), len(held), len(limited)) == (15, 5, 3)
    answers = [llama_tok.decode(r["labels"][r["labels"] != -100].tolist()) for r in (held[i] for i in range(5))]
    assert answers == [f"Answer {i}." for i in range(15, 20)]
    with pytest.raises(DataError, match="held_out"):
        build_dataset("sft", DataConfig(path=str(path)), llama_tok, 64, part="held_out")


def test_text_csv_parquet_sources(tmp_path, llama_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "notes.txt").write_text("First paragraph about insulin.\n\nSecond paragraph,\non two lines.\n")
    (tmp_path / "pairs.csv").write_text('question,answer\n"What is HbA1c?","A marker, of glucose."\n')
    pq.write_table(pa.table({"q": ["What is LDL?"], "a": ["A lipoprotein."]}), tmp_path / "pairs.parquet")
    for unit, documents in (("document", 1), ("paragraph", 2)):
        ds = build_dataset("cpt", DataConfig(path=str(tmp_path / "notes.txt"), text_unit=unit), llama_tok, 512)
        assert (ds.tensors["input_ids"][0] == llama_tok.bos_id).sum() == documents
    sources = [f"{tmp_path / 'pairs.csv'}:instruction=question,output=answer",
               f"{tmp_path / 'pairs.parquet'}:instruction=q,output=a"]
    ds = build_dataset("sft", DataConfig(path=sources), llama_tok, 128)
    responses = [llama_tok.decode(ds[i]["labels"][ds[i]["labels"] != -100].tolist()) for i in range(2)]
    assert responses == ["A marker, of glucose.", "A lipoprotein."]
    pq.write_table(pa.table({"q": ["What is LDL?", "What is HDL?"], "a": ["A lipoprotein.", None]}),
                   tmp_path / "holes.parquet")
    with pytest.raises(DataError, match=r"holes\.parquet, record 1: missing field 'a'"):
        build_dataset("sft", DataConfig(path=f"{tmp_path / 'holes.parquet'}:instruction=q,output=a"), llama_tok, 128)


def test_directory_source_reads_its_files_in_order(tmp_path, llama_tok):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text(json.dumps({"text": "Beta blockers."}) + "\n")
    (folder / "sub" / "c.txt").write_text("Calcium channels.")
    (folder / "a.json").write_text(json.dumps([{"text": "Aspirin."}]))
    (folder / ".hidden.jsonl").write_text("not json\n")
    ds = build_dataset("cpt", DataConfig(path=str(folder)), llama_tok, 64)
    ids = ds.tensors["input_ids"][0][ds.tensors["segment_ids"][0] < 3].tolist()
    assert llama_tok.decode(ids) == "Aspirin. Beta blockers. Calcium channels."


# ---- bad input: a DataError naming file and line, or skipped and counted ----

GOOD_SFT = json.dumps({"instruction": "Define anemia.", "output": "A lack of red blood cells."})
GOOD_DPO = json.dumps({"prompt": "Is aspirin safe?", "chosen": "Ask your doctor.", "rejected": "Always."})
BAD_CASES = {  # stage, file name, content, the error (a regex), usable records in the file
    "malformed JSON line": ("sft", "bad.jsonl", [GOOD_SFT, '{"instruction": "x", "output": ', GOOD_SFT],
                            r"bad\.jsonl, line 2: malformed JSON", 2),
    "missing field": ("sft", "bad.jsonl", [GOOD_SFT, GOOD_SFT, json.dumps({"instruction": "Define gout."})],
                      r"bad\.jsonl, line 3: missing field 'output'", 2),
    "non-UTF-8 byte": ("sft", "bad.jsonl", [GOOD_SFT, b'{"instruction": "caf\xe9", "output": "x"}', GOOD_SFT],
                       r"bad\.jsonl, line 2: not UTF-8 \(byte 0xe9", 2),
    "longer than seq_len": ("sft", "bad.jsonl", [GOOD_SFT, json.dumps({"instruction": "Q", "output": "word " * 300})],
                            r"bad\.jsonl, line 2: \d+ tokens, longer than seq_len=128", 1),
    "chosen equals rejected": ("dpo", "bad.jsonl", [GOOD_DPO, json.dumps({"prompt": "Q?", "chosen": "Yes.",
                                                                          "rejected": "Yes. "})],
                               r"bad\.jsonl, line 2: 'chosen' equals 'rejected'", 1),
    "DPO pair longer than seq_len": ("dpo", "bad.jsonl", [json.dumps({"prompt": "Q?", "chosen": "no " * 300,
                                                                      "rejected": "No."}), GOOD_DPO],
                                     r"bad\.jsonl, line 1: chosen: \d+ tokens, longer than seq_len=128", 1),
    "missing field in a JSON array": ("sft", "bad.json", "[%s, {\"output\": \"x\"}]" % GOOD_SFT,
                                      r"bad\.json, record 1: missing field 'instruction'", 1),
    "empty file": ("sft", "empty.jsonl", "\n\n", r"empty\.jsonl: empty file", 0),
}


def write_case(tmp_path, name, lines):
    path = tmp_path / name
    if isinstance(lines, str):
        path.write_text(lines)
    else:
        path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_file_and_line_or_is_skipped(case, tmp_path, llama_tok, caplog):
    stage, name, content, message, usable = BAD_CASES[case]
    path = write_case(tmp_path, name, content)
    good = write_case(tmp_path, "good.jsonl", [GOOD_SFT if stage == "sft" else GOOD_DPO] * 2)
    with pytest.raises(DataError) as error:
        build_dataset(stage, DataConfig(path=[str(good), str(path)]), llama_tok, seq_len=128)
    assert re.search(message, str(error.value)) and str(tmp_path) in str(error.value)
    assert "\n" not in str(error.value)

    with caplog.at_level(logging.WARNING, logger="hippocrates"):
        ds = build_dataset(stage, DataConfig(path=[str(good), str(path)], skip_bad_records=True), llama_tok, 128)
    assert ds.num_skipped == 1 and "skipped 1 bad records" in caplog.text and name in caplog.text
    assert len(ds) == 2 + usable
    labels = ds.tensors["labels" if stage == "sft" else "chosen_labels"]
    assert (labels != -100).any(dim=1).all(), "a row without targets"


def test_long_cpt_document_is_cut_across_rows(tmp_path, llama_tok):
    path = write_case(tmp_path, "long.jsonl", [json.dumps({"text": "cell " * 300})])
    ds = build_dataset("cpt", DataConfig(path=str(path)), llama_tok, seq_len=64)
    assert len(ds) >= 5 and ds.num_skipped == 0


def test_bad_source_and_options(tmp_path, llama_tok):
    with pytest.raises(DataError, match="no such file"):
        build_dataset("cpt", DataConfig(path=str(tmp_path / "missing.jsonl")), llama_tok, 64)
    path = write_case(tmp_path, "x.json", '[{"text": "a"},\n {"text": "b",]')
    with pytest.raises(DataError, match=r"x.json, line 2: malformed JSON"):
        build_dataset("cpt", DataConfig(path=str(path), skip_bad_records=True), llama_tok, 64)
    with pytest.raises(DataError, match="unknown field role 'answer'"):
        build_dataset("cpt", DataConfig(path=f"{path}:answer=text"), llama_tok, 64)
    with pytest.raises(DataError, match="no chat template"):
        build_dataset("sft", DataConfig(path=str(path), template="chat"), llama_tok, 64)


# ---- the tokenized cache ----

def test_cache_hit_and_invalidation(tmp_path, data_dir, llama_tok):
    path = write_case(tmp_path, "docs.jsonl", [json.dumps({"text": f"Document {i} on asthma."}) for i in range(5)])
    cfg = DataConfig(path=str(path))
    first = build_dataset("cpt", cfg, llama_tok, 16)
    second = build_dataset("cpt", cfg, llama_tok, 16)
    assert not first.from_cache and second.from_cache and isinstance(second, RowDataset)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    assert second.num_tokens == first.num_tokens
    assert not build_dataset("cpt", cfg, llama_tok, 32).from_cache                  # parameters
    mistral = load_tokenizer(data_dir / "tokenizers" / "mistral_7b_v0.1_tokenizer.model")
    assert not build_dataset("cpt", cfg, mistral, 16).from_cache                       # tokenizer
    with open(path, "a") as f:
        f.write(json.dumps({"text": "A new document on asthma."}) + "\n")
    changed = build_dataset("cpt", cfg, llama_tok, 16)                                 # the file
    assert not changed.from_cache and changed.num_tokens > first.num_tokens
    assert build_dataset("cpt", cfg, llama_tok, 16).from_cache


def test_ranks_building_at_once_tokenize_once(tmp_path, data_dir):
    """Two processes (as torchrun's ranks) ask for the same rows together: one builds them, the other reads them."""
    path = write_case(tmp_path, "docs.jsonl", [json.dumps({"text": f"Note {i} on sepsis. " * 50}) for i in range(400)])
    script = (
        "import sys, time; from pathlib import Path; from engine.data import DataConfig, build_dataset\n"
        "import engine.data.cache as c; from models import load_tokenizer; c.cache_dir = lambda: Path(sys.argv[2])\n"
        f"tok = load_tokenizer({str(data_dir / 'tokenizers' / 'llama2_tokenizer.model')!r})\n"
        "Path(sys.argv[3]).touch()\n"
        "deadline = time.time() + 60\n"
        "while len(list(Path(sys.argv[2]).parent.glob('ready-*'))) < 2 and time.time() < deadline: time.sleep(0.005)\n"
        "ds = build_dataset('cpt', DataConfig(path=sys.argv[1]), tok, 256)\n"
        "print(ds.from_cache, ds.num_tokens)\n")
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(path), str(tmp_path / "cache"),
                               str(tmp_path / f"ready-{rank}")],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
             for rank in range(2)]
    outputs = sorted(rank.communicate(timeout=120)[0].split() for rank in ranks)
    assert all(rank.returncode == 0 for rank in ranks)
    assert [o[0] for o in outputs] == ["False", "True"] and outputs[0][1] == outputs[1][1]
