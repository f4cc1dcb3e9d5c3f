"""Batched log-likelihood of continuations: the shared context computed once, the LM head only where a token is scored.

Token boundary, two rules (`encode_request`'s `boundary`):
- "joint", lm-evaluation-harness 0.4's `_encode_pair`: trailing spaces of the context move to the front of the
  continuation; then `whole = encode(context + continuation)`, `ctx = encode(context)` and the continuation's tokens
  are `whole[len(ctx):]`.
- "separate", lm-evaluation-harness v0.3's `loglikelihood` (the Hippocrates paper's fork): `encode(context)` and
  `encode(continuation)`, each on its own.
The model reads `ctx + continuation tokens`, so all choices of an item share `ctx` exactly.

BOS: with the joint rule, prepended to the context when the tokenizer's own default does so, as lm-evaluation-harness
0.4 does with its Hugging Face backend (`add_bos_token=None`): SentencePiece LLaMA-2 / Mistral tokenizers start every
text with BOS, SmolLM2's GPT-2-style BPE tokenizer adds nothing. v0.3 encodes with `add_special_tokens=False`: no BOS
(`default_add_bos(tokenizer, "separate")`). `add_bos=True/False` overrides. An empty context becomes [BOS] (or [EOS]
when there is no BOS).

Window: the model reads ctx + cont[:-1]; a context too long for the window W loses its first tokens so that the
longest choice fits (ctx[-(W + 1 - longest):]). For the longest choice this is lm-evaluation-harness's
`(ctx + cont)[-(W + 1):][:-1]`; shorter choices then see the same, slightly shorter context (shared, so that it is
computed once), where lm-evaluation-harness would give them up to (longest - own length) more tokens.

Each batch of items (sorted by length) is scored in at most two forward passes:
  1. context pass: the batch's contexts packed into one row, kept apart by segment ids (no padding)    [1, sum L]
     The hidden state at each context's last position predicts the first token of every choice, so one-token
     continuations (" A".." D", " yes") need nothing more: one forward per item, as lm-evaluation-harness does.
  2. continuation pass, only for multi-token continuations: one row per distinct cont[:-1], on a copy of its
     item's KV cache (padding between a short context and its continuation masked with segment ids)     [R, Tc]
The LM head and the log-softmax run only on the hidden states that predict a continuation token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hippocrates.models import KVCache

from .records import EvalError

DEFAULT_CACHE_BYTES = 2 * 1024**3


@dataclass
class EncodedRequest:
    context: list[int]  # shared by every choice, after left truncation
    continuations: list[list[int]]
    truncated: bool = False


def default_add_bos(tokenizer, boundary: str = "joint") -> bool:
    """Whether the tokenizer's Hugging Face counterpart adds BOS by default (what lm-evaluation-harness 0.4 follows);
    never under v0.3's separate rule, which encodes without special tokens."""
    if boundary == "separate":
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if flag is not None:
        return bool(flag)
    return "sentencepiece" in type(tokenizer).__name__.lower()


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts, bos=False)
    return [tokenizer.encode(t, bos=False) for t in texts]


BOUNDARIES = ("joint", "separate")  # lm-evaluation-harness 0.4's rule; its v0.3's (the Hippocrates paper's fork)


def encode_request(tokenizer, context: str, continuations: list[str], add_bos: bool, max_length: int,
                   boundary: str = "joint") -> EncodedRequest:
    """Token ids of a context and its continuations; contexts left-truncated so the longest choice fits.

    boundary "joint" (lm-evaluation-harness 0.4): trailing context spaces move to the continuations, which are
    `encode(context + continuation)[len(encode(context)):]`.
    boundary "separate" (lm-evaluation-harness v0.3's `loglikelihood`): `encode(context)` and `encode(continuation)`
    each on its own, nothing moved. A SentencePiece tokenizer then starts " Disclose" with its own word-start piece:
    ['▁', '▁Dis', 'close'], where the joint rule gives ['▁Dis', 'close'].
    """
    if boundary not in BOUNDARIES:
        raise EvalError(f"token boundary {boundary!r}: expected one of {', '.join(BOUNDARIES)}")
    n_spaces = len(context) - len(context.rstrip()) if boundary == "joint" else 0
    if n_spaces:
        continuations = [context[-n_spaces:] + c for c in continuations]
        context = context[:-n_spaces]
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    if context and boundary == "joint":
        ctx, *wholes = _encode_many(tokenizer, [context] + [context + c for c in continuations])
        ctx = bos + ctx
        conts = [(bos + whole)[len(ctx):] for whole in wholes]
    elif context:
        ctx, *conts = _encode_many(tokenizer, [context] + continuations)
        ctx = bos + ctx
    else:
        ctx = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
        conts = _encode_many(tokenizer, continuations)
    if any(len(c) == 0 for c in conts):
        raise EvalError(f"a continuation encodes to no tokens after context {context[-40:]!r}")
    longest = max(len(c) for c in conts)
    room = max_length + 1 - longest  # the model reads ctx + cont[:-1]
    if room < 1:
        raise EvalError(f"a continuation of {longest} tokens does not fit the model window of {max_length}")
    truncated = len(ctx) > room
    return EncodedRequest(ctx[-room:] if truncated else ctx, conts, truncated)


