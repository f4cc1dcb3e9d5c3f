"""Multiple-choice tasks as data: a `TaskSpec` names a file, the fields to read, the prompt per protocol and the target.

Built-in specs cover MedQA, MedMCQA and PubMedQA; any other set is a YAML/JSON file with the same keys, e.g.

    name: mmlu_anatomy
    data: /data/mmlu/anatomy_test.csv        # JSON, JSONL, CSV, parquet, or a Hugging Face hub name (+ split)
    columns: [question, A, B, C, D, answer]  # a headerless CSV's fields, in order (MMLU's files)
    question: question
    options: [A, B, C, D]                    # one field per option, or one field holding a dict / list (any number)
    answer: answer
    answer_format: letter                    # letter | index0 | index1 | text
    fewshot_data: /data/mmlu/anatomy_dev.csv # optional; default: the evaluated set itself, minus the item

eval/specs/ holds documented examples (medqa_5options.yaml, mmlu_medical_csv.yaml).

Protocols (the prompt and the continuations scored after it):
- `letter`, lm-evaluation-harness's medqa_4options / medmcqa / pubmedqa: "Question: ...\\nA. ...\\n...Answer:",
  continuations " A", " B", ...
- `text`, the Hippocrates paper's: "Question: ...\\n(A) ... (B) ... (C) ... (D) ...\\nAnswer:", continuations
  " " + the option's text.
A task with fixed choice words (PubMedQA's yes / no / maybe) scores " " + the word in both protocols.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .records import EvalError, Record, get_field, read_records, resolve_data_path

PROTOCOLS = ("letter", "text")
ANSWER_FORMATS = ("letter", "index0", "index1", "text")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FEWSHOT_REST = "rest"  # fewshot_data value: the records of `data` that `select_ids` leaves out


@dataclass
class PromptFormat:
    """How one item becomes a prompt: `template` is filled with {question}, {options} and the spec's extra fields."""
    template: str
    option: str = "{letter}. {text}\n"  # one option inside {options}
    option_separator: str = ""
    continuation: str = "letter"  # "letter": " A"; "text": " " + the option's text

    def __post_init__(self):
        if self.continuation not in PROTOCOLS:
            raise EvalError(f"prompt continuation {self.continuation!r}: expected one of {PROTOCOLS}")


LETTER_PROMPT = PromptFormat("Question: {question}\n{options}Answer:")
TEXT_PROMPT = PromptFormat("Question: {question}\n{options}\nAnswer:", option="({letter}) {text}",
                           option_separator=" ", continuation="text")


@dataclass
class TaskSpec:
    name: str
    data: str  # a file (absolute, or relative to the spec's folder or the data dir) or a hub dataset name
    question: str  # field path; "a.b" reads record["a"]["b"]; a list value is joined with newlines
    answer: str
    answer_format: str = "letter"
    options: str | list[str] | None = None  # a field per option, or one field holding a dict (sorted keys) / list
    choices: list[str] | None = None  # fixed choice words instead of options (PubMedQA)
    fields: dict[str, str] = field(default_factory=dict)  # extra template names -> field paths
    id: str | None = None  # field path of the item id; default: the JSON object key or the record number
    split: str | None = None  # hub datasets
    subset: str | None = None
    select_ids: str | None = None  # a JSON file whose keys (object) or entries (list) are the evaluated ids
    fewshot_data: str | None = None  # a file, FEWSHOT_REST, or None: the evaluated set without the item
    fewshot_split: str | None = None
    fewshot_fields: dict = field(default_factory=dict)  # keys of this spec that differ in the few-shot source
    fewshot_pool_name: str | None = None  # what the pool is, for results.json ("train split", "MedQA dev", ...)
    columns: list[str] | None = None  # field names of a headerless CSV (MMLU's), in column order
    prompts: dict[str, PromptFormat] = field(default_factory=lambda: {"letter": LETTER_PROMPT, "text": TEXT_PROMPT})
    base_dir: str | None = None  # where relative paths are looked up first (a spec file's folder)

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise EvalError(f"task {self.name}: answer_format {self.answer_format!r}, expected one of {ANSWER_FORMATS}")
        if self.columns is not None and not (isinstance(self.columns, list) and self.columns
                                             and all(isinstance(c, str) for c in self.columns)):
            raise EvalError(f"task {self.name}: `columns` must be a list of field names (a headerless CSV's)")
        if (self.options is None) == (self.choices is None):
            raise EvalError(f"task {self.name}: give exactly one of `options` (fields) and `choices` (fixed words)")
        self.prompts = {k: v if isinstance(v, PromptFormat) else _prompt_from_dict(v, self.name, k)
                        for k, v in self.prompts.items()}


