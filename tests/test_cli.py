"""The installed `hippo` command, the training stages' --help / --print-config, one config reader for a run, a dry
run and a pipeline stage, and `torchrun -m hippocrates.train.cpt` from outside the repository."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hippocrates.engine.config import ConfigError, TrainConfig, load_config
from hippocrates.tests.train_helpers import cpt_args, make_tiny_model

REPO = Path(__file__).resolve().parent.parent
HIPPO = Path(sys.executable).parent / "hippo"  # the console script `pip install` put beside this interpreter
KEY_LINE = re.compile(r"^  (\S+)  +(\S+(?: \S+)*)  +(.+?)(?:  +# .*)?$")  # key, type, default[, # comment]


def hippo(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(HIPPO), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def leaves(obj, prefix: str = "") -> dict:
    """{dotted key: (declared type, value)} of a config dataclass."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (f.type, value)
    return out


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_hippo_lists_its_commands_and_refuses_an_unknown_one(tmp_path):
    shown = hippo("--help", cwd=tmp_path)
    assert shown.returncode == 0
    for name in ("cpt", "sft", "dpo", "pipeline", "eval", "compare", "fetch", "generate", "dryrun", "lmeval"):
        assert re.search(rf"^  {name} ", shown.stdout, re.M), name
    wrong = hippo("trian", cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "'trian'" in wrong.stderr
    dryrun = hippo("dryrun", "--help", cwd=tmp_path)
    assert dryrun.returncode == 0 and "--gpus" in dryrun.stdout


def test_stage_help_lists_every_key_with_its_type_and_the_stage_default(tmp_path):
    shown = hippo("cpt", "--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    listed = {m.group(1): (m.group(2), m.group(3)) for m in map(KEY_LINE.match, shown.stdout.splitlines()) if m}
    expected = leaves(TrainConfig())
    for key, value in flat(yaml.safe_load((REPO / "train" / "configs" / "cpt.yaml").read_text())).items():
        expected[key] = (expected[key][0], value)  # the stage's YAML is the default a user gets
    assert set(expected) <= set(listed), set(expected) - set(listed)
    for key, (kind, default) in expected.items():
        assert listed[key][0] == kind, key
        assert yaml.safe_load(listed[key][1]) == default, key
    assert yaml.safe_load(listed["seq_len"][1]) == 256 and listed["lora.rank"][0] == "int"


def test_print_config_resolves_file_then_command_line(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("max_steps: 7\nlora: {rank: 4, alpha: 8}\n")
    shown = hippo("cpt", "--config", str(recipe), "--print-config", "lora.rank=8", "lr=2e-4", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert config["lora"] == {**config["lora"], "rank": 8, "alpha": 8.0}
    assert config["max_steps"] == 7 and config["optim"]["lr"] == 2e-4 and config["seq_len"] == 256
    assert config == json.loads(json.dumps(load_config("cpt", recipe, ["lora.rank=8", "lr=2e-4"]).to_dict()))


def test_unknown_key_is_one_line_naming_it_and_its_file(tmp_path):
    typo = hippo("cpt", "--print-config", "lora.rnak=8", cwd=tmp_path)
    assert typo.returncode == 1 and typo.stdout == ""
    assert typo.stderr.strip() == "error: command line: unknown key 'lora.rnak'"
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-4\n  warmup: 3\n")
    in_file = hippo("sft", "--config", str(recipe), "--print-config", cwd=tmp_path)
    assert in_file.returncode == 1 and len(in_file.stderr.strip().splitlines()) == 1
    assert f"{recipe}: unknown key 'optim.warmup'" in in_file.stderr


def test_a_key_means_the_same_in_a_run_a_dry_run_and_a_pipeline_stage(tmp_path, capsys):
    from hippocrates.engine.dryrun import DryRunError, read_config
    from hippocrates.engine.dryrun import main as dryrun
    from hippocrates.train.pipeline import Pipeline, PipelineError, load_pipeline_config

    recipe = tmp_path / "sft_recipe.yaml"  # no stage key: the dry run takes it from the file name
    recipe.write_text("model: smollm2-135m\nseq_len: 128\nlora: {rank: 4}\n")
    run = load_config("sft", recipe, ["lr=2e-4", "lora.rank=2"])
    planned = read_config(recipe, ["lr=2e-4", "lora.rank=2"])
    assert planned["stage"] == "sft" and planned["optim.lr"] == run.optim.lr == 2e-4
    assert {k: v for k, v in planned.items() if k != "_source"} == flat(run.to_dict())
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(f"run_dir: {tmp_path / 'p'}\nstages: [sft]\nsft:\n  config: {recipe}\n  lr: 2.0e-4\n")
    pipeline = load_pipeline_config(str(pipeline_file), ["sft.lora.rank=2"])
    staged = Pipeline(pipeline).stage_config("sft", "smollm2-135m", ["x.jsonl"])
    resolved = load_config("sft", staged)
    assert resolved.optim.lr == 2e-4 and resolved.lora.rank == 2 and resolved.seq_len == 128
    assert resolved.data.path == ["x.jsonl"] and resolved.checkpoint.resume is True

    for reader in (lambda: load_config("sft", recipe, ["lora.rnak=2"]), lambda: read_config(recipe, ["lora.rnak=2"]),
                   lambda: load_pipeline_config(None, ["sft.lora.rnak=2"])):
        with pytest.raises((ConfigError, DryRunError, PipelineError), match="unknown key 'lora.rnak'"):
            reader()
    recipe.write_text("model: smollm2-135m\nlora: {rnak: 4}\n")
    assert dryrun(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {recipe}: unknown key 'lora.rnak'"


def test_torchrun_runs_the_module_from_another_folder(tmp_path, data_dir):
    """`torchrun -m hippocrates.train.cpt` with 2 ranks, launched outside the repository: one real optimizer step."""
    model = make_tiny_model(tmp_path / "model", data_dir)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", HIPPO_KERNELS="torch")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--monitor_interval=0.2", "-m", "hippocrates.train.cpt",
               *cpt_args(model, out, max_steps=1, grad_accum=1, **{"checkpoint.save_every": 0})]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] > 0
    assert (out / "final" / "config.json").is_file()
