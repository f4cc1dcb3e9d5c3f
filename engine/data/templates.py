"""How an example becomes text: chunks of (text, carries_loss) whose concatenation is the full example.

Two templates:
- "alpaca": the two prompts of Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py), with and without an input;
  the response follows "### Response:" directly, and the tokenizer's eos ends it.
- "chat": the tokenizer's own chat template. The conversation is rendered turn by turn; the text each assistant turn
  adds (its content and the template's end-of-turn marker) carries loss, everything else (system, user, the
  generation prompt "<|im_start|>assistant\\n" or "[/INST]") does not. Every assistant turn is trained.
"""
from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATES = ("alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant")

Chunk = tuple[str, bool]  # (text, carries loss)


class TemplateError(ValueError):
    """The chat template does not render a conversation as a growing prefix, so turns cannot be told apart."""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def alpaca_chunks(instruction: str, input: str, output: str) -> list[Chunk]:
    return [(alpaca_prompt(instruction, input), False), (output, True)]


def single_turn(instruction: str, input: str, output: str) -> list[dict]:
    """An instruction record as a chat: the user says the instruction (and the input after a blank line)."""
    user = f"{instruction}\n\n{input}" if input.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_chunks(messages: list[dict], tokenizer) -> list[Chunk]:
    """Render with `tokenizer.apply_chat_template`, one assistant turn at a time."""
    def render(turns, add_generation_prompt=False):
        return tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt)

    chunks: list[Chunk] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        full = render(messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateError(f"the chat template's rendering of turn {i} does not extend the previous turns")
        chunks += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    if messages[-1]["role"] != "assistant":
        rest = render(messages)
        if not rest.startswith(done):
            raise TemplateError("the chat template's rendering of the last turns does not extend the previous ones")
        chunks.append((rest[len(done):], False))
    return chunks
