"""Helpers for running the bundle loaders (edgekit/resources/loaders) the way a user would, on tiny bundles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def gguf_bundle(model_dir: Path, folder: Path) -> Path:
    """A folder laid out like a gguf bundle: model.gguf (f16), the tokenizer files, run_llamacpp.py. No packaging."""
    from edgekit.export.gguf import export_gguf
    from edgekit.runtimes import LOADERS as LOADERS_DIR

    folder.mkdir(parents=True, exist_ok=True)
    export_gguf(model_dir, folder / "model.gguf", "f16", name="tiny", license=None, teacher="tiny")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, folder / name)
    shutil.copy(LOADERS_DIR / "run_llamacpp.py", folder / "run_llamacpp.py")
    return folder


def run_loader(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a loader in its own process with ``import edgekit`` made impossible (it must need only the runtime)."""
    code = ("import runpy, sys; sys.modules['edgekit'] = None; "
            f"sys.argv = {[str(script), *args]!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=script.parent, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_EXTRA_BUFFERS": "1"})
