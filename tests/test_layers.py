"""The shape of the package, checked: layers import only downward, stages meet only through artifacts,
no import cycles, imports inside functions only for heavy third-party libraries, and the bottom two
layers import without torch.

Every module under ``edgekit/`` is parsed with ``ast`` (nothing is imported except in the torch check),
counting imports inside functions too. A failure names ``file:line``, the import and the rule it breaks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- the map

# Layer of each module: the entry naming the module, or else the nearest package above it
# ("runtimes" covers runtimes/llamacpp.py; "quantize.schemes" is more specific than "quantize").
# A module may import modules of its own layer or lower ones, never higher ones.
LAYERS: dict[int, list[str]] = {
    # foundations: no edgekit imports above this line
    0: ["errors", "units", "arch", "progress", "artifact", "integrity"],
    # what is pluggable and pure data; importing these never loads torch.
    # chat: chat-template rendering; ollama: a chat template as an Ollama TEMPLATE; sources: reading user data
    # files; quantize.schemes: what each
    # quant scheme does per format (pure data the registry serves, beside formats/)
    1: ["registry", "formats", "runtimes", "metrics", "hf", "chat", "ollama", "sources", "quantize.schemes"],
    # resolving models, describing devices, planning, quantization algorithms
    2: ["models", "devices", "plan", "quantize"],
    # the stages (see STAGES)
    3: ["distill", "export", "fidelity", "bench", "package", "quantize.report"],
    # composition
    4: ["recipe", "validate", "doctor", "run"],
    # the only place that prints, parses argv or exits
    5: ["cli"],
}

# Stages never import each other: they meet through artifact folders. Module prefix -> stage.
STAGES = {
    "distill": "distill",
    "export": "export",
    "fidelity": "fidelity",
    "quantize.report": "fidelity",  # the fidelity stage, until it lives in fidelity.py
    "bench": "bench",
    "package": "package",
}

# The only libraries a function may import (module top otherwise): heavy to import, so a module
# pays for them only when the function runs. An edgekit module whose import loads one of them (see
# heavy_modules) may be imported inside a function for the same reason.
HEAVY = {
    "torch", "transformers", "tokenizers", "accelerate", "safetensors", "optimum", "huggingface_hub",
    "onnx", "onnx_ir", "onnxruntime", "onnxruntime_genai", "llama_cpp", "gguf", "executorch", "torchao",
    "datasets", "numpy",
    "jinja2",  # chat templates: only ever rendered once transformers has loaded a tokenizer
    "tqdm",  # tqdm.auto pulls in asyncio: ~30 ms, a tenth of `edgekit --help`; only long work draws a bar
}
# Standard modules that exist on some platforms only (a function importing them runs only there).
PLATFORM_ONLY = {"fcntl", "resource", "msvcrt", "winreg"}

# Importing any module of these layers in a fresh interpreter must not load these.
LIGHT_LAYERS = (0, 1)
NOT_LOADED_BY_LIGHT_LAYERS = ("torch",)

# Bundled standalone scripts (copied into app bundles, run without edgekit installed): they import
# nothing from edgekit and are exempt from the other rules.
STANDALONE = ["resources"]

# Known breaches: none. Each entry would be "rule  file -> imported module"; the test fails on any breach not
# listed here AND on any listed entry that no longer occurs. Keep both empty: fix a breach instead of listing it.
# `python tests/test_layers.py` prints the breaches found now, in this form.
KNOWN_VIOLATIONS: set[str] = set()

# Known import cycles (sorted module names, relative to edgekit), asserted exactly like the list above.
KNOWN_CYCLES: list[list[str]] = []

# --------------------------------------------------------------------------- reading the package

PACKAGE = Path(__file__).resolve().parents[1] / "edgekit"
ROOT = PACKAGE.parent


@dataclass(frozen=True)
class Import:
    source: str  # dotted module name relative to edgekit ("" for edgekit/__init__.py)
    target: str  # the module it imports (an edgekit module, relative; or a third-party/stdlib top name)
    internal: bool
    in_function: bool
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return name == "" or MODULES.get(name, Path()).name == "__init__.py"


def dotted(name: str) -> str:
    """A module name relative to edgekit, written out: "" -> "edgekit", "distill.data" -> "edgekit.distill.data"."""
    return f"edgekit.{name}" if name else "edgekit"


def _resolve(name: str) -> str:
    """The edgekit module that an import of dotted ``name`` (relative to edgekit) executes last."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path) -> list[Import]:
    return _parse_imports(name, path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


def _parse_imports(name: str, source: str, file: str) -> list[Import]:
    """Every import in the module ``name`` (relative to edgekit) whose text is ``source``."""
    tree = ast.parse(source, filename=file)
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []

    def add(module: str, node: ast.AST, in_function: bool) -> None:
        if module == "edgekit" or module.startswith("edgekit."):
            found.append(Import(name, _resolve(module[len("edgekit."):] if "." in module else ""), True,
                                in_function, file, node.lineno))
        else:
            found.append(Import(name, module.split(".")[0], False, in_function, file, node.lineno))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, in_function)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: "from .x import y", "from .. import y"
                    parts = ["edgekit", *package.split(".")] if package else ["edgekit"]
                    base = ".".join(parts[:len(parts) - (child.level - 1)])
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                internal = module == "edgekit" or module.startswith("edgekit.")
                targets = []  # "from edgekit.distill import data" imports the module distill.data
                for alias in child.names:
                    sub = f"{module}.{alias.name}"
                    target = sub if internal and sub[len("edgekit."):] in MODULES else module
                    if target not in targets:
                        targets.append(target)
                for target in targets:
                    add(target, child, in_function)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def _all_imports() -> list[Import]:
    return [i for name, path in MODULES.items() for i in _imports(name, path)]


