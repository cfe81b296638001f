"""A third-party plugin package adds a runtime and a format (scheme + exporter) without editing edgekit.

The package is built in a temporary folder with its own pyproject.toml and ``[project.entry-points.edgekit]``,
installed with pip into a private target folder, and edgekit runs in a subprocess with that folder on
PYTHONPATH: the registry finds the plugin through its entry point exactly as it finds the built-ins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "edgekit-toy-plugin"
version = "0.1.0"

[project.entry-points.edgekit]
toy = "edgekit_toy:register"

[tool.setuptools]
packages = ["edgekit_toy"]
"""

PLUGIN = '''\
"""A toy format ("toy": every weight as int8 in one file) and a toy runtime that runs it."""

import importlib.metadata
import json
from pathlib import Path

from edgekit.export.exporter import Exporter
from edgekit.quantize.schemes import Format, Scheme, Tensor
from edgekit.runtimes import Loader

TOY = Format("toy", ".toy", 2, "toy format: int8 weights in one file")


def _layout(a):
    rows = a.params // a.hidden_size
    return [Tensor("weights", a.hidden_size, rows, "int8", a.hidden_size * rows, "mlp")]


INT8 = Scheme("toy", "int8", "every weight int8", _layout, calibrate=False, options={"bits": 8})


def export_toy(cfg, model, folder, texts):
    bits = INT8.options["bits"]
    size = model.arch.params * bits // 8
    (folder / "model.toy").write_bytes(b"TOY" + bytes(size))
    (folder / "toy.json").write_text(json.dumps({"quant": cfg.quant, "params": model.arch.params}))
    return {"model_file": "model.toy", "size_bytes": size + 3, "bits_per_weight": float(bits)}


class ToyRuntime:
    name = "toyrt"
    formats = ("toy",)
    module = "json"
    package = "edgekit-toy-plugin"
    gpu_variant = False
    description = "runs .toy files"
    min_version = "0.1"
    # what an app bundle ships to run a .toy file: the plugin's own example script, and toy.json beside the model
    loader = Loader(Path(__file__).resolve().parent / "run_toy.py", files=("toy.json",),
                    note="`{loader}` reads model.toy and toy.json ({context} positions).")

    def available(self):
        return None

    def gpu_available(self):
        return "not available on this host: toyrt runs on the CPU only"

    def version(self):
        return importlib.metadata.version(self.package)


def register(reg):
    reg.add("format", "toy", TOY)
    reg.add("scheme", "toy/int8", INT8)
    reg.add("exporter", "toy", Exporter("toy", export_toy, version=1, default_quant="int8"))
    reg.add("runtime", "toyrt", ToyRuntime())
'''


