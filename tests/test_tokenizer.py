"""Token ids against the reference tokenizers on real medical text, chat templates against transformers, save/load."""
import json
import random
import re

import pytest
import sentencepiece

from hippocrates.models import load_tokenizer
from hippocrates.models.tokenizer import ChatTemplateError, TokenizerError

SENTENCEPIECE_FILES = ["llama2_tokenizer.model", "mistral_7b_v0.1_tokenizer.model"]
EDGE_CASES = ["", " ", "  two leading spaces", "trailing  ", "a\n\n\tb", "x  2 and 3.14 mg/kg, 1/2 ½ ²", "Café naïve — 😀",
              "tabs\tand\r\nCRLF", "Ünïcödé 漢字 مرحبا", "HbA1c <7%; BP 120/80 mmHg"]

# SmolLM2's published tokenizer.json splits digits one by one before GPT-2's byte-level regex (llama.cpp names this
# pre-tokenizer "smollm" in the GGUF). transformers' GGUF conversion ignores that name and keeps GPT-2's regex alone,
# which differs only where a run of spaces precedes a digit ("x  2"). The oracle is that conversion with the published
# pre-tokenizer put back; the unpatched conversion must agree everywhere else.
SMOLLM2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}

LLAMA2_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = false %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the first-line treatment for type 2 diabetes?"}],
    [{"role": "system", "content": "You are a careful clinician."},
     {"role": "user", "content": "A 45-year-old has a BP of 150/95 mmHg. Next step?"},
     {"role": "assistant", "content": "Repeat the measurement, then consider lifestyle changes. "},
     {"role": "user", "content": "And if it stays high?"}],
]


@pytest.fixture(scope="module")
def texts(data_dir):
    """Real texts: MedQuAD answers and MedQA questions (a random, seeded sample), plus edge cases."""
    rng = random.Random(1234)
    answers = [json.loads(line)["answer"] for line in open(data_dir / "corpus" / "medquad_qa.jsonl")]
    questions = [json.loads(line)["question"] for line in open(data_dir / "eval" / "medqa" / "test.jsonl")]
    return rng.sample(answers, 150) + rng.sample(questions, 150) + EDGE_CASES


@pytest.fixture(scope="module", params=SENTENCEPIECE_FILES)
def sp_file(request, data_dir):
    return data_dir / "tokenizers" / request.param


def sentencepiece_reference(path, texts):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return [[sp.bos_id()] + sp.encode(text) for text in texts], sp


def test_sentencepiece_ids_match_reference(sp_file, texts):
    tok = load_tokenizer(sp_file)
    expected, sp = sentencepiece_reference(sp_file, texts)
    assert tok.encode_batch(texts, bos=True) == expected
    assert [tok.encode(t, bos=True) for t in texts[:20]] == expected[:20]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
    assert tok.encode("fever", eos=True)[-1] == tok.eos_id
    assert [tok.decode(ids[1:]) for ids in expected] == [sp.decode(ids) for ids in expected]


def test_sentencepiece_special_tokens_in_text_become_ids(sp_file):
    tok = load_tokenizer(sp_file)
    ids = tok.encode("<s>[INST] hi [/INST]")
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("[INST] hi [/INST]")


def test_sentencepiece_saved_dir_matches_reference(sp_file, texts, tmp_path):
    """save() writes tokenizer.model plus a converted tokenizer.json: both ours and AutoTokenizer reproduce sp."""
    from transformers import AutoTokenizer
    expected, _ = sentencepiece_reference(sp_file, texts)
    tok = load_tokenizer(sp_file)
    tok.chat_template = LLAMA2_STYLE_TEMPLATE
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == sp_file.read_bytes()
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode_batch(texts, bos=True) == expected
    assert reloaded.decode(expected[3], skip_special_tokens=True) == tok.decode(expected[3])
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert [auto.encode(t) for t in texts] == expected
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_id, tok.eos_id)
    for messages in CONVERSATIONS:
        ours = reloaded.apply_chat_template(messages)
        assert ours == auto.apply_chat_template(messages, tokenize=False)
        assert ours.startswith("<s>[INST] ")


