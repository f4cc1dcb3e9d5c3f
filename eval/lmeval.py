"""The engine as lm-evaluation-harness 0.4's model `hippocrates`: its loader, its prefix-sharing scorer, its decoding.

    python -m hippocrates.lmeval --model hippocrates --model_args pretrained=DIR[,adapter=DIR][,dtype=auto] \
        --tasks medqa_4options,pubmedqa

    import lm_eval, hippocrates.eval.lmeval  # the import registers the model
    lm_eval.simple_evaluate(model="hippocrates", model_args="pretrained=DIR", tasks=["pubmedqa"])

model_args: pretrained (HF dir, training out_dir, .gguf or a PEFT adapter dir naming its base), adapter (a PEFT LoRA
dir, merged), dtype (auto = the checkpoint's, float32 on a CPU), batch_size (contexts per scoring batch, default 8),
device, max_length (default: the model's max_position_embeddings), add_bos_token (default: the tokenizer's own).

Tokens follow lm-eval's `TemplateLM` rules, which this class inherits, as its Hugging Face backend `hf` applies them
to the same tokenizer: `_encode_pair` encodes context + continuation as one string and splits at the context's token
count (trailing context spaces moved to the continuation first); an empty context becomes [prefix token] (BOS, else
EOS); `tok_encode` adds BOS when the tokenizer does by default, unless the text already starts with it. A pair longer
than the window W reads (ctx + cont)[-(W + 1):][:-1], as `hf` does.

`write_local_tasks` puts lm-eval's own `medqa_4options` and `pubmedqa` configs on local copies of the data
(`--include_path DIR`, tasks `medqa_4options_local`, `pubmedqa_local`), for machines without the Hugging Face hub.

Only this module imports lm_eval; nothing imports it at package import time.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lm_eval
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hippocrates.models.generate import generate

from .loading import load_for_eval
from .scoring import EncodedRequest, score_requests

MAX_GEN_TOKS = 256  # lm-eval's `hf` default
LOCAL_TASK_OVERRIDES = {"dataset_path": "json", "dataset_name": None, "training_split": None,
                        "validation_split": None, "test_split": "test"}


class _StopSequenceSeen(Exception):
    """Raised from the token callback to end a generation once a stop string has appeared."""


def _contexts_per_batch(batch_size) -> int | None:
    """lm-eval's batch_size: a number, or "auto" / "auto:N", which leave it to the scorer (8 contexts, fewer when
    their KV caches are large)."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return None
    if not str(batch_size).isdigit() or int(batch_size) < 1:
        raise ValueError(f"hippocrates: batch_size={batch_size!r}: expected a positive number or auto")
    return int(batch_size)


