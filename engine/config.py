"""A training run's configuration: one dataclass per concern, resolved from YAML files and `key=value` overrides.

Order of precedence (later wins): the dataclass defaults, `train/configs/{stage}.yaml`, `--config FILE`, then
`key=value` arguments. Keys are dotted (`lora.rank=0`, `optim.warmup_steps=10`); values are parsed as YAML
(`true`, `3`, `1e-5`, `[q_proj, v_proj]`). A few common keys are short names for a nested one: `lr`, `save_every`,
`resume`, `eval_every`, and `data` when given a string (a file, a dir or a hub name).

`load_config` is the only reader: a training run, the dry run (engine/dryrun.py) and each pipeline stage
(train/pipeline.py) resolve their keys through it, so a key means the same everywhere and an unknown one fails in one
line naming it. `hippo cpt --help` lists every key with its type and default.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hippocrates.engine.data import DataConfig
from hippocrates.models.lora import LoraConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "train" / "configs"
STAGES = ("cpt", "sft", "dpo")
ALIASES = {"lr": "optim.lr", "save_every": "checkpoint.save_every", "resume": "checkpoint.resume",
           "eval_every": "eval.every", "data": "data.path"}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the file (if any) and the key in one line."""


@dataclass
class OptimConfig:
    lr: float = 5e-5  # peak learning rate, reached after the warmup
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio on the last step
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    decay_steps: int = 0  # the step at which the cosine reaches lr * min_lr_ratio (then flat); 0 = max_steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 = no clipping


@dataclass
class CheckpointConfig:
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 2  # finished checkpoints kept in out_dir/checkpoints; older ones are deleted
    resume: bool | str = False  # true = the latest checkpoint in out_dir, or a checkpoint dir


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    precompute_reference: bool = False  # reference log-probs of every training pair in one pass before step 1
    policy_dropout: bool = False  # LoRA dropout in the policy forward (TRL disables it; the reference has none)


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between evaluations; 0 = none during training
    tasks: list[str] = field(default_factory=lambda: ["medqa"])  # eval/ tasks scored by CPT and SFT runs
    limit: int | None = 50  # items per task


@dataclass
class TrainConfig:
    stage: str = "cpt"
    model: str = "smollm2"  # a HF checkpoint dir, a .gguf file, or "smollm2" (the default model, fetched once)
    out_dir: str = "out/cpt"
    seq_len: int = 512
    batch_size: int = 1  # micro-batch rows per rank; the global batch is batch_size x world_size x grad_accum
    grad_accum: int = 1
    max_steps: int = 100
    seed: int = 1337
    skip_nonfinite: bool = False  # a NaN/Inf loss or gradient skips the step instead of stopping the run
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    mmap_activations: bool = False  # CPU: the forward's large activations come from fresh mmaps, not the heap: lower
                                    # peak RSS, slower steps (engine/host_memory.py)
    mixed_precision: str = "auto"  # auto: bf16 compute + fp32 reduction on GPU, fp32 on CPU; or fp32 | bf16
    timeout_s: int = 600  # collective timeout: a dead or stuck rank ends the run instead of hanging it
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * world_size * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(stage: str | None, config_file: str | Path | None = None, overrides: list[str] = (),
                layers: list[tuple[str, dict]] = ()) -> TrainConfig:
    """The one reader of training configs: a run, a dry run and a pipeline stage all resolve theirs here.

    Layers, later wins: the dataclass defaults, train/configs/{stage}.yaml, `config_file`, `layers` ((source name,
    flat settings) pairs, e.g. a pipeline's stage section), then `key=value` overrides. An unknown key or a bad value
    raises a ConfigError naming the key and the file (or layer) it came from. `stage=None` (the dry run) takes the
    file's `stage` key, else the stage its file name contains (dpo_llama2_7b.yaml), else cpt.
    """
    file_settings = read_yaml(Path(config_file)) if config_file else {}
    if stage is None:
        name = Path(config_file).name.lower() if config_file else ""
        stage = file_settings.get("stage") or next((s for s in STAGES if s in name), "cpt")
    if stage not in STAGES:
        raise ConfigError(f"{config_file or 'config'}: stage={stage!r}: expected one of {', '.join(STAGES)}")
    config = TrainConfig(stage=stage, out_dir=f"out/{stage}")
    stage_file = CONFIG_DIR / f"{stage}.yaml"
    if stage_file.is_file():
        apply_settings(config, read_yaml(stage_file), source=str(stage_file))
    if config_file:
        apply_settings(config, file_settings, source=str(config_file))
    for source, settings in layers:
        apply_settings(config, settings, source=source)
    apply_settings(config, parse_overrides(overrides), source="command line")
    if config.stage != stage:
        raise ConfigError(f"stage={config.stage!r} does not match the entry point train/{stage}.py")
    check(config)
    return config


