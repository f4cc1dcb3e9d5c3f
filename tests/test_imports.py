"""Every project module imports in a fresh interpreter, beside transformers, peft, lm-eval and Hugging Face's
`kernels`: from the repository root (where a root folder could shadow a package) and from another folder, in this
environment's install and in a non-editable install, whose files add one top-level name, `hippocrates`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("engine", "kernels", "models", "train", "eval")  # setup.py installs each as hippocrates.<folder>
NOT_INSTALLED = {"tests", "benchmarks", "hippocrates", "build"}

# run as `python -c`: the working dir comes first on sys.path, as for a user typing `python` there
IMPORT_ALL = """
import importlib, sys
from pathlib import Path
names, root = sys.argv[1].split(","), Path(sys.argv[2])
for name in names:
    module = importlib.import_module(name)
    where = Path(module.__file__ or next(iter(module.__path__))).resolve()
    assert where.is_relative_to(root), f"{name} was imported from {where}, not from {root}"
import kernels, lm_eval, peft, transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from peft import LoraConfig, PeftModel
assert hasattr(kernels, "get_kernel"), f"'import kernels' found {kernels.__path__}, not Hugging Face's package"
print(f"imported {len(names)} modules, then transformers {transformers.__version__}, peft, lm_eval, kernels")
"""


def project_modules() -> list[str]:
    """Every module of the package as an import name, from the source files (test modules left out)."""
    names = ["hippocrates"] + [f"hippocrates.{p.stem}" for p in sorted((REPO / "hippocrates").glob("*.py"))
                               if p.stem != "__init__"]
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name.startswith("test_") or path.name == "conftest.py":
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(("hippocrates", *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


def import_all(cwd: Path, root: Path, pythonpath: Path | None = None) -> subprocess.Popen:
    """A fresh interpreter in `cwd` importing every module (each must come from under `root`), then the others."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.Popen([sys.executable, "-c", IMPORT_ALL, ",".join(project_modules()), str(root)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_imported(process: subprocess.Popen):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0 and "imported" in out, f"the import check failed:\n{err[-3000:]}"


def test_folders_are_the_installed_ones():
    folders = {d.name for d in REPO.iterdir() if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.py"))}
    assert folders - NOT_INSTALLED == set(FOLDERS)
    names = project_modules()
    for expected in ("hippocrates.cli", "hippocrates.lmeval", "hippocrates.engine.data.sources",
                     "hippocrates.kernels.ops", "hippocrates.train.cpt", "hippocrates.eval.run"):
        assert expected in names


def test_every_module_imports_from_the_root_and_from_elsewhere(tmp_path):
    for process in [import_all(cwd, root=REPO) for cwd in (REPO, tmp_path)]:  # both at once
        check_imported(process)


def test_non_editable_install_adds_one_top_level_name(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site-packages"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "out",
                                                                 "runs", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(source)], check=True, capture_output=True, timeout=300)
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert installed == {"hippocrates"}
    assert (target / "bin" / "hippo").is_file()
    package = target / "hippocrates"
    assert not (package / "kernels" / "__init__.py").exists()
    for data in ("train/configs/cpt.yaml", "train/configs/pipeline.yaml"):
        assert (package / data).is_file(), data

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    importing = import_all(elsewhere, root=target, pythonpath=target)
    # meanwhile: the installed package finds its own stage defaults
    env = {**os.environ, "PYTHONPATH": str(target)}
    printed = subprocess.run([sys.executable, "-m", "hippocrates.cli", "sft", "--print-config"], cwd=elsewhere,
                             env=env, capture_output=True, text=True, timeout=600)
    check_imported(importing)
    assert printed.returncode == 0, printed.stderr[-2000:]
    defaults = yaml.safe_load((REPO / "train" / "configs" / "sft.yaml").read_text())
    config = yaml.safe_load(printed.stdout)
    assert config["seq_len"] == defaults["seq_len"] and config["data"]["path"] == defaults["data"]["path"]