def test_chat_template_raise_exception_and_sandbox(sp_file):
    tok = load_tokenizer(sp_file)
    tok.chat_template = LLAMA2_STYLE_TEMPLATE
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hello"}])
    tok.chat_template = "{{ messages.append({'role': 'user'}) }}"
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def smollm2_gguf():
    from hippocrates.models.fetch import smollm2_gguf as find
    return find()


@pytest.fixture(scope="module")
def smollm2_oracle(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def ours_gguf(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def test_smollm2_ids_match_transformers(ours_gguf, smollm2_dir, smollm2_oracle, texts):
    import copy
    from tokenizers import Tokenizer as Backend
    ours_dir = load_tokenizer(smollm2_dir)
    plain = [smollm2_oracle.encode(t) for t in texts]
    patched_json = json.loads(smollm2_oracle.backend_tokenizer.to_str())
    patched_json["pre_tokenizer"] = copy.deepcopy(SMOLLM2_PRE_TOKENIZER)
    patched = Backend.from_str(json.dumps(patched_json))
    expected = [e.ids for e in patched.encode_batch(texts, add_special_tokens=False)]

    got = ours_gguf.encode_batch(texts)
    assert got == expected
    assert ours_dir.encode_batch(texts) == expected
    disagreements = [t for t, a, b in zip(texts, plain, expected) if a != b]
    assert all(re.search(r"\s{2,}\d", t) for t in disagreements)
    assert len(disagreements) < len(texts) // 10
    assert [ours_gguf.decode(ids) for ids in got] == texts  # byte-level BPE is lossless
    assert (ours_gguf.bos_id, ours_gguf.eos_id, ours_gguf.pad_id, ours_gguf.vocab_size) == (
        smollm2_oracle.bos_token_id, smollm2_oracle.eos_token_id, smollm2_oracle.pad_token_id, len(smollm2_oracle))
    im_start = ours_gguf.token_to_id("<|im_start|>")
    assert ours_gguf.encode("<|im_start|>user\nhi<|im_end|>")[0] == im_start


def test_smollm2_saved_dir_loads_in_transformers(smollm2_dir, texts):
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = load_tokenizer(smollm2_dir)
    assert [auto.encode(t) for t in texts] == ours.encode_batch(texts)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_chat_template_matches_transformers(ours_gguf, smollm2_oracle, add_generation_prompt):
    ours = ours_gguf
    assert ours.chat_template and ours.chat_template == smollm2_oracle.chat_template
    for messages in CONVERSATIONS:
        rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert rendered == smollm2_oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                              tokenize=False)
        assert rendered.startswith("<|im_start|>system\n")


def test_sentencepiece_vocabulary_inside_gguf(data_dir, tmp_path, texts):
    """A GGUF carrying a SentencePiece vocabulary (llama.cpp's layout) encodes like the .model it came from."""
    import gguf
    path = data_dir / "tokenizers" / SENTENCEPIECE_FILES[0]
    sp_tok = load_tokenizer(path)
    pieces, scores, kinds = sp_tok.pieces()
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp_tok.bos_id)
    writer.add_eos_token_id(sp_tok.eos_id)
    writer.add_unk_token_id(sp_tok.unk_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load_tokenizer(tmp_path / "vocab.gguf")
    expected, _ = sentencepiece_reference(path, texts)
    assert tok.encode_batch(texts, bos=True) == expected
    assert tok.add_bos_token and (tok.bos_id, tok.eos_id) == (1, 2)


def _one_line_error(excinfo, must_name):
    message = str(excinfo.value)
    assert "\n" not in message and str(must_name) in message
    return message


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path / "nope.model")
    _one_line_error(err, tmp_path / "nope.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path / "empty")
    _one_line_error(err, tmp_path / "empty")
    bad_model = tmp_path / "bad" / "tokenizer.model"
    bad_model.parent.mkdir()
    bad_model.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(bad_model)
    _one_line_error(err, bad_model)
    bad_json = tmp_path / "json" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}')
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(bad_json.parent)
    _one_line_error(err, bad_json)
    bad_config = tmp_path / "config"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_text(bad_json.read_text() + "}}")
    (bad_config / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(bad_config)
    _one_line_error(err, bad_config / "tokenizer_config.json")
