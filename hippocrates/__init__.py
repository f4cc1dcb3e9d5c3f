"""Hippocrates: an open training engine for medical language models.

Every folder of the repository imports under this one name: `hippocrates.kernels`, `hippocrates.models`,
`hippocrates.engine`, `hippocrates.train`, `hippocrates.eval`. An installed wheel holds them as sub-folders of this
package. In a source checkout (an editable install, or `python -m hippocrates...` from the repository root) they sit
beside this folder, so the package's search path also covers the repository root. The root folders are never
top-level packages of their own, and `kernels/` has no `__init__.py`, so a bare `import kernels` always finds
Hugging Face's package, which transformers needs.
"""
from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "models").is_dir() and (_here.parent / "models" / "transformer.py").is_file():
    __path__ = [str(_here), str(_here.parent)]

__version__ = "0.2.0"