def _prompt_from_dict(raw, task: str, protocol: str) -> PromptFormat:
    if not isinstance(raw, dict):
        raise EvalError(f"task {task}: prompts.{protocol} must be a mapping with a `template`")
    known = {f.name for f in dataclasses.fields(PromptFormat)}
    unknown = sorted(set(raw) - known)
    if unknown or "template" not in raw:
        problem = f"unknown key {unknown[0]!r}" if unknown else "missing key 'template'"
        raise EvalError(f"task {task}: prompts.{protocol}: {problem}")
    return PromptFormat(**raw)


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "medqa": TaskSpec(
        name="medqa", data="eval/medqa/test.jsonl", fewshot_data="eval/medqa/dev.jsonl",
        fewshot_pool_name="MedQA dev split (no train split given; lm-eval draws from train)",
        question="question", options="options", answer="answer_idx", answer_format="letter",
    ),
    "medmcqa": TaskSpec(
        name="medmcqa", data="eval/medmcqa/dev.jsonl", id="id",
        question="question", options=["opa", "opb", "opc", "opd"], answer="cop", answer_format="index1",
        fewshot_pool_name="the evaluated MedMCQA dev split minus the item (no train split given; lm-eval draws "
                          "from train)",
        prompts={"letter": PromptFormat("Question: {question}\nChoices:\n{options}Answer:"), "text": TEXT_PROMPT},
    ),
    "pubmedqa": TaskSpec(
        name="pubmedqa", data="eval/pubmedqa/ori_pqal.json", select_ids="eval/pubmedqa/test_ground_truth.json",
        fewshot_data=FEWSHOT_REST, question="QUESTION", fields={"context": "CONTEXTS"},
        fewshot_pool_name="the 500 PQA-L items outside the test split (no train fold given; lm-eval draws from "
                          "fold 0's train)",
        choices=["yes", "no", "maybe"], answer="final_decision", answer_format="text",
        prompts={p: PromptFormat("Abstract: {context}\nQuestion: {question}\nAnswer:", continuation="text")
                 for p in PROTOCOLS},
    ),
}


# The train splits lm-evaluation-harness 0.4 draws few-shot examples from, by hub name: their split, subset and the
# keys that differ from the built-in spec's (their records are laid out differently from ../shared/data's files).
HUB_TRAIN_SPLITS = {
    "medqa": {"GBaker/MedQA-USMLE-4-options-hf": dict(
        fewshot_split="train", fewshot_fields={"question": "sent1", "options": ["ending0", "ending1", "ending2",
                                                                                  "ending3"],
                                               "answer": "label", "answer_format": "index0"})},
    "medmcqa": {"openlifescienceai/medmcqa": dict(fewshot_split="train",
                                                   fewshot_fields={"answer_format": "index0"})},  # cop 0-based there
    "pubmedqa": {"bigbio/pubmed_qa": dict(fewshot_split="train", subset="pubmed_qa_labeled_fold0_source")},
}


def with_train_split(spec: TaskSpec, source: str, split: str | None = None) -> TaskSpec:
    """The spec with its few-shot pool replaced by a train split: a local file laid out as the evaluated split, or
    a hub name (the one lm-eval reads for a built-in task, or any hub dataset laid out as the evaluated split)."""
    changes = dict(fewshot_data=source, fewshot_split=split, fewshot_fields={},
                   fewshot_pool_name=f"train split: {source}" + (f"[{split}]" if split else ""))
    known = HUB_TRAIN_SPLITS.get(spec.name, {}).get(source)
    if known is not None:
        changes.update(known)
        changes["fewshot_split"] = split or known["fewshot_split"]
        changes["fewshot_pool_name"] = f"train split: {source}[{changes['fewshot_split']}]"
    return dataclasses.replace(spec, **changes)


@dataclass
class Item:
    id: str
    question: str
    choices: list[str]  # option texts, or the fixed choice words
    gold: int
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Task:
    spec: TaskSpec
    items: list[Item]
    fewshot_pool: list[Item]
    fewshot_excludes_self: bool  # the pool is the evaluated set: drop the item from its own examples
    fewshot_pool_name: str = ""  # where the examples come from, for results.json and the report


