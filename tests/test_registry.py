"""The one registry: built-ins arrive through entry points, duplicates and broken plugins are refused."""

from __future__ import annotations

import importlib.metadata

import pytest

from edgekit import registry
from edgekit.errors import ConfigError


def test_builtins_come_from_entry_points_of_the_edgekit_group():
    values = {ep.value for ep in importlib.metadata.entry_points(group=registry.GROUP)}
    assert "edgekit.quantize.schemes:register" in values
    reg = registry.Registry()
    assert {"gguf", "onnx", "executorch"} <= set(reg.names(registry.FORMAT))
    assert "gguf/q4_k_m" in reg.names(registry.SCHEME)
    assert {"llama.cpp", "onnxruntime", "pytorch"} <= set(reg.names(registry.RUNTIME))
    assert reg.origin(registry.FORMAT, "gguf") == "edgekit.quantize.schemes:register"


def test_unknown_name_lists_the_choices():
    reg = registry.Registry()
    with pytest.raises(ConfigError, match=r"unknown format 'tflite': choose one of gguf, onnx, executorch"):
        reg.get(registry.FORMAT, "tflite")


def test_a_name_registered_twice_is_refused_naming_both():
    reg = registry.Registry(group="edgekit-test-no-such-group")
    reg.add("runtime", "x", object())
    with pytest.raises(registry.PluginError, match="registered twice"):
        reg.add("runtime", "x", object())


class _EP:
    def __init__(self, value, fn):
        self.value, self.name, self._fn, self.dist = value, "bad", fn, None

    def load(self):
        if isinstance(self._fn, Exception):
            raise self._fn
        return self._fn


def test_a_broken_plugin_is_one_line_naming_it(monkeypatch):
    reg = registry.Registry(group="edgekit-test")
    monkeypatch.setattr(registry, "_entry_points", lambda group: [_EP("bad_pkg.plugin:register",
                                                                      ImportError("No module named 'bad_pkg'"))])
    with pytest.raises(registry.PluginError, match=r"bad_pkg.plugin:register .* failed to import: ImportError"):
        reg.names("runtime")


def test_a_plugin_that_raises_while_registering_is_named(monkeypatch):
    def register(reg):
        raise RuntimeError("boom")

    reg = registry.Registry(group="edgekit-test")
    monkeypatch.setattr(registry, "_entry_points", lambda group: [_EP("p:register", register)])
    with pytest.raises(registry.PluginError, match="p:register .* failed while registering: RuntimeError: boom"):
        reg.names("format")


def test_importing_the_registry_and_listing_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys; from edgekit import registry; registry.names('format'); registry.names('runtime');"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