@register_model("hippocrates")
class HippocratesLM(TemplateLM):
    def __init__(self, pretrained: str, adapter: str | None = None, dtype: str = "auto", batch_size=None,
                 device: str | None = None, max_length: int | None = None, add_bos_token: bool | None = None,
                 max_batch_size: int | None = None, **other):
        super().__init__()
        ignored = {key: value for key, value in other.items() if value is not None}
        if ignored:
            logging.getLogger(__name__).warning("hippocrates: model_args %s are not used", ", ".join(ignored))
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        loaded = load_for_eval(str(pretrained), adapter=adapter, dtype=str(dtype), device=device)
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.loaded = loaded
        self._device = torch.device(device)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.batch_size = _contexts_per_batch(batch_size)
        self.add_bos_token = add_bos_token

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.adapter or self.loaded.base).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """`hf`'s rule: the explicit flag, else add_bos_token, else the tokenizer's default; never a second BOS."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token if self.add_bos_token is not None else self.tokenizer.add_bos_token
            if string.startswith(self.tokenizer.decode([self.prefix_token_id])):
                add_special_tokens = False
        return self.tokenizer.encode(string, bos=bool(add_special_tokens) and self.tokenizer.bos_id is not None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids). Pairs with the same context
        ids become one scorer request, so the context is read once for all of its continuations."""
        window = self.max_length
        encoded: list[EncodedRequest] = []
        owners: list[list[int]] = []  # per scorer request: the indices of the requests its continuations answer
        by_context: dict[tuple, int] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > window:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the window of {window}")
            if len(context) + len(continuation) > window + 1:  # `hf`: (ctx + cont)[-(W + 1):][:-1], on its own
                encoded.append(EncodedRequest(context[-(window + 1 - len(continuation)):], [continuation], True))
                owners.append([i])
                continue
            k = by_context.setdefault(tuple(context), len(encoded))
            if k == len(encoded):
                encoded.append(EncodedRequest(list(context), []))
                owners.append([])
            encoded[k].continuations.append(continuation)
            owners[k].append(i)
        scores = score_requests(self.model, encoded, batch_size=self.batch_size, progress=not disable_tqdm,
                                desc="hippocrates loglikelihood", greedy=True)
        results: list[tuple[float, bool]] = [None] * len(requests)
        for indices, pairs in zip(owners, scores):
            for i, (ll, is_greedy) in zip(indices, pairs):
                results[i] = (ll, bool(is_greedy))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in lm-eval's disjoint rolling windows of the model's length, all windows of all
        texts scored together."""
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            pairs = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            text_windows = [(None, *make_disjoint_window(pair)) for pair in pairs]
            windows += text_windows
            counts.append(len(text_windows))
        lls = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for req, count in zip(requests, counts):
            totals.append(sum(ll for ll, _ in lls[start:start + count]))
            start += count
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One request at a time through the engine's KV-cache decoding; stops at EOS or once a stop string appears
        in the decoded text, which is then cut at the first stop string, as `hf` does."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        out = []
        for req in tqdm(requests, desc="hippocrates generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} must be below the model window of {self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            text = self._generate_text(prompt, until, max_gen_toks, temperature, kwargs.get("top_p", 1.0))
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate_text(self, prompt: list[int], until: list[str], max_new_tokens: int, temperature: float,
                       top_p: float) -> str:
        new_ids: list[int] = []

        def watch(token: int):
            new_ids.append(token)
            if any(stop and stop in self.tokenizer.decode(new_ids) for stop in until):
                raise _StopSequenceSeen

        try:
            generate(self.model, self.tokenizer, prompt, max_new_tokens, temperature, top_p or 1.0, on_token=watch)
        except _StopSequenceSeen:
            pass
        return postprocess_generated_text(self.tokenizer.decode(new_ids, skip_special_tokens=True), until, None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def get_model_info(self) -> dict:
        return {"model_base": self.loaded.base, "model_adapter": self.loaded.adapter, "model_dtype": self.loaded.dtype,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters())}


def write_local_tasks(folder: str | Path, data_dir: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Task YAMLs in `folder` that include lm-eval's own medqa_4options and pubmedqa configs (their prompts, choices,
    targets and metrics) and read the data dir's MedQA test and PubMedQA official test items, rewritten as JSON Lines
    in the fields of the hub copies lm-eval reads; first `limit` items of each. Returns the task names."""
    from hippocrates.models.paths import data_dir as default_data_dir
    source = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(source / "eval/medqa/test.jsonl") as f:
        medqa = [json.loads(line) for line in f if line.strip()][:limit]
    medqa = [{"sent1": r["question"], **{f"ending{i}": r["options"][k] for i, k in enumerate("ABCD")},
              "label": "ABCD".index(r["answer_idx"])} for r in medqa]  # GBaker/MedQA-USMLE-4-options-hf's fields
    pqal = json.loads((source / "eval/pubmedqa/ori_pqal.json").read_text())
    test_ids = json.loads((source / "eval/pubmedqa/test_ground_truth.json").read_text())
    pubmedqa = [{"QUESTION": pqal[i]["QUESTION"], "CONTEXTS": pqal[i]["CONTEXTS"],
                 "final_decision": pqal[i]["final_decision"]} for i in list(test_ids)[:limit]]  # bigbio's fields
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    names = []
    for name, config, items in (("medqa_4options", "medqa/medqa.yaml", medqa),
                                ("pubmedqa", "pubmedqa/pubmedqa.yaml", pubmedqa)):
        data = folder / f"{name}_local.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        local = {"include": str(tasks_dir / config), "task": f"{name}_local", **LOCAL_TASK_OVERRIDES,
                 "dataset_kwargs": {"data_files": {"test": str(data)}}}
        (folder / f"{name}_local.yaml").write_text(json.dumps(local, indent=1))  # JSON is YAML
        names.append(f"{name}_local")
    return names
