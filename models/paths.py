"""Where Hippocrates finds shared data and keeps its cache."""
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """`HIPPO_DATA_DIR`, else `../shared/data` beside the source checkout (or beside the working dir)."""
    env = os.environ.get("HIPPO_DATA_DIR")
    candidates = [Path(env)] if env else [PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    path = next((c for c in candidates if c.is_dir()), candidates[0])
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {path} does not exist: set HIPPO_DATA_DIR or pass --data-dir")
    return path


def cache_dir() -> Path:
    """`HIPPO_CACHE_DIR`, else `~/.cache/hippocrates`."""
    path = Path(os.environ.get("HIPPO_CACHE_DIR", Path.home() / ".cache" / "hippocrates"))
    path.mkdir(parents=True, exist_ok=True)
    return path
