"""engine.data on real records: SFT masks token by token, CPT packing, DPO labels, bad input, the tokenized cache."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hippocrates.engine.data import (DEFAULT_CPT_DATA, DEFAULT_DPO_DATA, DEFAULT_SFT_DATA, DataConfig, DataError,
                                     RowDataset, build_dataset)
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
        patch.setattr("hippocrates.engine.data.cache.cache_dir", lambda: folder)
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
    ids, labels, segments = (ds[:][k] for k in ("input_ids", "labels", "segment_ids"))
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
    assert set(ds[:]) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
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
        assert (ds[0]["input_ids"] == llama_tok.bos_id).sum() == documents
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
    ids = ds[0]["input_ids"][ds[0]["segment_ids"] < 3].tolist()
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
    labels = ds[:]["labels" if stage == "sft" else "chosen_labels"]
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
    assert all(torch.equal(first[:][k], second[:][k]) for k in first[:])
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
        "import sys, time; from pathlib import Path; from hippocrates.engine.data import DataConfig, build_dataset\n"
        "import hippocrates.engine.data.cache as c; from hippocrates.models import load_tokenizer\n"
        "c.cache_dir = lambda: Path(sys.argv[2])\n"
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


# ---- compact rows: 3 bytes per token, the same batches as three int64 tensors ----

def reference_rows(stage, groups, seq_len, pad_id, pack=False):
    """The rows as engine.data built them before they were stored compactly: three int64 tensors per side."""
    def shifted(example):
        labels = torch.full((len(example.ids),), -100)
        labels[:-1] = torch.where(torch.from_numpy(example.trainable[1:]), torch.from_numpy(example.ids[1:]), -100)
        return labels

    if stage == "cpt":
        stream = torch.cat([torch.from_numpy(g[0].ids) for g in groups])
        doc = torch.cat([torch.full((len(g[0].ids),), i) for i, g in enumerate(groups)])
        rows = -(-len(stream) // seq_len)
        pad = rows * seq_len - len(stream)
        stream = torch.cat([stream, torch.full((pad,), pad_id)])
        doc = torch.cat([doc, torch.full((pad,), -1)])
        next_doc = torch.cat([doc[1:], torch.tensor([-1])])
        labels = torch.where((next_doc == doc) & (doc >= 0), torch.cat([stream[1:], torch.tensor([pad_id])]), -100)
        doc = doc.view(rows, seq_len)
        segments = doc - doc[:, :1]
        if pad:
            segments[-1, seq_len - pad:] = segments[-1, seq_len - pad - 1] + 1
        return {"input_ids": stream.view(rows, seq_len), "labels": labels.view(rows, seq_len), "segment_ids": segments}
    sides = ("chosen_", "rejected_") if stage == "dpo" else ("",)
    packed = []
    for group in groups:
        if stage == "sft" and pack and packed and sum(len(e.ids) for e in packed[-1]) + len(group[0].ids) <= seq_len:
            packed[-1].append(group[0])
        else:
            packed.append(list(group))
    out = {}
    for side, index in zip(sides, range(2)):
        row_groups = [[g[index]] for g in packed] if stage == "dpo" else packed
        ids = torch.full((len(row_groups), seq_len), pad_id)
        labels = torch.full((len(row_groups), seq_len), -100)
        segments = torch.zeros((len(row_groups), seq_len), dtype=torch.long)
        for row, examples in enumerate(row_groups):
            start = 0
            for segment, example in enumerate(examples):
                end = start + len(example.ids)
                ids[row, start:end] = torch.from_numpy(example.ids)
                labels[row, start:end] = shifted(example)
                segments[row, start:end] = segment
                start = end
            segments[row, start:] = len(examples)
        out.update({f"{side}input_ids": ids, f"{side}labels": labels})
        if stage != "dpo":
            out["segment_ids"] = segments
    return out


@pytest.mark.parametrize("stage,pack,vocab", [("cpt", False, 32000), ("cpt", False, 128256), ("sft", False, 32000),
                                              ("sft", True, 49152), ("dpo", False, 32000)])
def test_rows_take_three_bytes_per_token_and_batch_as_before(stage, pack, vocab):
    from hippocrates.engine.data.examples import Tokenized
    from hippocrates.engine.data.rows import cpt_rows, dpo_rows, sft_rows
    generator = torch.Generator().manual_seed(vocab + pack)
    seq_len, pad_id = 24, 0

    def example():
        length = int(torch.randint(1, 60 if stage == "cpt" else seq_len + 1, (), generator=generator))
        ids = torch.randint(0, vocab, (length,), generator=generator).numpy()
        return Tokenized(ids, (torch.rand(length, generator=generator) < 0.6).numpy())

    groups = [[example() for _ in range(2 if stage == "dpo" else 1)] for _ in range(40)]
    if stage == "cpt":
        columns = cpt_rows([g[0] for g in groups], seq_len, pad_id)
    elif stage == "sft":
        columns = sft_rows([g[0] for g in groups], seq_len, pad_id, pack)
    else:
        columns = dpo_rows([tuple(g) for g in groups], seq_len, pad_id)
    dataset = RowDataset(columns)
    expected = reference_rows(stage, groups, seq_len, pad_id, pack)
    assert dataset.bytes_per_token == (3 if vocab <= 2**16 else 5) <= 8
    assert set(dataset[:]) == set(expected)
    rows = torch.randperm(len(dataset), generator=generator)[:7]
    for index in (slice(None), rows, int(rows[0])):
        batch = dataset[index]
        for key, value in expected.items():
            assert batch[key].dtype == torch.int64 and torch.equal(batch[key], value[index]), (key, index)


def test_cached_rows_are_memory_mapped(tmp_path, llama_tok):
    path = write_case(tmp_path, "docs.jsonl", [json.dumps({"text": f"Note {i} on gout."}) for i in range(30)])
    cached = build_dataset("cpt", DataConfig(path=str(path)), llama_tok, 32)
    cached = build_dataset("cpt", DataConfig(path=str(path)), llama_tok, 32)
    fresh = build_dataset("cpt", DataConfig(path=str(path), cache=False), llama_tok, 32)
    assert cached.from_cache and all(isinstance(c, np.memmap) for c in cached.columns.values())
    assert cached.columns["input_ids"].dtype == np.uint16 and cached.bytes_per_token == 3
    assert all(torch.equal(cached[:][k], fresh[:][k]) for k in fresh[:])


# ---- tokenization across ranks ----

def test_sentencepiece_encodes_with_the_cores_of_its_rank(monkeypatch, llama_tok):
    """16 cores, 4 ranks on the node: 4 threads each (no longer a fixed 2)."""
    from hippocrates.models import tokenizer as tokenizer_module
    monkeypatch.setattr(tokenizer_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    threads = []
    encode = llama_tok.sp.encode
    monkeypatch.setattr(llama_tok.sp, "encode", lambda text, **kw: threads.append(kw.get("num_threads")) or
                        encode(text, **kw))
    texts = ["Aspirin inhibits COX-1.", "Gout: uric acid crystals."]
    assert llama_tok.encode_batch(texts) == [encode(text) for text in texts]
    assert threads == [4]


def share_worker(tokenizer_path: str, sources: str, report_dir: str):
    """One process (or a torchrun rank): build CPT and SFT rows; write how many texts this rank encoded for each
    into report_dir (a file per rank and stage: the ranks' stdout lines can interleave)."""
    import torch.distributed as dist
    from hippocrates.engine import distributed
    tokenizer = load_tokenizer(tokenizer_path)
    encoded = []
    encode_batch = tokenizer.encode_batch
    tokenizer.encode_batch = lambda texts, **kw: encoded.extend(texts) or encode_batch(texts, **kw)
    env = distributed.setup()
    for stage, paths in json.loads(sources).items():
        encoded.clear()
        config = DataConfig(path=paths, skip_bad_records=True, pack=stage == "sft", limit=300)
        dataset = build_dataset(stage, config, tokenizer, 256)
        report = {"stage": stage, "rank": env.rank, "texts": len(encoded), "rows": len(dataset),
                  "skipped": dataset.num_skipped}
        (Path(report_dir) / f"{stage}-rank{env.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_two_ranks_tokenize_half_each_into_the_same_cache(tmp_path, data_dir):
    """CPT and SFT rows built by 2 ranks (each encodes about half the texts) are the 1-rank cache byte for byte,
    bad records skipped on either rank included."""
    from hippocrates.tests.train_helpers import REPO, run_env
    too_long = json.dumps({"instruction": "Q", "output": "word " * 300})  # CPT: no 'text'; SFT: too long
    bad = write_case(tmp_path, "bad.jsonl", [GOOD_SFT, too_long])
    cpt_bad = write_case(tmp_path, "cpt_bad.jsonl", [json.dumps({"text": "Gout is an arthritis."}), too_long])
    sources = json.dumps({"cpt": [str(cpt_bad), "corpus/medquad_qa.jsonl:text=answer"],
                          "sft": [str(bad), "instruct/medalpaca_medical_meadow_small.json"]})
    tokenizer = str(data_dir / "tokenizers" / "llama2_tokenizer.model")
    runs = {}
    for nproc in (1, 2):
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node=2", "--standalone", "--monitor_interval=0.2"]
        cache = tmp_path / f"cache{nproc}"
        report_dir = tmp_path / f"reports{nproc}"
        report_dir.mkdir()
        result = subprocess.run([*launcher, __file__, tokenizer, sources, str(report_dir)], cwd=REPO,
                                env=run_env(HIPPO_CACHE_DIR=str(cache)), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        reports = [json.loads(path.read_text()) for path in sorted(report_dir.glob("*.json"))]
        files = {path.name.split("-")[0]: path.read_bytes() for path in (cache / "tokenized").glob("*.safetensors")}
        assert sorted(files) == ["cpt", "sft"] and not list((cache / "tokenized").glob(".*share*"))
        runs[nproc] = reports, files
    (one_rank, one_rank_files), (two_ranks, two_rank_files) = runs[1], runs[2]
    assert two_rank_files == one_rank_files
    for stage in ("cpt", "sft"):
        (single,) = [r for r in one_rank if r["stage"] == stage]
        ranks = sorted((r for r in two_ranks if r["stage"] == stage), key=lambda r: r["rank"])
        assert [(r["rows"], r["skipped"]) for r in ranks] == [(single["rows"], single["skipped"])] * 2
        assert single["skipped"] >= 1 and single["rows"] > 1
        texts = [r["texts"] for r in ranks]
        assert sum(texts) == single["texts"] and all(0.4 * sum(texts) <= n <= 0.6 * sum(texts) for n in texts), texts


NO_DATASETS = """
import importlib.machinery, runpy, sys
class NoDatasets(importlib.machinery.PathFinder):  # as on a machine without the package: not found, not importable
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "datasets" else super().find_spec(name, path, target)
sys.meta_path = [NoDatasets if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
assert "datasets" not in sys.modules
"""


def test_training_on_jsonl_needs_no_datasets_package(tmp_path, data_dir):
    """`datasets` is imported only for the formats that need it (CSV, parquet, plain text, hub names)."""
    from hippocrates.tests.train_helpers import REPO, cpt_args, make_tiny_model, run_env
    path = write_case(tmp_path, "docs.jsonl", [json.dumps({"text": f"Note {i} on gout and uric acid."})
                                               for i in range(12)])
    model = make_tiny_model(tmp_path / "model", data_dir)
    args = cpt_args(model, tmp_path / "run", data=path, max_steps=1, **{"data.limit": 12})
    result = subprocess.run([sys.executable, "-c", NO_DATASETS, str(REPO / "train" / "cpt.py"), *args], cwd=REPO,
                            env=run_env(HIPPO_CACHE_DIR=str(tmp_path / "cache")), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip()


if __name__ == "__main__":
    share_worker(*sys.argv[1:])