def _longest(name: str, prefixes) -> str | None:
    best = None
    for prefix in prefixes:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def layer_of(name: str) -> int | None:
    if name == "":
        return 0  # edgekit/__init__.py
    entries = {m: layer for layer, ms in LAYERS.items() for m in ms}
    match = _longest(name, entries)
    return None if match is None else entries[match]


def stage_of(name: str) -> str | None:
    match = _longest(name, STAGES)
    return None if match is None else STAGES[match]


def _standalone(name: str) -> bool:
    return _longest(name, STANDALONE) is not None


# --------------------------------------------------------------------------- the rules


def heavy_modules(imports: list[Import]) -> set[str]:
    """The edgekit modules whose import loads a HEAVY library: they import one at their top, or import (at their
    top) another edgekit module that does. Importing such a module inside a function defers that library, so it
    counts as a heavy import."""
    heavy = {i.source for i in imports if not i.internal and not i.in_function and i.target in HEAVY}
    top = [(i.source, i.target) for i in imports if i.internal and not i.in_function]
    grew = True
    while grew:
        grew = False
        for src, dst in top:
            if dst in heavy and src not in heavy:
                heavy.add(src)
                grew = True
    return heavy


def _violations(imports: list[Import] | None = None) -> dict[str, list[str]]:
    """Each breach as its KNOWN_VIOLATIONS key -> the places it occurs (file:line: explanation)."""
    out: dict[str, list[str]] = {}
    imports = _all_imports() if imports is None else imports
    heavy = heavy_modules(imports)

    def breach(rule: str, imp: Import, why: str) -> None:
        key = f"{rule}  {imp.file} -> {dotted(imp.target) if imp.internal else imp.target}"
        out.setdefault(key, []).append(f"{imp.where}: {why}")

    for imp in imports:
        if _standalone(imp.source):
            if imp.internal:
                breach("standalone", imp, "a bundled standalone script must not import edgekit")
            continue
        if imp.internal:
            src, dst = layer_of(imp.source), layer_of(imp.target)
            if src is not None and dst is not None and dst > src:
                breach("layer", imp, f"L{src} module {dotted(imp.source)} imports L{dst} module "
                                     f"{dotted(imp.target)}; a module imports only its own layer or lower ones")
            s_src, s_dst = stage_of(imp.source), stage_of(imp.target)
            if s_src and s_dst and s_src != s_dst:
                breach("stage", imp, f"stage {s_src} imports stage {s_dst} ({dotted(imp.target)}); stages meet "
                                     "only through artifact folders: move the shared helper to a lower layer")
            if imp.in_function and imp.target not in heavy:
                breach("function-import", imp, f"{dotted(imp.target)} is imported inside a function; internal "
                                               "imports go at the module top (a cycle means a helper lives in "
                                               "the wrong module)")
        elif imp.in_function and imp.target not in HEAVY | PLATFORM_ONLY:
            breach("function-import", imp, f"{imp.target} is imported inside a function; only heavy third-party "
                                           "libraries (HEAVY) may be, everything else goes at the module top")
    return out


def _cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups of more than one module (or a module importing itself), Tarjan's algorithm."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in imports:
        if imp.internal and imp.target in graph and not _standalone(imp.source):
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


# --------------------------------------------------------------------------- the tests