def load_spec(path: str | Path) -> TaskSpec:
    """A YAML or JSON task spec file -> TaskSpec (relative data paths resolve against the file's folder first)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: task spec file not found")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(path.read_text())
        else:
            raw = json.loads(path.read_text())
    except Exception as err:  # yaml and json raise their own error types
        raise EvalError(f"{path}: cannot parse task spec ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise EvalError(f"{path}: a task spec must be a mapping")
    known = {f.name for f in dataclasses.fields(TaskSpec)} - {"base_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EvalError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    raw.setdefault("name", path.stem)
    for key in ("data", "question", "answer"):
        if key not in raw:
            raise EvalError(f"{path}: missing key {key!r}")
    try:
        return TaskSpec(**raw, base_dir=str(path.parent))
    except EvalError as err:
        raise EvalError(f"{path}: {err}") from None


def resolve_spec(name_or_path: str) -> TaskSpec:
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path]
    if name_or_path.endswith((".yaml", ".yml", ".json")):
        return load_spec(name_or_path)
    raise EvalError(f"unknown task {name_or_path!r}: expected one of {', '.join(BUILTIN_TASKS)} "
                    f"or a task spec file (.yaml / .json)")


def _text(value) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def make_item(spec: TaskSpec, record: Record) -> Item:
    if spec.choices is not None:
        choices = list(spec.choices)
    elif isinstance(spec.options, str):
        raw = get_field(record, spec.options)
        if isinstance(raw, dict):
            choices = [_text(raw[k]) for k in sorted(raw)]
        elif isinstance(raw, list):
            choices = [_text(v) for v in raw]
        else:
            raise EvalError(f"{record.where}: field {spec.options!r} must hold a dict or a list of options")
    else:
        choices = [_text(get_field(record, name)) for name in spec.options]
    if not 2 <= len(choices) <= len(LETTERS):
        raise EvalError(f"{record.where}: {len(choices)} options, expected 2 to {len(LETTERS)}")
    answer = get_field(record, spec.answer)
    return Item(
        id=str(get_field(record, spec.id)) if spec.id else record.default_id,
        question=_text(get_field(record, spec.question)),
        choices=choices,
        gold=_gold_index(spec, record, answer, choices),
        fields={name: _text(get_field(record, path)) for name, path in spec.fields.items()},
    )


def _gold_index(spec: TaskSpec, record: Record, answer, choices: list[str]) -> int:
    n = len(choices)
    if spec.answer_format == "text":
        if str(answer) in choices:
            return choices.index(str(answer))
        valid = ", ".join(map(repr, choices))
    elif spec.answer_format == "letter":
        letter = str(answer).strip().upper()
        if len(letter) == 1 and letter in LETTERS[:n]:
            return LETTERS.index(letter)
        valid = f"a letter A-{LETTERS[n - 1]}"
    else:
        base = 0 if spec.answer_format == "index0" else 1
        try:
            index = int(answer) - base
        except (TypeError, ValueError):
            index = -1
        if 0 <= index < n and str(answer).strip().lstrip("-").isdigit():
            return index
        valid = f"an integer {base}-{n - 1 + base} ({spec.answer_format})"
    raise EvalError(f"{record.where}: answer {spec.answer}={answer!r} is outside the choices (expected {valid})")


def _read_id_set(spec: TaskSpec, data_dir: Path | None) -> set[str]:
    path = resolve_data_path(spec.select_ids, [spec.base_dir, data_dir], spec.name)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EvalError(f"{path}: cannot read the id list ({err})") from None
    return {str(x) for x in data}


def load_task(spec: TaskSpec | str, data_dir: str | Path | None = None, limit: int | None = None) -> Task:
    """Read and check every evaluated item (then keep the first `limit`), and the few-shot pool."""
    if isinstance(spec, str):
        spec = resolve_spec(spec)
    data_dir = Path(data_dir) if data_dir is not None else _default_data_dir()
    source = resolve_data_path(spec.data, [spec.base_dir, data_dir], spec.name)
    records = read_records(source, spec.split, spec.subset, columns=spec.columns)
    if not records:
        raise EvalError(f"task {spec.name}: {spec.data} holds no records")
    rest: list[Record] = []
    if spec.select_ids:
        wanted = _read_id_set(spec, data_dir)
        rest = [r for r in records if r.default_id not in wanted]
        records = [r for r in records if r.default_id in wanted]
        if len(records) != len(wanted):
            raise EvalError(f"task {spec.name}: {len(wanted) - len(records)} ids of {spec.select_ids} "
                            f"are not in {spec.data}")
    items = [make_item(spec, r) for r in records]
    for protocol, fmt in spec.prompts.items():
        _check_template(spec, protocol, fmt, items[0])
    if limit is not None:
        items = items[:limit]
    pool_spec = dataclasses.replace(spec, **spec.fewshot_fields) if spec.fewshot_fields else spec
    if spec.fewshot_data == FEWSHOT_REST:
        pool, excludes_self = [make_item(pool_spec, r) for r in rest], False
        where = f"the records of {spec.data} outside {spec.select_ids}"
    elif spec.fewshot_data:
        source = resolve_data_path(spec.fewshot_data, [spec.base_dir, data_dir], spec.name)
        pool = [make_item(pool_spec, r)
                for r in read_records(source, spec.fewshot_split, spec.subset, columns=spec.columns)]
        excludes_self = False
        where = str(source) + (f"[{spec.fewshot_split}]" if isinstance(source, str) and spec.fewshot_split else "")
    else:
        pool, excludes_self = [make_item(spec, r) for r in records], True
        where = f"{spec.data} itself, minus the item"
    name = f"{spec.fewshot_pool_name} ({where})" if spec.fewshot_pool_name else where
    return Task(spec, items, pool, excludes_self, f"{name}, {len(pool)} records")


def _check_template(spec: TaskSpec, protocol: str, fmt: PromptFormat, item: Item):
    try:
        render_prompt(item, fmt)
    except (KeyError, IndexError, ValueError) as err:
        where = f"{spec.base_dir}: " if spec.base_dir else ""
        raise EvalError(f"{where}task {spec.name}: prompts.{protocol} cannot be filled "
                        f"({type(err).__name__}: {err}); it may use {{question}}, {{options}}"
                        + "".join(f", {{{name}}}" for name in item.fields)
                        + " and, in `option`, {letter} and {text}") from None


def _default_data_dir() -> Path | None:
    from hippocrates.models.paths import data_dir
    try:
        return data_dir()
    except FileNotFoundError:
        return None


def render_prompt(item: Item, fmt: PromptFormat) -> str:
    options = fmt.option_separator.join(fmt.option.format(letter=LETTERS[i], text=text)
                                        for i, text in enumerate(item.choices))
    return fmt.template.format(question=item.question, options=options, **item.fields)


def choice_labels(spec: TaskSpec, item: Item, fmt: PromptFormat) -> list[str]:
    """The strings scored after the prompt (without the leading space): letters, option texts or fixed words."""
    if spec.choices is None and fmt.continuation == "letter":
        return list(LETTERS[:len(item.choices)])
    return list(item.choices)


def fewshot_draws(task: Task, items: list[Item], k: int, seed: int) -> list[list[Item]]:
    """k examples for each item, as lm-evaluation-harness 0.4 draws them: one `random.Random(seed)` per task, one
    `sample(pool, k)` per item in document order (so an item's examples depend on the items before it, as there).
    A pool that is the evaluated set itself draws k + 1 and drops the item (lm-eval's rule when the few-shot split
    is the test split)."""
    if k <= 0:
        return [[] for _ in items]
    pool = task.fewshot_pool
    need = k + 1 if task.fewshot_excludes_self else k
    if len(pool) < need:
        raise EvalError(f"task {task.spec.name}: {k} few-shot examples asked, the pool holds {len(pool)} "
                        f"({task.fewshot_pool_name})")
    rng = random.Random(seed)
    draws = []
    for item in items:
        drawn = rng.sample(pool, need)
        if task.fewshot_excludes_self:
            drawn = [ex for ex in drawn if ex.id != item.id][:k]
        draws.append(drawn)
    return draws


def fewshot_examples(task: Task, item: Item, k: int, seed: int) -> list[Item]:
    """The k examples of one item of task.items (the draws of every item before it are replayed)."""
    if k <= 0:
        return []
    position = next((i for i, x in enumerate(task.items) if x is item or x.id == item.id), None)
    if position is None:
        raise EvalError(f"task {task.spec.name}: item {item.id!r} is not one of the task's items")
    return fewshot_draws(task, task.items[:position + 1], k, seed)[-1]


@dataclass
class Request:
    """What the scorer sees for one item: a context and one continuation per choice (each with its leading space)."""
    task: str
    item_id: str
    context: str
    continuations: list[str]
    labels: list[str]  # continuations without the leading delimiter: their lengths normalize acc_norm
    gold: int


def build_requests(task: Task, items: list[Item], protocol: str, num_fewshot: int = 0,
                   seed: int = 1234) -> list[Request]:
    """One request per item, in order; the few-shot draws as `fewshot_draws` makes them."""
    draws = fewshot_draws(task, items, num_fewshot, seed)
    return [build_request(task, item, protocol, num_fewshot, seed, shots=shots) for item, shots in zip(items, draws)]


def build_request(task: Task, item: Item, protocol: str, num_fewshot: int = 0, seed: int = 1234,
                  shots: list[Item] | None = None) -> Request:
    """lm-evaluation-harness's layout: examples as prompt + " " + answer + "\\n\\n", then the item's prompt.
    shots: the item's examples (default: `fewshot_examples`, drawn as over task.items)."""
    if protocol not in task.spec.prompts:
        raise EvalError(f"task {task.spec.name}: no prompt for protocol {protocol!r} "
                        f"(has {', '.join(task.spec.prompts)})")
    fmt = task.spec.prompts[protocol]
    if shots is None:
        shots = fewshot_examples(task, item, num_fewshot, seed)
    shots = "".join(f"{render_prompt(ex, fmt)} {choice_labels(task.spec, ex, fmt)[ex.gold]}\n\n" for ex in shots)
    labels = choice_labels(task.spec, item, fmt)
    return Request(task.spec.name, item.id, shots + render_prompt(item, fmt), [" " + s for s in labels], labels,
                   item.gold)
