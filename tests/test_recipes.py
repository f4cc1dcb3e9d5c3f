"""Every shipped recipe's data, sized: tokens and rows per stage, and passes = steps x global batch / rows.

How the data is counted (no network, a few seconds):
- a local file (../shared/data or a pipeline's SFT mixture) is read in full for its record count; a seeded sample
  of SAMPLE records goes through the trainer's own row builder (engine.data.build_dataset, uncached: template, tokenizer,
  packing, the seq_len filter) with the recipe's tokenizer, and its tokens and rows are scaled by the count;
- a hub dataset is sized from train/configs/hub_datasets.yaml (the dataset card's rows and words); its words
  become tokens at the words-per-token ratio measured here, with the same tokenizer, on the MedQuAD answers.
The world size is the recipe's own launch line (`--nproc_per_node=N`, `--nnodes=M` in its header) or, for a
pipeline, its `nproc` key.

Every recipe stays within MAX_PASSES over its data; the paper-scale ones (7B, 70B, pipeline_hippo_*) also make
at least MIN_PASSES, so none trains on a sliver of its data. `python -m hippocrates.tests.test_recipes` prints
the table.
"""
import functools
import json
import math
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from hippocrates.engine.config import load_config, read_yaml
from hippocrates.engine.data import as_list, build_dataset
from hippocrates.engine.data.sources import BadRecords, parse_source, read_source

CONFIG_DIR = Path(__file__).resolve().parent.parent / "train" / "configs"
HUB_SIZES = CONFIG_DIR / "hub_datasets.yaml"
RECIPES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p != HUB_SIZES)
PAPER_SCALE = re.compile(r"(_7b|_70b|^pipeline_hippo_\w+)\.yaml$")
MAX_PASSES, MIN_PASSES = 3.0, 1.0
SAMPLE = 200
TOKENIZERS = {"llama2": "tokenizers/llama2_tokenizer.model", "mistral": "tokenizers/mistral_7b_v0.1_tokenizer.model"}


def tokenizer_for(model: str, data_dir: Path, smollm2_dir):
    for family, file in TOKENIZERS.items():
        if model.startswith(family):
            return shared_tokenizer(data_dir / file)
    if model == "smollm2":
        return shared_tokenizer(smollm2_dir() if callable(smollm2_dir) else smollm2_dir)
    raise AssertionError(f"no tokenizer known for model={model!r}")


@functools.lru_cache
def shared_tokenizer(path: Path):
    from hippocrates.models import load_tokenizer
    return load_tokenizer(path)


def launch_world_size(path: Path) -> int:
    """Ranks of the torchrun line in the recipe's header comment (one process when it has none)."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    per_node = re.search(r"--nproc_per_node[= ](\d+)", header)
    nodes = re.search(r"--nnodes[= ](\d+)", header)
    return (int(per_node.group(1)) if per_node else 1) * (int(nodes.group(1)) if nodes else 1)


def recipe_stages(name: str, run_dir: Path) -> list[tuple[str, object, int]]:
    """(stage, resolved TrainConfig, world size) of every training stage a recipe runs."""
    path = CONFIG_DIR / name
    if not name.startswith("pipeline"):
        stage = read_yaml(path).get("stage") or next(s for s in ("cpt", "sft", "dpo") if s in name)
        return [(stage, load_config(stage, str(path)), launch_world_size(path))]
    from hippocrates.train.pipeline import Pipeline, load_pipeline_config
    config = load_pipeline_config(str(path), [f"run_dir={run_dir}"])
    pipeline = Pipeline(config)
    stages = []
    for stage in [s for s in ("cpt", "sft", "dpo") if s in config.stages]:
        data_paths = pipeline.write_sft_data() if stage == "sft" else None
        resolved = pipeline.resolve(stage, pipeline.stage_config(stage, config.model, data_paths))
        stages.append((stage, resolved, config.nproc))
    return stages


@functools.lru_cache
def words_per_token(tokenizer, data_dir: Path) -> float:
    texts = [json.loads(line)["answer"] for line in open(data_dir / "corpus" / "medquad_qa.jsonl")]
    texts = random.Random(0).sample(texts, SAMPLE)
    tokens = sum(len(tokenizer.encode(t, bos=False)) for t in texts)
    return sum(len(t.split()) for t in texts) / tokens


def records_used(counts: list[int], limit, held_out: int) -> list[int]:
    """Records the trainer takes from each source: the stream minus `held_out` at its end, then its first `limit`."""
    left = max(sum(counts) - held_out, 0)
    if limit is not None:
        left = min(left, limit)
    used = []
    for count in counts:
        used.append(min(count, left))
        left -= used[-1]
    return used


def data_size(stage: str, cfg, tokenizer, data_dir: Path, scratch: Path) -> dict:
    """Estimated tokens and training rows of a stage's data (see the module docstring)."""
    hub = yaml.safe_load(HUB_SIZES.read_text())
    sources = [parse_source(spec, data_dir) for spec in as_list(cfg.data.path)]
    records = [[] if s.hub_name else [r for _, r in read_source(s, cfg.data.split, cfg.data.text_unit,
                                                                 BadRecords(skip=True))] for s in sources]
    used = records_used([len(r) for r in records], cfg.data.limit, cfg.data.held_out)
    tokens = rows = 0.0
    for i, (source, these, n) in enumerate(zip(sources, records, used)):
        if source.hub_name:
            assert stage == "cpt" and source.hub_name in hub, f"{source.spec}: no size in {HUB_SIZES.name}"
            tokens += hub[source.hub_name]["words"] / words_per_token(tokenizer, data_dir)
            continue
        sample = random.Random(i).sample(these[:n], min(SAMPLE, n))
        sample_file = scratch / f"sample_{i}.jsonl"
        sample_file.write_text("".join(json.dumps(r) + "\n" for r in sample))
        mapping = ",".join(f"{role}={key}" for role, key in source.fields.items())
        spec = f"{sample_file}:{mapping}" if mapping else str(sample_file)
        sample_cfg = replace(cfg.data, path=spec, limit=None, held_out=0, cache=False, skip_bad_records=True)
        built = build_dataset(stage, sample_cfg, tokenizer, cfg.seq_len)
        tokens += built.num_tokens * n / len(sample)
        rows += len(built) * n / len(sample)
    if stage == "cpt":  # one stream cut into rows of seq_len
        rows = math.ceil(tokens / cfg.seq_len)
    return {"tokens": tokens, "rows": rows}


