"""The Hippocrates recipe end to end: CPT -> SFT -> DPO -> evaluation -> report, one command.

    python -m hippocrates.train.pipeline [--config FILE] [--stages cpt,sft,dpo,eval] [--dry-run] [key=value ...]

Config: the dataclass defaults below, then FILE (default: train/configs/pipeline.yaml, the 2-CPU-core recipe on
SmolLM2-135M-Instruct), then `key=value` overrides with dotted keys (`cpt.max_steps=5`, `eval.limit.medqa=20`,
`run_dir=out/try`). A stage section (`cpt`, `sft`, `dpo`) holds trainer keys (engine/config.py), plus `config`: a
trainer YAML file applied under them.

What each stage does (every stage is a subprocess: `python train/{stage}.py`, or torchrun with `nproc` > 1):
- cpt, sft, dpo train in that order, each from the output (`final/`) of the nearest earlier stage that this run
  trains or has trained, else from the base model; outputs go to RUN_DIR/{stage}/.
- sft reads the data this pipeline writes to RUN_DIR/data/: general instructions and evaluation instructions made
  from the benchmarks' non-test splits in the evaluation's prompt format (train/sft_data.py).
- eval scores the base model first and each finished stage right after it, on the same held-out items, a seeded
  subset of each benchmark's test split (train/heldout.py), with `python -m hippocrates.eval.run`, once per distinct protocol.
- the report (train/report.py) is rewritten after each evaluation and at the end of every invocation, also a
  failed one: RUN_DIR/report.md, report.json, loss_curves.png, dpo_rewards.png.

Resuming: a stage whose final/ exists and whose resolved config, input model and data files are unchanged is
skipped; an unfinished one resumes from its last checkpoint (resume=true); a changed one is trained again from
scratch (its old out_dir is removed), and so is everything downstream of it. Evaluations are skipped the same way.
No file of the benchmarks' test splits may be training data (checked before anything runs).

`--dry-run` writes the stage configs and runs the meta-device dry run (engine/dryrun.py) on each instead of
training: the way to check a GPU recipe (train/configs/pipeline_hippo_*.yaml) on a laptop.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hippocrates.engine.config import flatten, load_config, read_yaml, read_yaml_mapping

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "train" / "configs" / "pipeline.yaml"
TRAIN_STAGES = ("cpt", "sft", "dpo")
ALL_STAGES = (*TRAIN_STAGES, "eval")
STAGE_STATE = "pipeline_stage.json"
EVAL_STATE = "pipeline_eval.json"
# the evaluated splits: never training data
TEST_FILES = ("eval/medqa/test.jsonl", "eval/medmcqa/dev.jsonl", "eval/pubmedqa/ori_pqal.json",
              "eval/pubmedqa/test_ground_truth.json")


class PipelineError(ValueError):
    """A bad pipeline config or a failed stage; the message names the key, file or stage in one line."""


# ---------------------------------------------------------------------------------------------------------------
# config


@dataclass
class SftDataSettings:
    general: dict = field(default_factory=dict)  # engine.data source spec -> records sampled (null: all of them)
    eval_instructions: dict = field(default_factory=dict)  # task -> records per protocol (null: every non-test item)
    protocols: list | None = None  # prompt formats of the evaluation instructions; default: eval.protocols
    seed: int = 1234


@dataclass
class EvalSettings:
    tasks: list = field(default_factory=lambda: ["medqa", "medmcqa", "pubmedqa"])
    limit: int | dict | None = None  # items per task (an int for all tasks, or task -> int); null: the whole split
    protocols: list = field(default_factory=lambda: ["letter", "text"])
    seed: int = 1234  # draws the held-out subset
    args: list = field(default_factory=list)  # more `python -m hippocrates.eval.run` arguments, e.g. ["--batch-size", "4"]


@dataclass
class PipelineConfig:
    run_dir: str = "out/pipeline"
    model: str = "smollm2"  # the base model: "smollm2", a HF checkpoint dir or a .gguf file
    data_dir: str | None = None  # default: models.paths.data_dir() (HIPPO_DATA_DIR or ../shared/data)
    stages: list = field(default_factory=lambda: list(ALL_STAGES))
    nproc: int = 1  # training processes (torchrun --nproc_per_node) per stage
    threads: int | None = None  # torch threads per process; default: CPU cores // nproc
    cpt: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    sft_data: SftDataSettings = field(default_factory=SftDataSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def limit_of(self, task: str) -> int | None:
        limit = self.eval.limit
        return limit.get(task) if isinstance(limit, dict) else limit


def load_pipeline_config(config_file: str | None = None, overrides: list[str] = (),
                         stages: str | None = None) -> PipelineConfig:
    tree: dict = {}
    path = Path(config_file) if config_file else DEFAULT_CONFIG
    if config_file or path.is_file():
        tree = read_tree(path)
    source = str(path)
    for item in overrides:
        # a data source spec may itself hold "=" ("...:instruction=question"): under a VERBATIM mapping the value
        # (a count) follows the last "="
        verbatim = any(item.startswith(".".join(prefix) + ".") for prefix in VERBATIM)
        key, sep, value = item.rpartition("=") if verbatim else item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"argument {item!r}: expected key=value (e.g. cpt.max_steps=5)")
        set_dotted(tree, key.strip(), yaml.safe_load(value) if value.strip() else None)
        source = "command line"
    if stages is not None:
        tree["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    return from_tree(tree, source)


def read_tree(path: Path) -> dict:
    return unflatten(read_yaml_mapping(path, PipelineError))


# mappings whose keys are names, not dotted paths: data source specs such as "corpus/medquad_qa.jsonl:text=answer"
VERBATIM = (("sft_data", "general"), ("sft_data", "eval_instructions"), ("eval", "limit"))


def split_key(key: str) -> list[str]:
    """"cpt.lora.rank" -> [cpt, lora, rank]; under a VERBATIM mapping the rest is one name."""
    for prefix in VERBATIM:
        head = ".".join(prefix) + "."
        if key.startswith(head):
            return [*prefix, key[len(head):]]
    return key.split(".")


def unflatten(tree: dict, path: tuple = ()) -> dict:
    """{"lora.rank": 8} -> {"lora": {"rank": 8}}, recursively (VERBATIM mappings are kept as they are)."""
    if path in VERBATIM:
        return dict(tree)
    out: dict = {}
    for key, value in tree.items():
        parts = split_key(".".join([*path, str(key)]))[len(path):]
        set_parts(out, parts, unflatten(value, (*path, *parts)) if isinstance(value, dict) else value)
    return out


def set_dotted(tree: dict, key: str, value):
    set_parts(tree, split_key(key), value)


def set_parts(tree: dict, parts: list[str], value):
    *parents, name = parts
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(value, dict) and isinstance(node.get(name), dict):
        for k, v in value.items():
            set_parts(node[name], [k], v)
    else:
        node[name] = value


def from_tree(tree: dict, source: str) -> PipelineConfig:
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    for key in tree:
        if key not in known:
            raise PipelineError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    values = {k: v for k, v in tree.items() if k not in ("sft_data", "eval")}
    for stage in TRAIN_STAGES:
        if values.get(stage) is None:
            values[stage] = {}
        if not isinstance(values[stage], dict):
            raise PipelineError(f"{source}: {stage} must be a mapping of trainer keys")
    config = PipelineConfig(**values,
                            sft_data=_section(SftDataSettings, tree.get("sft_data"), "sft_data", source),
                            eval=_section(EvalSettings, tree.get("eval"), "eval", source))
    check(config, source)
    return config


def _section(cls, raw, name: str, source: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: {name} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise PipelineError(f"{source}: unknown key {name}.{key} (known: {', '.join(sorted(known))})")
    return cls(**raw)


def check(config: PipelineConfig, source: str):
    for stage in config.stages:
        if stage not in ALL_STAGES:
            raise PipelineError(f"{source}: stages: unknown stage {stage!r} (expected some of {','.join(ALL_STAGES)})")
    if not isinstance(config.nproc, int) or config.nproc < 1:
        raise PipelineError(f"{source}: nproc={config.nproc!r}: expected an integer >= 1")
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads < 1):
        raise PipelineError(f"{source}: threads={config.threads!r}: expected an integer >= 1")
    for protocol in config.eval.protocols:
        if protocol not in ("letter", "text"):
            raise PipelineError(f"{source}: eval.protocols: {protocol!r} is not letter or text")
    limits = config.eval.limit.values() if isinstance(config.eval.limit, dict) else [config.eval.limit]
    for limit in limits:
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise PipelineError(f"{source}: eval.limit={limit!r}: expected a positive integer or null")
    for name, value in [*config.sft_data.general.items(), *config.sft_data.eval_instructions.items()]:
        if value is not None and (not isinstance(value, int) or value < 0):
            raise PipelineError(f"{source}: sft_data: {name}={value!r}: expected a count >= 0 or null (all)")
    if "path" in (config.sft.get("data") or {}):
        raise PipelineError(f"{source}: sft.data.path is written by the pipeline: set sft_data.general and "
                            f"sft_data.eval_instructions instead")
    for stage in TRAIN_STAGES:  # every trainer key now, not when the stage starts (perhaps hours later)
        try:
            load_config(stage, layers=stage_layers(getattr(config, stage), stage, source))
        except ValueError as err:  # ConfigError: one line naming the key and file
            raise PipelineError(str(err)) from None


def stage_layers(section: dict, stage: str, source: str) -> list[tuple[str, dict]]:
    """A stage section as layers of the trainer's own reader (engine.config.load_config): its `config` file, then its
    keys. A key means what it means in `hippo {stage}`."""
    section = dict(section)
    layers = []
    if section.get("config"):
        path = Pipeline.find_file(section["config"], f"{stage}.config")
        layers.append((str(path), read_yaml(path)))
    section.pop("config", None)
    return [*layers, (f"{source}: {stage}", flatten(section))]


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def fingerprint_path(path: Path) -> list:
    """What identifies a model or data file for skipping: names, sizes and mtimes (a dir: its files)."""
    path = Path(path)
    if path.is_dir():
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]
    if path.is_file():
        return [[str(path), path.stat().st_size, path.stat().st_mtime_ns]]
    return [str(path)]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def subprocess_env(threads: int, data_dir: Path) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["HIPPO_DATA_DIR"] = str(data_dir)
    env.pop("TRITON_INTERPRET", None)  # the CPU path is torch; the interpreter is a test-only switch
    return env


def run_command(command: list[str], env: dict, what: str, resumable: bool = False) -> float:
    """Run a stage's subprocess (its output goes to ours); return its wall time. Ctrl-C lets it save first."""
    print(f"[pipeline] {what}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT: the trainer saves a checkpoint and exits
        process.wait()
        raise PipelineError(f"{what}: interrupted; run the same command again to resume") from None
    if code != 0:
        again = "to resume from its last checkpoint" if resumable else "to retry it (finished work is skipped)"
        raise PipelineError(f"{what} failed (exit code {code}, its error is printed above); run the same command "
                            f"again {again}")
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------------------
# the run


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.run_dir = Path(config.run_dir).resolve()
        from hippocrates.models.paths import data_dir
        try:
            self.data_dir = Path(config.data_dir).resolve() if config.data_dir else data_dir()
        except FileNotFoundError as err:
            raise PipelineError(str(err)) from None
        self.threads = config.threads or max(1, (os.cpu_count() or 1) // config.nproc)
        self.state_path = self.run_dir / "pipeline_state.json"
        self.state = read_json(self.state_path) or {}
        self.state.pop("total_wall_s", None)
        self.state["config"] = dataclasses.asdict(config)
        self.state.setdefault("stages", {})
        self.state.setdefault("evals", {})
        self.item_index = None  # the benchmarks' n-grams for decontamination, built once per invocation

    # -- what runs

    def run(self, dry_run: bool = False):
        started = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "pipeline.yaml").write_text(yaml.safe_dump(self.state["config"], sort_keys=False))
        base = self.base_model(dry_run)
        if dry_run:
            return self.dry_run(base)
        self.prepare_heldout()
        evaluating = "eval" in self.config.stages
        try:
            if evaluating:
                self.evaluate("base", base)
            model, label = base, "base"
            for stage in TRAIN_STAGES:
                if stage in self.config.stages:
                    self.train_stage(stage, model, label)
                if self.finished(stage):
                    model, label = self.run_dir / stage / "final", stage
                    if evaluating:  # right away: a later stage's failure leaves this one's numbers in the report
                        self.evaluate(stage, model)
        finally:
            self.state["total_wall_s"] = time.perf_counter() - started
            write_json(self.state_path, self.state)
            if self.state.get("heldout"):
                self.write_report()

    def write_report(self):
        from hippocrates.train.report import write_report
        try:
            write_report(self.run_dir)
        except ValueError as err:  # never hide the stage's own error behind the report's
            print(f"[pipeline] report not written: {err}", file=sys.stderr, flush=True)
            return
        print(f"[pipeline] report: {self.run_dir / 'report.md'}", file=sys.stderr, flush=True)

    def base_model(self, dry_run: bool) -> Path | str:
        model = self.config.model
        if model == "smollm2":
            from hippocrates.models.fetch import fetch_smollm2
            return Path(fetch_smollm2())
        path = Path(model)
        if path.exists():
            return path.resolve()
        from hippocrates.models import PRESETS
        if dry_run and model in PRESETS:
            return model
        hint = " (an architecture preset: give the HF checkpoint dir to train, presets work with --dry-run)" \
            if model in PRESETS else ""
        raise PipelineError(f"model={model}: no such checkpoint dir or file{hint}")

    def finished(self, stage: str) -> bool:
        info = read_json(self.run_dir / stage / STAGE_STATE) or {}
        return bool(info.get("done")) and (self.run_dir / stage / "final" / "config.json").is_file()

    # -- held-out items and SFT data

    def prepare_heldout(self):
        from hippocrates.train.heldout import distinct_protocols, select_heldout
        from hippocrates.eval.tasks import load_spec
        limits = {task: self.config.limit_of(task) for task in self.config.eval.tasks}
        try:
            chosen = select_heldout(self.config.eval.tasks, limits, self.config.eval.seed, self.data_dir,
                                    self.run_dir / "eval")
        except ValueError as err:
            raise PipelineError(f"eval: {err}") from None
        self.state["heldout"] = chosen
        self.state["protocols"] = {task: distinct_protocols(load_spec(info["spec"]), self.config.eval.protocols)
                                   for task, info in chosen.items()}
        write_json(self.state_path, self.state)

    def write_sft_data(self) -> list[str]:
        from hippocrates.train.sft_data import benchmark_test_questions, write_eval_instructions, write_general
        settings = self.config.sft_data
        data = self.run_dir / "data"
        paths, summary = [], {}
        if settings.general:
            summary["general"] = write_general(settings.general, settings.seed, self.data_dir,
                                               data / "sft_general.jsonl")
            paths.append(str(data / "sft_general.jsonl"))
        if settings.eval_instructions:
            protocols = settings.protocols or self.config.eval.protocols
            tests = benchmark_test_questions(["medqa", "medmcqa", "pubmedqa"], self.data_dir)
            summary["eval_instructions"] = write_eval_instructions(
                settings.eval_instructions, protocols, tests, settings.seed, self.data_dir,
                data / "sft_eval_instructions.jsonl")
            paths.append(str(data / "sft_eval_instructions.jsonl"))
        if not paths:
            raise PipelineError("sft_data: neither general nor eval_instructions names any data")
        self.state["sft_data"] = summary
        return paths

    # -- training

    def stage_config(self, stage: str, model, data_paths: list[str] | None) -> Path:
        """RUN_DIR/configs/{stage}.yaml: the stage's whole resolved trainer config (the section's trainer file, its
        keys, then what the pipeline decides), which the stage's process reads back unchanged."""
        decided = {"stage": stage, "model": str(model), "out_dir": str(self.run_dir / stage), "resume": True}
        if data_paths is not None:
            decided["data.path"] = data_paths
        layers = [*stage_layers(getattr(self.config, stage), stage, "pipeline"), ("pipeline", decided)]
        try:
            config = load_config(stage, layers=layers)
        except ValueError as err:
            raise PipelineError(f"{stage}: {err}") from None
        path = self.run_dir / "configs" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return path

    @staticmethod
    def find_file(name: str, key: str) -> Path:
        """A path as given (absolute or from the working dir), else relative to the repo root."""
        for candidate in (Path(name), ROOT / name):
            if candidate.is_file():
                return candidate.resolve()
        raise PipelineError(f"{key}={name}: no such file (looked in the working dir and {ROOT})")

    def resolve(self, stage: str, config_file: Path):
        from hippocrates.engine.config import load_config
        from hippocrates.engine.data import DataError
        try:
            return load_config(stage, str(config_file))
        except (ValueError, DataError) as err:
            raise PipelineError(f"{stage}: {err}") from None

    def data_identity(self, stage: str, data_path) -> list:
        from hippocrates.engine.data.sources import parse_source
        identity = []
        for spec in [data_path] if isinstance(data_path, str) else list(data_path):
            try:
                source = parse_source(spec, self.data_dir)
            except ValueError as err:
                raise PipelineError(f"{stage}: data: {err}") from None
            tests = {(self.data_dir / t).resolve() for t in TEST_FILES}
            for file in source.files:
                if file.resolve() in tests:
                    raise PipelineError(f"{stage}: data {spec} is a benchmark's evaluated split ({file}); the "
                                        f"held-out items must never be training data")
            identity.append([spec, source.identity()])
        return identity

    def train_stage(self, stage: str, model: Path, label: str):
        data_paths = self.write_sft_data() if stage == "sft" else None
        config_file = self.stage_config(stage, model, data_paths)
        resolved = self.resolve(stage, config_file)
        out_dir = self.run_dir / stage
        signature = digest({"config": {k: v for k, v in resolved.to_dict().items()},
                            "model": fingerprint_path(model), "data": self.data_identity(stage, resolved.data.path),
                            "nproc": self.config.nproc})
        self.decontaminate(stage, resolved.data.path)
        info = read_json(out_dir / STAGE_STATE)
        if out_dir.exists() and any(out_dir.iterdir()) and info is None:
            raise PipelineError(f"{out_dir} exists but was not written by this pipeline (no {STAGE_STATE}): remove "
                                f"it or choose another run_dir")
        if info is not None and info.get("signature") != signature:
            print(f"[pipeline] {stage}: its config, input model or data changed since {out_dir} was trained; "
                  f"training it again from scratch", file=sys.stderr, flush=True)
            shutil.rmtree(out_dir)
            info = None
        record = {"input": label, "model": str(model), "out_dir": str(out_dir), "config_file": str(config_file)}
        if info is not None and self.finished(stage):
            print(f"[pipeline] {stage}: finished earlier with the same config ({out_dir}/final); skipped",
                  file=sys.stderr, flush=True)
            self.state["stages"][stage] = {**record, **info, "status": "skipped (finished earlier)"}
            return
        info = info or {"signature": signature, "done": False, "wall_s": 0.0, "attempts": 0}
        info["attempts"] += 1
        write_json(out_dir / STAGE_STATE, info)
        status = "trained" if info["attempts"] == 1 else f"resumed (attempt {info['attempts']})"
        self.state["stages"][stage] = {**record, **info, "status": "running"}
        try:
            wall = run_command(self.train_command(stage, config_file),
                               subprocess_env(self.threads, self.data_dir), f"stage {stage}", resumable=True)
        except PipelineError:
            self.state["stages"][stage]["status"] = "failed or interrupted"
            raise
        info["wall_s"] += wall
        info["done"] = self.finished_files(out_dir)
        write_json(out_dir / STAGE_STATE, info)
        if not info["done"]:
            self.state["stages"][stage].update(info, status="stopped early")
            raise PipelineError(f"stage {stage} stopped before its last step (a checkpoint was saved in "
                                f"{out_dir}/checkpoints); run the same command again to resume")
        self.state["stages"][stage] = {**record, **info, "status": status}
        write_json(self.state_path, self.state)

    def decontaminate(self, stage: str, data_path):
        """eval.decontaminate on the stage's training files against the evaluated benchmarks' whole test splits;
        kept in the state (recomputed only when the data changes) for report.md's table."""
        from hippocrates.engine.data.sources import parse_source
        from hippocrates.eval.decontaminate import ItemIndex, scan_source
        specs = [data_path] if isinstance(data_path, str) else list(data_path)
        signature = digest({"data": self.data_identity(stage, data_path), "tasks": list(self.config.eval.tasks)})
        done = self.state.setdefault("decontamination", {}).get(stage)
        if done and done.get("signature") == signature:
            return
        sources = [str(f) for spec in specs for f in (parse_source(spec, self.data_dir).files or [spec])]
        print(f"[pipeline] {stage}: 13-gram decontamination of its training data", file=sys.stderr, flush=True)
        try:
            if self.item_index is None:
                self.item_index = ItemIndex(list(self.config.eval.tasks), self.data_dir)
            scans = {source: scan_source(source, self.item_index, self.data_dir) for source in sources}
        except ValueError as err:
            raise PipelineError(f"{stage}: decontamination: {err}") from None
        self.state["decontamination"][stage] = {"signature": signature, "n": self.item_index.n,
                                                "splits": self.item_index.splits, "sources": scans}
        write_json(self.state_path, self.state)

    @staticmethod
    def finished_files(out_dir: Path) -> bool:
        return (out_dir / "final" / "config.json").is_file()

    def train_command(self, stage: str, config_file: Path) -> list[str]:
        module = f"hippocrates.train.{stage}"
        if self.config.nproc == 1:
            return [sys.executable, "-m", module, "--config", str(config_file)]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={self.config.nproc}", "-m", module, "--config", str(config_file)]

    # -- evaluation

    def evaluate(self, label: str, model: Path):
        """Every distinct protocol on the held-out items; then the report, so far."""
        for protocol in dict.fromkeys(p for mapping in self.state["protocols"].values() for p in mapping.values()):
            specs = [self.state["heldout"][task]["spec"] for task, mapping in self.state["protocols"].items()
                     if protocol in mapping.values()]
            self.evaluate_one(label, model, protocol, specs)
        write_json(self.state_path, self.state)
        self.write_report()

    def evaluate_one(self, label: str, model: Path, protocol: str, specs: list[str]):
        out = self.run_dir / "eval" / label / protocol
        signature = digest({"model": fingerprint_path(model), "specs": [Path(s).read_text() for s in specs],
                            "protocol": protocol, "args": self.config.eval.args})
        info = read_json(out / EVAL_STATE)
        record = {"model": str(model), "dir": str(out), "tasks": [Path(s).stem for s in specs]}
        if info and info.get("signature") == signature and (out / "results.json").is_file():
            self.state["evals"].setdefault(label, {})[protocol] = {**record, **info, "status": "skipped (done earlier)"}
            return
        if out.exists():
            shutil.rmtree(out)
        command = [sys.executable, "-m", "hippocrates.eval.run", "--model", str(model), "--tasks", ",".join(specs),
                   "--scoring", protocol, "--out", str(out), *map(str, self.config.eval.args)]
        wall = run_command(command, subprocess_env(os.cpu_count() or 1, self.data_dir), f"eval {label} {protocol}")
        if not (out / "results.json").is_file():
            raise PipelineError(f"eval {label} {protocol}: eval.run wrote no {out}/results.json")
        info = {"signature": signature, "wall_s": wall}
        write_json(out / EVAL_STATE, info)
        self.state["evals"].setdefault(label, {})[protocol] = {**record, **info, "status": "evaluated"}
        write_json(self.state_path, self.state)

    # -- dry run

    def dry_run(self, base) -> None:
        from hippocrates.engine.dryrun import read_config, report
        for stage in TRAIN_STAGES:
            if stage not in self.config.stages:
                continue
            config_file = self.stage_config(stage, base, None)  # every stage has the base model's architecture
            self.resolve(stage, config_file)  # the trainer's own check of every key
            print(f"\n=== {stage}: {config_file}", flush=True)
            try:
                print(report(read_config(config_file), self.config.nproc), flush=True)
            except ValueError as err:
                raise PipelineError(f"{stage}: {err}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hippocrates.train.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"pipeline YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--stages", help="comma-separated subset of cpt,sft,dpo,eval (default: the config's)")
    parser.add_argument("--dry-run", action="store_true", help="write the stage configs and run engine.dryrun on "
                        "each (meta device) instead of training")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        config = load_pipeline_config(args.config, args.overrides, args.stages)
        Pipeline(config).run(dry_run=args.dry_run)
    except ValueError as err:  # PipelineError and the parts' own ValueError subclasses: one line, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
