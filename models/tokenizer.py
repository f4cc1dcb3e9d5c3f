"""One `Tokenizer` over a SentencePiece `tokenizer.model`, a Hugging Face `tokenizer.json`, or the vocabulary in a GGUF.

    tok = load_tokenizer("path/to/checkpoint")    # or a tokenizer.model, a tokenizer.json, a .gguf
    ids = tok.encode("Aspirin inhibits COX-1.", bos=True)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

SentencePiece files encode with the `sentencepiece` library itself (Meta's reference: `[bos] + sp.encode(text)`);
special-token strings such as `<s>` in the text become their ids, as in Hugging Face tokenizers. `save(dir)` writes
the vocabulary (tokenizer.json, plus tokenizer.model for SentencePiece) and tokenizer_config.json, a dir that
transformers' `AutoTokenizer` loads.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors

from . import gguf
from .config import CheckpointError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")

# SentencePiece piece types (sentencepiece_model.proto), also used by llama.cpp's `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def encode_threads() -> int:
    """Threads for batch encoding: the cores this process may use, shared among torchrun's ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt or unsupported; the message names the file."""


class ChatTemplateError(ValueError):
    """A chat template that fails to render (including its own `raise_exception`)."""


class Tokenizer:
    """The API every backend shares. Subclasses implement the `_`-prefixed vocabulary methods."""

    def __init__(self, special_tokens: dict[str, str | None], chat_template: str | None, add_bos_token: bool,
                 source: str, model_max_length: int | None = None):
        self.special_tokens = {name: special_tokens.get(name) for name in SPECIAL_NAMES}
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token  # whether this model's texts conventionally start with bos
        self.source = source
        self.model_max_length = model_max_length

    # backend interface
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(text) for text in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _save_vocabulary(self, out_dir: Path) -> str:
        """Write the vocabulary file(s); return the `tokenizer_class` transformers should load them with."""
        raise NotImplementedError

    # shared API
    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int:
        """The configured pad token, else eos (padded positions are always masked out)."""
        pad = self._special_id("pad_token")
        return pad if pad is not None else self.eos_id

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: bos=True but this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.source}: eos=True but this tokenizer has no eos token")
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._wrap(self._encode(text), bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_batch expects str items, got {type(text).__name__}")
        return [self._wrap(ids, bos, eos) for ids in self._encode_many(texts)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with this tokenizer's chat template (jinja2 sandbox)."""
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.source}: this tokenizer has no chat template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **{k: v for k, v in self.special_tokens.items() if v is not None}, **variables)

    def save(self, out_dir: str | Path) -> Path:
        """Write the vocabulary and tokenizer_config.json (special tokens, chat template) into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_class = self._save_vocabulary(out_dir)
        config = {"tokenizer_class": tokenizer_class, "add_bos_token": self.add_bos_token, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        config.update({name: token for name, token in self.special_tokens.items() if token is not None})
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return out_dir

    def __repr__(self):
        return (f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA-2, Mistral), encoded by the `sentencepiece` library."""

    def __init__(self, model_proto: bytes, source: str, special_tokens: dict | None = None,
                 chat_template: str | None = None, add_bos_token: bool = True, model_max_length: int | None = None):
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError / OSError with a C++ status message
            raise TokenizerError(f"{source}: not a SentencePiece model ({str(err).strip().splitlines()[0]})") from None
        self.model_proto = model_proto
        defaults = {name: self._piece_or_none(getter()) for name, getter in
                    (("bos_token", self.sp.bos_id), ("eos_token", self.sp.eos_id),
                     ("pad_token", self.sp.pad_id), ("unk_token", self.sp.unk_id))}
        defaults.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        super().__init__(defaults, chat_template, add_bos_token, source, model_max_length)
        for name, token in self.special_tokens.items():
            if token is not None and self.token_to_id(token) is None:
                raise TokenizerError(f"{source}: {name} {token!r} is not in the vocabulary")
        specials = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())
                    if self.sp.is_control(i) or self.sp.is_unknown(i)]
        self._special_split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

    def _piece_or_none(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if token_id >= 0 else None

    def _encode(self, text):
        if self._special_split.search(text) is None:
            return self.sp.encode(text)
        ids = []
        for i, chunk in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.sp.piece_to_id(chunk))
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def _encode_many(self, texts):
        plain = [t for t in texts if self._special_split.search(t) is None]
        if len(plain) < len(texts):
            return [self._encode(t) for t in texts]
        return self.sp.encode(texts, num_threads=encode_threads())

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(ids)

    def token_to_id(self, token):
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id):
        return self.sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def pieces(self) -> tuple[list[str], list[float], list[int]]:
        """(pieces, scores, piece types) of the whole vocabulary."""
        sp = self.sp
        kinds = []
        for i in range(sp.get_piece_size()):
            kind = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                    else UNUSED if sp.is_unused(i) else NORMAL)
            kinds.append(kind)
        return ([sp.id_to_piece(i) for i in range(sp.get_piece_size())],
                [sp.get_score(i) for i in range(sp.get_piece_size())], kinds)

    def _save_vocabulary(self, out_dir):
        (out_dir / SENTENCEPIECE_MODEL).write_bytes(self.model_proto)
        pieces, scores, kinds = self.pieces()
        backend = sentencepiece_to_tokenizers(pieces, scores, kinds, bos_token=self.special_tokens["bos_token"],
                                              add_bos=self.add_bos_token)
        backend.save(str(out_dir / TOKENIZER_JSON))
        return "PreTrainedTokenizerFast"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json; also what a GGUF's vocabulary is converted to)."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str, special_tokens: dict | None = None,
                 chat_template: str | None = None, add_bos_token: bool | None = None,
                 model_max_length: int | None = None):
        self.backend = backend
        backend.no_truncation()
        backend.no_padding()
        special_tokens = dict(special_tokens or {})
        super().__init__(special_tokens, chat_template, False, source, model_max_length)
        for name, token in self.special_tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{source}: {name} {token!r} is not in the vocabulary")
        if add_bos_token is None:
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos_token = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.add_bos_token = add_bos_token

    def _encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def _encode_many(self, texts):
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id):
        return self.backend.id_to_token(int(token_id))

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _save_vocabulary(self, out_dir):
        self.backend.save(str(out_dir / TOKENIZER_JSON))
        return "PreTrainedTokenizerFast"