LOADER = '''\
"""Run a toy bundle: python run_toy.py PROMPT (needs only the toy runtime)."""
import json
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
print(json.loads((here / "toy.json").read_text())["quant"], (here / "model.toy").stat().st_size, sys.argv[1:])
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The plugin built and installed into a private folder; the environment that puts it on sys.path."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "edgekit_toy").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "edgekit_toy" / "__init__.py").write_text(PLUGIN)
    (src / "edgekit_toy" / "run_toy.py").write_text(LOADER)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True, text=True)
    path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, EDGEKIT_HOME=str(root / "home"))
    return env


def _edgekit(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit.cli", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT)


def test_the_plugin_is_registered_beside_the_builtins(plugin_env):
    code = textwrap.dedent("""
        import json
        from edgekit import registry
        print(json.dumps({k: registry.names(k) for k in registry.KINDS}))
        print(registry.REGISTRY.origin("runtime", "toyrt"))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=plugin_env, capture_output=True, text=True, check=True)
    names, origin = out.stdout.splitlines()
    names = json.loads(names)
    assert "toy" in names["format"] and "toy" in names["exporter"] and "toy/int8" in names["scheme"]
    assert {"toyrt", "llama.cpp", "onnxruntime"} <= set(names["runtime"])
    assert {"gguf", "onnx", "executorch"} <= set(names["format"])
    assert origin == "edgekit_toy:register"


def test_without_the_plugin_its_names_are_unknown():
    code = ("from edgekit import registry; "
            "print('toy' in registry.names('format'), 'toyrt' in registry.names('runtime'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_doctor_lists_the_plugin_runtime_and_format(plugin_env):
    code = textwrap.dedent("""
        import json
        from edgekit import doctor
        print(json.dumps([doctor.check_plugins().to_dict(), [c.to_dict() for c in doctor.check_runtimes()]]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=plugin_env, capture_output=True, text=True, check=True)
    plugins, runtimes = json.loads(out.stdout)
    assert plugins["status"] == "ok" and "toy" in plugins["detail"] and "edgekit_toy:register" in plugins["detail"]
    toy = [c for c in runtimes if c["name"] == "runtime toyrt"]
    assert toy and toy[0]["status"] == "ok" and "0.1.0" in toy[0]["detail"]


def test_export_makes_a_plugin_format_artifact(plugin_env, tiny_bpe_llama_dir):
    r = _edgekit(plugin_env, "export", str(tiny_bpe_llama_dir), "--format", "toy", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["format"], out["quant"], out["model_file"]) == ("toy", "int8", "model.toy")
    folder = Path(out["path"])
    assert (folder / "model.toy").read_bytes().startswith(b"TOY")
    assert json.loads((folder / "manifest.json").read_text())["stage"] == "export"
    # an unknown quant of the plugin's format names the plugin's schemes
    r = _edgekit(plugin_env, "export", str(tiny_bpe_llama_dir), "--format", "toy", "--quant", "q4_k_m")
    assert r.returncode != 0 and "choose one of int8" in r.stderr


def test_plan_sizes_a_student_for_the_plugin_runtime(plugin_env, tiny_bpe_llama_dir, tmp_path):
    raw = yaml.safe_load((ROOT / "devices" / "pi-5-8gb.yaml").read_text())
    raw.update(name="toy-board", runtimes=["toyrt"])
    device = tmp_path / "toy-board.yaml"
    device.write_text(yaml.safe_dump(raw))
    r = _edgekit(plugin_env, "plan", "--teacher", str(tiny_bpe_llama_dir), "--device", str(device),
                 "--format", "toy", "--quant", "int8", "--context", "256", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["runtime"] == "toyrt" and row["format"] == "toy"


def test_a_device_listing_the_plugin_runtime_is_refused_without_it(tmp_path):
    from edgekit.devices import load_profile_file
    from edgekit.errors import DeviceError

    raw = yaml.safe_load((ROOT / "devices" / "pi-5-8gb.yaml").read_text())
    raw.update(name="toy-board", runtimes=["toyrt"])
    device = tmp_path / "toy-board.yaml"
    device.write_text(yaml.safe_dump(raw))
    with pytest.raises(DeviceError, match="unknown runtime 'toyrt'"):
        load_profile_file(device)


@pytest.fixture(scope="module")
def toy_export(plugin_env, tiny_bpe_llama_dir) -> Path:
    r = _edgekit(plugin_env, "export", str(tiny_bpe_llama_dir), "--format", "toy", "--json")
    assert r.returncode == 0, r.stderr
    return Path(json.loads(r.stdout)["path"])


def test_package_bundles_the_plugin_format_with_its_runtimes_loader(plugin_env, toy_export):
    r = _edgekit(plugin_env, "package", str(toy_export), "--context", "256", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    folder, m = Path(out["path"]), out["manifest"]
    assert (m["format"], m["quant"], m["loader"], m["memory"]["runtime"]) == ("toy", "int8", "run_toy.py", "toyrt")
    assert m["runtimes"] == [{"name": "toyrt", "package": "edgekit-toy-plugin", "min_version": "0.1",
                              "loader": "run_toy.py"}]
    names = {p.name for p in folder.iterdir()}
    assert {"model.toy", "toy.json", "run_toy.py", "tokenizer.json", "generation.json", "README.md",
            "manifest.json"} <= names
    assert set(m["files"]) == names - {"manifest.json"}
    card = (folder / "README.md").read_text()
    assert 'pip install "edgekit-toy-plugin>=0.1"' in card and "`run_toy.py` reads model.toy and toy.json (256" in card
    assert _edgekit(plugin_env, "verify", out["tarball"]).returncode == 0
    run = subprocess.run([sys.executable, str(folder / "run_toy.py"), "hi"], capture_output=True, text=True,
                         cwd=folder.parent, check=True)
    assert run.stdout.split()[0] == "int8"


def test_package_refuses_a_plugin_runtime_without_a_loader_naming_what_it_must_provide(plugin_env, toy_export,
                                                                                      tmp_path):
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from edgekit import runtimes
        from edgekit.errors import ConfigError
        from edgekit.package import package

        runtimes.get_runtime("toyrt").loader = None  # a plugin runtime that ships no example loader
        try:
            package(Path(sys.argv[1]), out_dir=Path(sys.argv[2]))
        except ConfigError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(toy_export), str(tmp_path / "out")], env=plugin_env,
                         capture_output=True, text=True, check=True)
    message = out.stdout.strip()
    assert message and "\n" not in message
    assert "toy format" in message and "toyrt" in message and "loader=edgekit.runtimes.Loader(" in message
    assert not (tmp_path / "out").exists()