def test_every_module_has_a_layer():
    unmapped = [f"{p.relative_to(ROOT).as_posix()}: {dotted(m)} is in no layer; add it (or its package) to "
                "LAYERS in tests/test_layers.py" for m, p in MODULES.items()
                if m and not _standalone(m) and layer_of(m) is None]
    assert not unmapped, "\n".join(unmapped)


def test_imports_follow_the_layers_and_stages_stay_apart():
    found = _violations()
    new = sorted(set(found) - KNOWN_VIOLATIONS)
    fixed = sorted(KNOWN_VIOLATIONS - set(found))
    lines = [f"{place}  [{key.split()[0]}]" for key in new for place in found[key]]
    lines += [f"fixed, delete it from KNOWN_VIOLATIONS: {key!r}" for key in fixed]
    assert not lines, "\n" + "\n".join(lines)


def test_no_import_cycles_counting_imports_inside_functions():
    imports = _all_imports()
    found = _cycles(imports)
    problems = []
    for group in (g for g in found if g not in KNOWN_CYCLES):
        members = set(group)
        edges = [f"  {i.where}: {dotted(i.source)} imports {dotted(i.target)}" for i in imports
                 if i.internal and i.source in members and i.target in members]
        problems.append(f"import cycle among {', '.join(dotted(m) for m in group)}:\n" + "\n".join(edges))
    problems += [f"cycle fixed, delete it from KNOWN_CYCLES: {g}" for g in KNOWN_CYCLES if g not in found]
    assert not problems, "\n" + "\n".join(problems)


LIGHT_MODULES = sorted(m for m in MODULES if m and not _standalone(m) and layer_of(m) in LIGHT_LAYERS)


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_bottom_layers_import_without_torch(module):
    code = ("import sys, edgekit.%s\n"
            "print(' '.join(m for m in %r if m in sys.modules))" % (module, NOT_LOADED_BY_LIGHT_LAYERS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = out.stdout.split()
    assert not loaded, (f"{MODULES[module].relative_to(ROOT).as_posix()}: importing {dotted(module)} (layer "
                        f"L{layer_of(module)}) loads {', '.join(loaded)}; import it inside the function that "
                        "needs it, or move the code to a higher layer")


# --------------------------------------------------------------------------- the checker checks itself


def test_the_checker_resolves_submodules_and_relative_imports_and_sees_imports_in_functions():
    source = ("import numpy as np\nfrom edgekit import artifact\nfrom edgekit.distill import data, train as t\n"
              "from . import losses\nfrom ..quantize.schemes import get_scheme\n"
              "class C:\n    import json\n"
              "def f():\n    import torch\n    from edgekit.models import read_json\n")
    found = {(i.target, i.internal, i.in_function) for i in _parse_imports("distill.x", source, "edgekit/distill/x.py")}
    assert found == {("numpy", False, False), ("artifact", True, False), ("distill.data", True, False),
                     ("distill.train", True, False), ("distill.losses", True, False),
                     ("quantize.schemes", True, False), ("json", False, False), ("torch", False, True),
                     ("models", True, True)}


def test_the_map_places_modules_by_their_nearest_entry():
    assert layer_of("quantize.schemes") == 1 and layer_of("quantize.awq") == 2 and layer_of("runtimes.x") == 1
    assert layer_of("cli.main") == 5 and layer_of("") == 0
    assert stage_of("quantize.report") == "fidelity" and stage_of("bench.worker") == "bench"
    assert stage_of("plan") is None and stage_of("cli.bench") is None


def test_deferring_a_module_that_loads_torch_is_a_heavy_import_and_deferring_a_light_one_is_not():
    imports = [Import("distill.train", "torch", False, False, "t.py", 1),
               Import("distill.pipeline", "distill.train", True, False, "p.py", 1),  # loads torch through train
               Import("cli.distill", "distill.pipeline", True, True, "c.py", 5),  # deferred: allowed
               Import("cli.distill", "units", True, True, "c.py", 6)]  # a light module deferred: a breach
    assert heavy_modules(imports) == {"distill.train", "distill.pipeline"}
    assert list(_violations(imports)) == ["function-import  c.py -> edgekit.units"]


def test_the_cycle_finder_finds_a_two_module_cycle():
    a = Import("distill.cache", "distill.train", True, False, "a.py", 1)
    b = Import("distill.train", "distill.cache", True, True, "b.py", 2)
    assert _cycles([a, b]) == [["distill.cache", "distill.train"]]


if __name__ == "__main__":  # the breaches found now, as KNOWN_VIOLATIONS / KNOWN_CYCLES entries
    for key, places in sorted(_violations().items()):
        print(f'    "{key}",  # {places[0].split(": ")[0]}')
    for group in _cycles(_all_imports()):
        print(f"    {group},")