def cache_bytes_per_token(config, dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


def make_batches(requests: list[EncodedRequest], batch_size: int, bytes_per_token: int,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, window: int | None = None) -> list[list[int]]:
    """Request indices, longest first, in groups of at most batch_size items whose KV caches fit cache_bytes.

    window (a sliding window): the continuation pass lays every row out as the batch's longest context, then the
    row's tokens, so a row spans max(context) + max(continuation) - 1 cache positions, and the window is measured
    in cache positions. A batch whose span would pass the window is closed; an item whose own span passes it is
    scored alone, where no padding separates its context from its continuations.
    """
    def length(i):
        return len(requests[i].context) + max(map(len, requests[i].continuations))

    order = sorted(range(len(requests)), key=lambda i: -length(i))
    batches, current, longest, max_ctx, max_cont = [], [], 0, 0, 0
    for i in order:
        req = requests[i]
        ctx, cont = len(req.context), max(map(len, req.continuations))
        rows = sum(len(requests[j].continuations) + 1 for j in current) + len(req.continuations) + 1
        too_big = rows * max(longest, length(i)) * bytes_per_token > cache_bytes
        too_wide = window is not None and max(max_ctx, ctx) + max(max_cont, cont) - 1 > window
        if current and (len(current) >= batch_size or too_big or too_wide):
            batches.append(current)
            current, longest, max_ctx, max_cont = [], 0, 0, 0
        current.append(i)
        longest, max_ctx, max_cont = max(longest, length(i)), max(max_ctx, ctx), max(max_cont, cont)
    if current:
        batches.append(current)
    return batches


DEFAULT_BATCH_SIZE = 8


@torch.inference_mode()
def score_requests(model, requests: list[EncodedRequest], batch_size: int | None = None, progress: bool = True,
                   desc: str = "scoring", cache_bytes: int = DEFAULT_CACHE_BYTES, greedy: bool = False) -> list[list]:
    """Sum of log-probs of each continuation given its context: one list of floats per request.

    batch_size: items per batch (default 8); fewer when their KV caches would pass cache_bytes.
    greedy: each entry becomes (log-likelihood, whether every token is the argmax), lm-evaluation-harness's pair."""
    weight = model.output_weight
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    batches = make_batches(requests, batch_size, cache_bytes_per_token(model.config, weight.dtype), cache_bytes,
                           window=model.config.sliding_window)
    results: list[list[float] | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, disable=not progress, unit="item") as bar:
        for batch in batches:
            for i, lls in zip(batch, _score_batch(model, [requests[i] for i in batch], greedy)):
                results[i] = lls
            bar.update(len(batch))
    return results


@dataclass
class ContinuationRows:
    """The rows of a continuation pass: one per distinct (item, cont[:-1]) among the multi-token continuations."""
    item: list[int]
    tokens: list[list[int]]
    index: dict[tuple, int]

    @classmethod
    def of(cls, requests: list[EncodedRequest]) -> "ContinuationRows":
        rows = cls([], [], {})
        for i, req in enumerate(requests):
            for cont in req.continuations:
                key = (i, tuple(cont[:-1]))
                if len(cont) > 1 and key not in rows.index:
                    rows.index[key] = len(rows.tokens)
                    rows.item.append(i)
                    rows.tokens.append(cont[:-1])
        return rows

    @property
    def width(self) -> int:
        return max(map(len, self.tokens), default=0)


def _score_batch(model, requests: list[EncodedRequest], greedy: bool = False) -> list[list]:
    weight = model.output_weight
    rows = ContinuationRows.of(requests)
    ctx_lens = [len(r.context) for r in requests]
    row_cache = None
    if rows.tokens:
        row_cache = KVCache(model.config, len(rows.tokens), max(ctx_lens) + rows.width, weight.dtype, weight.device)
    hidden = [_context_pass(model, requests, rows, row_cache)]  # [B, H]
    if rows.tokens:
        hidden.append(_continuation_pass(model, rows, ctx_lens, row_cache))  # [R * Tc, H]
    # Looked up again after the forwards: under FSDP2 the weight read before them is a sharded DTensor, and the
    # forward leaves the root's full weight in its place.
    return _sum_logprobs(model.output_weight, requests, rows, torch.cat(hidden), greedy)


def _context_pass(model, requests, rows: ContinuationRows, row_cache: KVCache | None):
    """The batch's contexts packed into one row (segment ids keep them apart, positions restart at each) -> the
    hidden state at each context's last position [B, H], which predicts every choice's first token. Packing instead
    of padding wastes nothing and gives the matmuls more rows. Each item's KV cache goes to its continuation rows."""
    device, dtype = model.output_weight.device, model.output_weight.dtype
    lengths = [len(r.context) for r in requests]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    ids = torch.tensor([[t for r in requests for t in r.context]], device=device)  # [1, sum L]
    segment_ids = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(lengths))[None].to(device)
    cache = KVCache(model.config, 1, ends[-1], dtype, device) if row_cache is not None else None
    hidden = model(ids, segment_ids=segment_ids, kv_cache=cache, return_hidden=True)  # [1, sum L, H]
    if row_cache is not None:
        row_item = torch.tensor(rows.item, device=device)  # [R]
        for i, (end, length) in enumerate(zip(ends, lengths)):
            item_rows = (row_item == i).nonzero().flatten()
            row_cache.k[:, item_rows, :, :length] = cache.k[:, :, :, end - length:end]  # [layers, r, Hkv, L, D]
            row_cache.v[:, item_rows, :, :length] = cache.v[:, :, :, end - length:end]
            row_cache.k[:, item_rows, :, length:] = 0  # masked later, but 0 * NaN garbage would leak through
            row_cache.v[:, item_rows, :, length:] = 0
        row_cache.length = max(lengths)
    return hidden[0, torch.tensor(ends, device=device) - 1]  # [B, H]