# ---- SentencePiece BPE -> `tokenizers` (what transformers' AutoTokenizer reads) ----

def sentencepiece_to_tokenizers(pieces: list[str], scores: list[float], kinds: list[int], bos_token: str | None,
                                add_bos: bool) -> tokenizers.Tokenizer:
    """The same segmentation as SentencePiece's BPE (dummy prefix, byte fallback) as a `tokenizers` BPE.

    SentencePiece merges the adjacent pair whose union has the highest score; a BPE merge list ranked by that score
    reproduces it. Every split of a vocabulary piece into two vocabulary pieces is a merge.
    """
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {piece for piece, kind in zip(pieces, kinds) if kind in (NORMAL, USER_DEFINED, BYTE)}
    ranked = []
    for piece, score, kind in zip(pieces, scores, kinds):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((p for p, k in zip(pieces, kinds) if k == UNKNOWN), None)
    model = tokenizers.models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
                                  fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                for p, k in zip(pieces, kinds) if k in (CONTROL, UNKNOWN)])
    user_defined = [AddedToken(p, normalized=False, special=False) for p, k in zip(pieces, kinds) if k == USER_DEFINED]
    if user_defined:
        backend.add_tokens(user_defined)
    if add_bos and bos_token is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, vocab[bos_token])])
    return backend


# ---- the vocabulary inside a GGUF -> `tokenizers` ----

# llama.cpp pre-tokenizer names of byte-level BPE vocabularies: digits split one by one, then GPT-2's regex.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact"}
GPT2_PRE = {"gpt2", "default"}


