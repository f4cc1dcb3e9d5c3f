"""Decoding with the KV cache: greedy or sampled (temperature, top-p), stopping at eos.

    python -m hippocrates.models.generate --model PATH --prompt "What causes anemia?" --chat --max-new-tokens 64

Without --model the default model (SmolLM2-135M-Instruct, see models/fetch.py) answers.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .transformer import KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """logits [V] -> a token id: argmax when temperature <= 0, else a draw from the top-p nucleus of softmax(l / T)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs  # probability of the tokens ranked above each one
        sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop_ids=None, on_token=None) -> list[int]:
    """Continue `prompt_ids` (a list of ids) by up to `max_new_tokens` tokens; return the new ids.

    Stops after a token in `stop_ids` (default: the tokenizer's eos), which is included in the result, as
    transformers' `generate` does. `on_token(id)` is called as each token is chosen (streaming).
    """
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if stop_ids is None:
        eos = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
        stop_ids = [] if eos is None else [eos]
    stop_ids = set(stop_ids)
    weight = model.output_weight
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, weight.dtype, weight.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(weight.device).manual_seed(seed)
    logits = model(torch.tensor([prompt_ids], device=weight.device), kv_cache=cache)[0, -1]  # [V]
    new_ids = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids or len(new_ids) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=weight.device), kv_cache=cache)[0, -1]  # [V]
    return new_ids


class TextStream:
    """Prints the text of the tokens so far as it grows (waiting while a multi-byte character is incomplete)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids, self.printed = [], ""

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def finish(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def prompt_ids_for(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """The ids of a plain prompt (bos first when the model expects it) or of a one-turn chat."""
    if not chat:
        return tokenizer.encode(prompt, bos=tokenizer.add_bos_token)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    bos_token = tokenizer.special_tokens.get("bos_token")
    needs_bos = tokenizer.add_bos_token and not (bos_token and text.startswith(bos_token))
    return tokenizer.encode(text, bos=needs_bos)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hippocrates.models.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint dir or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from . import load_model, load_tokenizer
    try:
        if args.model is None:
            from .fetch import fetch_smollm2
            args.model = fetch_smollm2()
        dtype = torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32
        model = load_model(args.model, dtype=dtype, device=args.device)
        tokenizer = load_tokenizer(args.model)
        ids = prompt_ids_for(tokenizer, args.prompt, args.chat, args.system)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    stream = TextStream(tokenizer)
    generate(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, on_token=stream)
    stream.finish()


if __name__ == "__main__":
    main()