def _continuation_pass(model, rows: ContinuationRows, ctx_lens: list[int], row_cache: KVCache):
    """Each row's tokens after its item's context -> hidden states [R * Tc, H]; padding between a shorter context
    and its continuation is hidden by segment ids (0 = padding)."""
    device = model.output_weight.device
    lc, tc = row_cache.length, rows.width
    ids = torch.zeros(len(rows.tokens), tc, dtype=torch.long, device=device)  # [R, Tc], right-padded
    for r, tokens in enumerate(rows.tokens):
        ids[r, :len(tokens)] = torch.tensor(tokens)
    starts = torch.tensor([ctx_lens[i] for i in rows.item], device=device)  # [R]
    positions = starts[:, None] + torch.arange(tc, device=device)  # [R, Tc]
    segment_ids = None
    if any(n != lc for n in ctx_lens):
        key_pos = torch.arange(lc + tc, device=device)
        segment_ids = ((key_pos[None, :] < starts[:, None]) | (key_pos[None, :] >= lc)).long()  # [R, Lc + Tc]
    hidden = model(ids, position_ids=positions, segment_ids=segment_ids, kv_cache=row_cache,
                   return_hidden=True)  # [R, Tc, H]
    return hidden.reshape(len(rows.tokens) * tc, -1)


def _sum_logprobs(weight, requests, rows: ContinuationRows, hidden, greedy: bool = False) -> list[list]:
    """LM head + log-softmax on the hidden states that predict a continuation token; sum per continuation.

    hidden: [B + R * Tc, H], the contexts' last positions, then the continuation rows."""
    b, tc = len(requests), rows.width
    positions, targets, owner = [], [], []  # per scored token: its row in `hidden`, its id, its continuation
    num_continuations = 0
    for i, req in enumerate(requests):
        for cont in req.continuations:
            positions.append(i)
            if len(cont) > 1:
                start = b + rows.index[(i, tuple(cont[:-1]))] * tc
                positions.extend(range(start, start + len(cont) - 1))
            targets.extend(cont)
            owner.extend([num_continuations] * len(cont))
            num_continuations += 1
    used = sorted(set(positions))
    where = {p: k for k, p in enumerate(used)}
    device = hidden.device
    picked = hidden[torch.tensor(used, device=device)].float()  # [M, H]
    logprobs = F.linear(picked, weight.float()).log_softmax(-1)  # [M, V], fp32 even for a bf16 model
    scored, targets = torch.tensor([where[p] for p in positions], device=device), torch.tensor(targets, device=device)
    token_logprobs = logprobs[scored, targets]  # [N]
    owner = torch.tensor(owner, device=device)
    sums = torch.zeros(num_continuations, dtype=torch.float64, device=device)
    sums = sums.index_add_(0, owner, token_logprobs.double()).tolist()
    if greedy:  # a continuation is greedy when none of its tokens misses its position's argmax
        misses = torch.zeros(num_continuations, device=device)
        misses = misses.index_add_(0, owner, (logprobs.argmax(-1)[scored] != targets).float())
        sums = list(zip(sums, (misses == 0).tolist()))
    out, k = [], 0
    for req in requests:
        out.append(sums[k:k + len(req.continuations)])
        k += len(req.continuations)
    return out


@torch.inference_mode()
def score_requests_reference(model, requests: list[EncodedRequest]) -> list[list[float]]:
    """The slow, obvious way: each choice as its own full sequence, full logits, no cache, no batching."""
    out = []
    for req in requests:
        lls = []
        for cont in req.continuations:
            tokens = torch.tensor([req.context + cont[:-1]], device=model.output_weight.device)  # [1, T]
            logprobs = model(tokens)[0, -len(cont):].float().log_softmax(-1)  # [len(cont), V]
            lls.append(logprobs[torch.arange(len(cont)), torch.tensor(cont)].double().sum().item())
        out.append(lls)
    return out
