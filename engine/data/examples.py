"""Records -> checked examples -> token ids with a mask of the tokens that carry loss.

An example's chunks (see templates.py) are tokenized as growing prefixes of the full text, in one batch: the tokens of
each prefix must be a prefix of the full example's tokens, so the full text is tokenized as one string (as at
inference, where the prompt is followed by generated tokens) and the loss boundary is exact. When a tokenizer merges
across a boundary (the prefix property fails), that example is tokenized chunk by chunk and concatenated, which keeps
the prompt's tokens exactly those the model sees at inference; the count of such examples is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from hippocrates.models.tokenizer import ChatTemplateError

from .sources import BadRecords
from .templates import CHAT_ROLES, TemplateError, alpaca_chunks, chat_chunks, single_turn

log = logging.getLogger("hippocrates")
ENCODE_BATCH = 1024


@dataclass
class Tokenized:
    ids: np.ndarray        # [L] int64
    trainable: np.ndarray  # [L] bool: this token is a target (its prediction carries loss)


def field_text(record: dict, key: str, location: str, bad: BadRecords, optional: bool = False) -> str | None:
    """The record's text under `key`; "" for a missing optional field; None (reported) when missing or wrong."""
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        has = ", ".join(map(str, record)) or "no fields"
        bad(location, f"missing field {key!r} (the record has: {has})", "missing fields")
        return None
    if not isinstance(value, str):
        bad(location, f"field {key!r} is {type(value).__name__}, expected text", "non-text fields")
        return None
    if not optional and not value.strip():
        bad(location, f"field {key!r} is empty", "empty fields")
        return None
    return value


def field_messages(record: dict, key: str, location: str, bad: BadRecords) -> list[dict] | None:
    messages = record[key]
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        bad(location, f"field {key!r} is not a list of {{role: {'|'.join(CHAT_ROLES)}, content: text}}",
            "malformed messages")
        return None
    if not any(m["role"] == "assistant" for m in messages):
        bad(location, f"field {key!r} has no assistant message to train on", "malformed messages")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def field_texts(record: dict, keys: list[str], location: str, bad: BadRecords, optional=()) -> list[str] | None:
    values = []
    for key in keys:
        value = field_text(record, key, location, bad, optional=key in optional)
        if value is None:
            return None
        values.append(value)
    return values


def check_record(stage: str, record: dict, keys: dict[str, str], template: str, location: str, bad: BadRecords):
    """The fields a stage needs, checked: CPT -> text; SFT -> messages (chat) or (instruction, input, output);
    DPO -> (prompt, chosen, rejected). None when the record is bad (reported to `bad`)."""
    if stage == "cpt":
        return field_text(record, keys["text"], location, bad)
    if stage == "sft":
        if record.get(keys["messages"]) is not None and record.get(keys["instruction"]) is None:
            if template != "chat":
                bad(location, f"a {keys['messages']!r} record needs template=chat", "messages without chat template")
                return None
            return field_messages(record, keys["messages"], location, bad)
        values = field_texts(record, [keys["instruction"], keys["input"], keys["output"]], location, bad,
                             optional=(keys["input"],))
        return tuple(values) if values else None
    values = field_texts(record, [keys["prompt"], keys["chosen"], keys["rejected"]], location, bad)
    if values is None:
        return None
    if values[1].strip() == values[2].strip():
        bad(location, f"{keys['chosen']!r} equals {keys['rejected']!r}: a pair needs two different answers",
            "pairs with chosen equal to rejected")
        return None
    return tuple(values)


def render(stage: str, fields, template: str, tokenizer) -> list[list[tuple[str, bool]]]:
    """Checked fields -> the chunk lists of the example: one for SFT, two (chosen, rejected) for DPO."""
    if stage == "sft":
        if isinstance(fields, list):
            return [chat_chunks(fields, tokenizer)]
        if template == "chat":
            return [chat_chunks(single_turn(*fields), tokenizer)]
        return [alpaca_chunks(*fields)]
    prompt, chosen, rejected = fields
    if template == "chat":
        return [chat_chunks(single_turn(prompt, "", answer), tokenizer) for answer in (chosen, rejected)]
    return [alpaca_chunks(prompt, "", answer) for answer in (chosen, rejected)]