def describe_keys(config, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(dotted key, type, value in `config`, the comment beside the field) for every key of a config dataclass."""
    rows = []
    comments = field_comments(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{f.name}.")
        else:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((prefix + f.name, kind, value, comments.get(f.name, "")))
    return rows


def field_comments(cls) -> dict[str, str]:
    """{field: its trailing `# comment`} from the class's source; {} where the source is not available."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found = (re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def read_yaml(path: Path) -> dict:
    """A YAML mapping as flat dotted keys: {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    return flatten(read_yaml_mapping(path))


def read_yaml_mapping(path: Path, error: type[Exception] = ConfigError) -> dict:
    """The top-level mapping of a YAML file ({} when empty); `error` names the file when it is missing or bad."""
    if not path.is_file():
        raise error(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise error(f"{path}: expected a mapping of keys at the top level")
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"lora": {"rank": 16}} -> {"lora.rank": 16}; dotted keys pass through."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_overrides(items) -> dict:
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"argument {item!r}: expected key=value (e.g. lora.rank=0)")
        try:
            settings[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            settings[key.strip()] = value
    return settings


def apply_settings(config: TrainConfig, settings: dict, source: str):
    for key, value in settings.items():
        target_key = ALIASES.get(key, key)
        owner, name = config, target_key
        *parents, name = target_key.split(".")
        for part in parents:
            if not dataclasses.is_dataclass(owner) or part not in _field_names(owner):
                raise ConfigError(f"{source}: unknown key {key!r}")
            owner = getattr(owner, part)
        if not dataclasses.is_dataclass(owner) or name not in _field_names(owner) \
                or dataclasses.is_dataclass(getattr(owner, name)):
            raise ConfigError(f"{source}: unknown key {key!r}")
        setattr(owner, name, coerce(getattr(owner, name), value, f"{source}: {key}"))


def _field_names(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def coerce(current, value, where: str):
    """`value` converted to the type of the key's current value, or a ConfigError naming the key."""
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str):  # resume=path
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
    elif isinstance(current, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):  # data.path: several sources
            return value
    elif isinstance(current, list):
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    else:
        return value
    raise ConfigError(f"{where}={value!r}: expected a value like {current!r}")


def check(config: TrainConfig):
    positive = {"seq_len": config.seq_len, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                "max_steps": config.max_steps, "timeout_s": config.timeout_s}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    if config.lora.rank < 0:
        raise ConfigError(f"lora.rank={config.lora.rank}: must be >= 0 (0 = full fine-tuning)")
    if config.optim.lr <= 0:
        raise ConfigError(f"lr={config.optim.lr}: must be > 0")
    if config.mixed_precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"mixed_precision={config.mixed_precision!r}: expected auto, fp32 or bf16")
    if config.dpo.loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ConfigError(f"dpo.loss_type={config.dpo.loss_type!r}: expected sigmoid, ipo or hinge")
    if config.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={config.checkpoint.keep_last}: must be >= 1")