def size_recipe(name: str, data_dir: Path, smollm2_dir, scratch: Path) -> list[dict]:
    table = []
    for stage, cfg, world_size in recipe_stages(name, scratch / "run"):
        tokenizer = tokenizer_for(cfg.model, data_dir, smollm2_dir)
        size = data_size(stage, cfg, tokenizer, data_dir, scratch)
        global_batch = cfg.global_batch(world_size)
        table.append({"recipe": name, "stage": stage, "world_size": world_size, "global_batch": global_batch,
                      "seq_len": cfg.seq_len, "steps": cfg.max_steps, **size,
                      "passes": cfg.max_steps * global_batch / size["rows"]})
    return table


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_makes_a_sane_number_of_passes(name, data_dir, smollm2_dir, tmp_path):
    for row in size_recipe(name, data_dir, smollm2_dir, tmp_path):
        where = f"{name} ({row['stage']}): {row['steps']} steps x {row['global_batch']} rows over {row['rows']:.0f}"
        assert row["passes"] <= MAX_PASSES, f"{where} rows = {row['passes']:.2f} passes > {MAX_PASSES}"
        if PAPER_SCALE.search(name):
            assert row["passes"] >= MIN_PASSES, f"{where} rows = {row['passes']:.2f} passes < {MIN_PASSES}"


def test_paper_scale_recipes_use_lora_everywhere(tmp_path):
    for name in filter(PAPER_SCALE.search, RECIPES):
        for stage, cfg, _ in recipe_stages(name, tmp_path / name):
            assert cfg.lora.rank > 0, f"{name} ({stage}): the paper trains every stage with LoRA"


def test_records_used_follows_limit_and_held_out():
    assert records_used([10, 5], None, 0) == [10, 5]
    assert records_used([10, 5], None, 3) == [10, 2]
    assert records_used([10, 5], 12, 0) == [10, 2]
    assert records_used([10, 5], 4, 3) == [4, 0]


def main():
    import tempfile

    from hippocrates.models.fetch import fetch_smollm2
    from hippocrates.models.paths import data_dir
    print("| recipe | stage | ranks | global batch (rows x seq_len) | data tokens | rows | steps | passes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in RECIPES:
        with tempfile.TemporaryDirectory() as scratch:
            for r in size_recipe(name, data_dir(), fetch_smollm2, Path(scratch)):
                print(f"| {r['recipe']} | {r['stage']} | {r['world_size']} | {r['global_batch']} x {r['seq_len']} | "
                      f"{r['tokens'] / 1e6:.2f}M | {r['rows']:,.0f} | {r['steps']:,} | {r['passes']:.2f} |")


if __name__ == "__main__":
    main()