def render_all(stage: str, items: list, template: str, tokenizer, bad: BadRecords):
    """[(location, fields)] -> [(location, chunk lists)], dropping (reporting) what the template cannot render."""
    rendered = []
    for location, fields in items:
        try:
            rendered.append((location, render(stage, fields, template, tokenizer)))
        except (TemplateError, ChatTemplateError) as e:
            bad(location, str(e), "chat template errors")
    return rendered


def adds_bos(tokenizer) -> bool:
    """Whether this model's texts start with bos (LLaMA-2, Mistral: yes; SmolLM2's GPT-2 style tokenizer: no)."""
    return tokenizer.bos_id is not None and getattr(tokenizer, "add_bos_token", True)


def encode_texts(tokenizer, texts: list[str], bos: bool, desc: str) -> list[list[int]]:
    encoded: list[list[int]] = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=len(texts) < 4 * ENCODE_BATCH) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = texts[start:start + ENCODE_BATCH]
            encoded += tokenizer.encode_batch(batch, bos=bos)
            bar.update(len(batch))
    return encoded


def tokenize_chunks(chunk_lists: list[list[tuple[str, bool]]], tokenizer, template: str) -> list[Tokenized]:
    """Alpaca: [bos] + prompt + response + eos, bos when the tokenizer adds one. Chat: the template's text as
    rendered (it holds its own special tokens), plus eos when the template did not end the last response with it."""
    bos = template == "alpaca" and adds_bos(tokenizer)
    prefixes = []
    for chunks in chunk_lists:
        text = ""
        for chunk, _ in chunks:
            text += chunk
            prefixes.append(text)
    encoded = iter(encode_texts(tokenizer, prefixes, bos, "tokenizing"))
    result, retokenized = [], 0
    for chunks in chunk_lists:
        prefix_ids = [next(encoded) for _ in chunks]
        full = prefix_ids[-1]
        if all(full[:len(ids)] == ids for ids in prefix_ids[:-1]):
            bounds = [len(ids) for ids in prefix_ids]
        else:
            retokenized += 1
            full, bounds = [], []
            for j, (chunk, _) in enumerate(chunks):
                full += tokenizer.encode(chunk, bos=bos and j == 0)
                bounds.append(len(full))
        trainable = np.zeros(len(full) + 1, dtype=bool)
        start = 0
        for (_, carries_loss), end in zip(chunks, bounds):
            trainable[start:end] = carries_loss
            start = end
        last_trainable = [j for j, (_, t) in enumerate(chunks) if t][-1]
        last_span = full[(bounds[last_trainable - 1] if last_trainable else 0):bounds[last_trainable]]
        if template == "alpaca" or tokenizer.eos_id not in last_span:
            full = full + [tokenizer.eos_id]
            trainable[len(full) - 1] = True
        result.append(Tokenized(np.asarray(full, dtype=np.int64), trainable[:len(full)]))
    if retokenized:
        log.info("%d of %d examples: the prompt's tokens are not a prefix of the full example's tokens; tokenized "
                 "prompt and response separately", retokenized, len(chunk_lists))
    return result


def tokenize_documents(texts: list[str], tokenizer) -> list[Tokenized]:
    """CPT: [bos] + tokens + [eos] per document, bos when the tokenizer adds one; every token but the first is a
    target."""
    head = [tokenizer.bos_id] if adds_bos(tokenizer) else []
    result = []
    for ids in encode_texts(tokenizer, texts, False, "tokenizing"):
        ids = np.asarray(head + ids + [tokenizer.eos_id], dtype=np.int64)
        trainable = np.ones(len(ids), dtype=bool)
        trainable[0] = False
        result.append(Tokenized(ids, trainable))
    return result
