"""The runtime layer and the metrics module sit below the stages: importing them loads no heavy library."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import edgekit.runtimes

HEAVY = ("torch", "onnxruntime", "onnxruntime_genai", "llama_cpp", "executorch", "transformers")


def _loaded_after_import(modules: list[str]) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_every_runtime_module_and_metrics_loads_no_heavy_library():
    modules = ["edgekit.runtimes", "edgekit.metrics",
               *(f"edgekit.runtimes.{m.name}" for m in pkgutil.iter_modules(edgekit.runtimes.__path__))]
    assert len(modules) >= 7  # the package, metrics and the five built-in runtimes
    assert _loaded_after_import(modules) == []


def test_listing_the_registered_runtimes_loads_no_heavy_library():
    code = ["edgekit.registry", "edgekit.runtimes"]
    assert _loaded_after_import(code) == []
    probe = ("import json, sys\nfrom edgekit import registry\nrt = registry.items('runtime')\n"
             "[(r.available(), r.version()) for r in rt.values()]\n"
             f"print(json.dumps([sorted(rt), sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    names, loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                              check=True).stdout)
    assert {"llama.cpp", "onnxruntime", "onnxruntime-genai", "executorch", "pytorch"} <= set(names)
    assert loaded == []


def test_runtime_modules_import_only_the_layers_below():
    """edgekit.runtimes.* may import errors, units, arch, progress, artifact, integrity, registry and itself."""
    import ast
    from pathlib import Path

    allowed = {"edgekit", "edgekit.errors", "edgekit.units", "edgekit.arch", "edgekit.progress", "edgekit.artifact",
               "edgekit.integrity", "edgekit.registry", "edgekit.runtimes"}
    root = Path(edgekit.runtimes.__file__).parent
    files = [*root.glob("*.py"), root.parent / "metrics.py"]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgekit"):
                names = [node.module] if node.module != "edgekit" else [f"edgekit.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("edgekit")]
            else:
                continue
            bad += [f"{path.name}: {n}" for n in names if n not in allowed and not n.startswith("edgekit.runtimes.")]
    assert bad == []
