"""Bad checkpoints fail with one line naming the file and the key or tensor, never a deep traceback."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hippocrates.models import CheckpointError, ModelConfig, Transformer, load_model, save_pretrained

CONFIG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
TENSOR = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    model = Transformer(CONFIG).init_weights(seed=0)
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "good")


@pytest.fixture
def ckpt(good_dir, tmp_path):
    return shutil.copytree(good_dir, tmp_path / "ckpt")


def one_line_error(path, *names) -> str:
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    return message


def test_good_checkpoint_loads(good_dir):
    model = load_model(good_dir)
    assert model.config == CONFIG


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    one_line_error(ckpt, ckpt / "config.json")


def test_missing_directory(tmp_path):
    one_line_error(tmp_path / "nowhere", tmp_path / "nowhere")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama",')
    one_line_error(ckpt, ckpt / "config.json")


def test_config_missing_key(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    one_line_error(ckpt, ckpt / "config.json", "hidden_size")


def test_unknown_architecture(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(config))
    one_line_error(ckpt, ckpt / "config.json", "gpt2")


def test_truncated_safetensors(ckpt):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(ckpt, weights)


def test_garbage_safetensors_header(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    one_line_error(ckpt, weights)


def test_wrong_shape(ckpt):
    weights = ckpt / "model.safetensors"
    state = load_file(weights)
    state[TENSOR] = torch.zeros(state[TENSOR].shape[0] + 8, state[TENSOR].shape[1])
    save_file(state, weights)
    message = one_line_error(ckpt, weights, TENSOR)
    assert "(24, 32)" in message and "(16, 32)" in message


def test_missing_tensor(ckpt):
    weights = ckpt / "model.safetensors"
    state = load_file(weights)
    del state[TENSOR]
    save_file(state, weights)
    one_line_error(ckpt, ckpt, TENSOR)


def test_unexpected_tensor(ckpt):
    weights = ckpt / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, weights)
    one_line_error(ckpt, weights, "q_proj.bias")


def test_missing_shard(tmp_path):
    model = Transformer(CONFIG).init_weights(seed=1)
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=8_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / sorted(set(index["weight_map"].values()))[1]
    shard.unlink()
    one_line_error(out, shard)


def test_gguf_errors(tmp_path):
    import gguf
    missing = tmp_path / "absent.gguf"
    one_line_error(missing, missing)
    not_gguf = tmp_path / "noise.gguf"
    not_gguf.write_bytes(b"not a gguf file at all" * 10)
    one_line_error(not_gguf, not_gguf)
    other_arch = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other_arch), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(other_arch, other_arch, "gpt2")


def test_models_folder_imports_top_down():
    """No import circle among models/ modules, imports inside functions included: each uses only modules below it."""
    import ast
    import graphlib
    from pathlib import Path

    import hippocrates.models
    folder = Path(hippocrates.models.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        uses = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                uses |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hippocrates.models"):
                uses.add((node.module.split(".") + ["__init__"])[2])
        graph[path.stem] = uses & modules - {path.stem}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle
    assert order.index("gguf") < order.index("checkpoint") and order.index("gguf") < order.index("tokenizer")