def _byte_level_backend(tokens: list[str], merges: list[str], kinds: list[int], pre: str, source: str):
    """GPT-2 style byte-level BPE (SmolLM2): the same tokenizer a `tokenizer.json` with this vocabulary describes."""
    if pre in DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in GPT2_PRE:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise TokenizerError(f"{source}: byte-level pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; "
                             f"supported: {sorted(DIGIT_SPLIT_PRE | GPT2_PRE)}")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise TokenizerError(f"{source}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                                        byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, kinds) if k == CONTROL]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, kinds) if k == USER_DEFINED]
    backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    return backend


def tokenizer_from_gguf(reader, source: str = "gguf") -> HFTokenizer:
    kind = gguf.metadata(reader, "tokenizer.ggml.model")
    tokens = gguf.metadata(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{source}: no tokenizer.ggml.model / tokenizer.ggml.tokens metadata in this GGUF")
    kinds = gguf.metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    def token(key):
        index = gguf.metadata(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id")}
    if kind == "gpt2":
        backend = _byte_level_backend(tokens, gguf.metadata(reader, "tokenizer.ggml.merges") or [], kinds,
                                      gguf.metadata(reader, "tokenizer.ggml.pre", "default"), source)
        add_bos = bool(gguf.metadata(reader, "tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        scores = gguf.metadata(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(f"{source}: a SentencePiece vocabulary without tokenizer.ggml.scores")
        add_bos = bool(gguf.metadata(reader, "tokenizer.ggml.add_bos_token", True))
        backend = sentencepiece_to_tokenizers(tokens, scores, kinds, bos_token=special["bos_token"], add_bos=add_bos)
    else:
        raise TokenizerError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; supported: gpt2, llama")
    return HFTokenizer(backend, source, special_tokens=special,
                       chat_template=gguf.metadata(reader, "tokenizer.chat_template"), add_bos_token=add_bos,
                       model_max_length=gguf.metadata(reader, "llama.context_length"))


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer described by the vocabulary a GGUF carries."""
    try:
        reader = gguf.open_gguf(path)
    except CheckpointError as err:
        raise TokenizerError(str(err)) from None
    return tokenizer_from_gguf(reader, source=str(path))


# ---- chat templates ----

def _raise_exception(message):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """Render a Hugging Face-style chat template in a jinja2 sandbox (the variables transformers passes)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    from jinja2 import TemplateError
    try:
        compiled = _compile_template(template)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except TemplateError as err:
        raise ChatTemplateError(f"chat template: {type(err).__name__}: {err}") from None


# ---- loading ----

def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def read_tokenizer_config(folder: Path) -> dict:
    """Special tokens, chat template, add_bos_token from tokenizer_config.json / special_tokens_map.json /
    chat_template.jinja in `folder` (each optional)."""
    config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    special_map = _read_json(folder / SPECIAL_TOKENS_MAP) if (folder / SPECIAL_TOKENS_MAP).is_file() else {}
    special = {name: _token_content(config.get(name, special_map.get(name))) for name in SPECIAL_NAMES}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    max_length = config.get("model_max_length")
    return {"special_tokens": special, "chat_template": template, "add_bos_token": config.get("add_bos_token"),
            "model_max_length": max_length if isinstance(max_length, int) and max_length < 10**9 else None}


def load_sentencepiece(path: Path, folder_config: dict | None = None) -> SentencePieceTokenizer:
    extra = folder_config or {}
    add_bos = extra.get("add_bos_token")
    return SentencePieceTokenizer(path.read_bytes(), str(path), special_tokens=extra.get("special_tokens"),
                                  chat_template=extra.get("chat_template"),
                                  add_bos_token=True if add_bos is None else add_bos,
                                  model_max_length=extra.get("model_max_length"))


def load_tokenizer_json(path: Path, folder_config: dict | None = None) -> HFTokenizer:
    extra = folder_config or {}
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception with serde's message
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0]})") from None
    return HFTokenizer(backend, str(path), special_tokens=extra.get("special_tokens"),
                       chat_template=extra.get("chat_template"), add_bos_token=extra.get("add_bos_token"),
                       model_max_length=extra.get("model_max_length"))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A checkpoint dir (tokenizer.json or tokenizer.model, with tokenizer_config.json), one of those files, or a
    `.gguf` (its embedded vocabulary). A training run's out_dir resolves to its `final/`."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / TOKENIZER_JSON).exists() and not (path / SENTENCEPIECE_MODEL).exists() \
                and (path / "final").is_dir():
            path = path / "final"
        config = read_tokenizer_config(path)
        if (path / TOKENIZER_JSON).is_file():
            return load_tokenizer_json(path / TOKENIZER_JSON, config)
        if (path / SENTENCEPIECE_MODEL).is_file():
            return load_sentencepiece(path / SENTENCEPIECE_MODEL, config)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise TokenizerError(f"{path}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in this directory")
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    config = read_tokenizer_config(path.parent)
    if path.suffix == ".json":
        return load_tokenizer_json(path, config)
    if path.suffix == ".model":
        return load_sentencepiece(path, config)
    raise TokenizerError(f"{path}: expected a tokenizer.json, a tokenizer.model, a .gguf or a checkpoint dir")
