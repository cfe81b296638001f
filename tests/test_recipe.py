"""Recipes: schema, extends, validation, and every file in recipes/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgekit.errors import RecipeError
from edgekit.recipe import load_recipe
from edgekit.units import parse_duration
from edgekit.validate import validate_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEVICES = Path(__file__).resolve().parent.parent / "devices"

# Recipes that describe a target edgekit cannot serve yet, and exactly the problems validate must report.
KNOWN_PROBLEMS = {
    "esp32-s3-psram": ["distill.student: auto: nothing fits"],
}

MINIMAL = {"device": "pi-5-8gb", "exports": [{"format": "gguf", "quant": "q4_k_m"}]}


def write(folder: Path, name: str, data: dict | str) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def one_problem(path: Path) -> str:
    problems = validate_recipe(path)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- the shipped recipes


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    problems = validate_recipe(path)
    expected = KNOWN_PROBLEMS.get(path.stem, [])
    assert len(problems) == len(expected), problems
    for want, got in zip(expected, problems):
        assert want in got and str(path) in got


def test_every_device_profile_has_a_recipe():
    assert {p.stem for p in DEVICES.glob("*.yaml")} <= {p.stem for p in RECIPES.glob("*.yaml")}


def test_recipes_readme_describes_every_recipe():
    text = (RECIPES / "README.md").read_text()
    for p in RECIPES.glob("*.yaml"):
        assert f"`{p.name}`" in text, p.name


def test_quick_recipe_builds_stage_configs():
    from edgekit.distill.pipeline import DistillConfig
    from edgekit.export.pipeline import ExportConfig

    r = load_recipe(RECIPES / "quick.yaml")
    cfg = r.distill_config()
    assert isinstance(cfg, DistillConfig)
    assert cfg.train.time_budget_s == 240 and cfg.train.steps is None
    assert cfg.student.device == "pi-5-8gb" and cfg.student.format == "gguf" and cfg.student.quant == "q4_k_m"
    assert cfg.student.target_decode_tok_s == 120 and cfg.data.synthetic_prompts == 192 and cfg.data.batch_size == 32
    exports = r.export_configs(model="/some/student")
    assert all(isinstance(e, ExportConfig) and e.model == "/some/student" for e in exports)
    assert [e.label for e in exports] == ["gguf-q4_k_m-calibrated", "onnx-int4"]


# --------------------------------------------------------------------------- extends


def test_extends_merges_nested_keys_child_wins_lists_replaced(tmp_path):
    write(tmp_path, "base.yaml", {
        "name": "base-name", "device": "laptop-x86", "context": 1024,
        "distill": {"data": {"synthetic_prompts": 10, "max_new_tokens": 20}, "lr": 1e-3},
        "exports": [{"format": "gguf", "quant": "q4_k_m"}, {"format": "onnx", "quant": "int4"}],
        "bench": {"prompt_lengths": [64, 128], "repeats": 5}})
    child = write(tmp_path, "child.yaml", {
        "extends": "base.yaml", "device": "pi-5-8gb",
        "distill": {"data": {"max_new_tokens": 30}},
        "exports": [{"format": "gguf", "quant": "q8_0"}],
        "bench": {"prompt_lengths": [32]}})
    r = load_recipe(child)
    assert r.name == "child" and r.extends == "base.yaml"  # names are not inherited
    assert r.device == "pi-5-8gb" and r.context == 1024
    assert r.distill.data.synthetic_prompts == 10 and r.distill.data.max_new_tokens == 30 and r.distill.lr == 1e-3
    assert [(e.format, e.quant) for e in r.exports] == [("gguf", "q8_0")]
    assert r.bench.prompt_lengths == [32] and r.bench.repeats == 5


def test_extends_null_section_replaces_the_base_section(tmp_path):
    write(tmp_path, "base.yaml", {**MINIMAL, "distill": {"lr": 1e-3}})
    r = load_recipe(write(tmp_path, "child.yaml", {"extends": "base.yaml", "distill": None}))
    assert r.distill is None
    with pytest.raises(RecipeError, match="distill is null"):
        r.distill_config()


def test_circular_extends_is_refused_naming_the_chain(tmp_path):
    write(tmp_path, "a.yaml", {**MINIMAL, "extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "c.yaml"})
    write(tmp_path, "c.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="circular") as e:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(e.value) and "b.yaml -> " in str(e.value) and "c.yaml -> " in str(e.value)
    assert "circular" in one_problem(tmp_path / "a.yaml")


def test_missing_base_names_the_path(tmp_path):
    with pytest.raises(RecipeError, match="extends: .*nope.yaml does not exist"):
        load_recipe(write(tmp_path, "r.yaml", {**MINIMAL, "extends": "nope.yaml"}))


def test_error_in_a_base_names_the_base_file(tmp_path):
    base = write(tmp_path, "base.yaml", {"distill": {"lr": "fast"}})
    msg = one_problem(write(tmp_path, "child.yaml", {**MINIMAL, "extends": "base.yaml"}))
    assert msg.startswith(f"{base}: distill.lr:")


def test_data_sources_are_relative_to_the_file_that_names_them(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.jsonl").write_text('{"prompt": "hi"}\n')
    write(tmp_path, "sub/base.yaml", {"distill": {"data": {"sources": ["mine.jsonl"]}}})
    r = load_recipe(write(tmp_path, "r.yaml", {**MINIMAL, "extends": "sub/base.yaml"}))
    assert r.distill.data.sources == [(tmp_path / "sub" / "mine.jsonl").resolve()]
    assert r.distill_config().data.sources == [(tmp_path / "sub" / "mine.jsonl").resolve()]


# --------------------------------------------------------------------------- schema errors


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "r.yaml", {**MINIMAL, "distil": {}})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path.resolve()) in str(e.value)
    assert "distil: unknown key; did you mean 'distill'?" in str(e.value)


def test_unknown_nested_key_lists_the_allowed_keys(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "distill": {"data": {"prompts": 5}}}))
    assert "distill.data.prompts: unknown key" in msg and "synthetic_prompts" in msg


def test_wrong_type_names_the_key(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "context": "lots"}))
    assert "r.yaml: context:" in msg and "integer" in msg


@pytest.mark.parametrize("value, words", [("10 parsecs", "cannot read duration"), (600, "has no unit"),
                                          ("-5m", "must be positive"), ("0s", "must be positive")])
def test_bad_time_budget_names_the_key_and_the_fix(tmp_path, value, words):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "distill": {"steps": None, "time_budget": value}}))
    assert "distill.time_budget:" in msg and words in msg


def test_parse_duration_units():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    assert parse_duration("4 min") == 240


def test_steps_and_time_budget_together_are_refused(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "distill": {"steps": 10, "time_budget": "1m"}}))
    assert "not both" in msg


def test_negative_steps_and_missing_exports(tmp_path):
    problems = validate_recipe(write(tmp_path, "r.yaml", {"device": "pi-5-8gb", "exports": [],
                                                          "distill": {"steps": -1}}))
    assert any("distill.steps:" in p and "greater than or equal to 1" in p for p in problems)
    assert any("exports: give at least one export" in p for p in problems)


def test_missing_device_is_required(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {"exports": MINIMAL["exports"]}))
    assert "device: required key is missing" in msg


def test_bad_student_value(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "distill": {"student": "big"}}))
    assert "distill.student:" in msg and "'auto'" in msg


# --------------------------------------------------------------------------- semantic checks


def test_unknown_device(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "device": "pi-6"}))
    assert "r.yaml: device: unknown device 'pi-6'" in msg


def test_unknown_quant(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "exports": [{"format": "gguf", "quant": "q9_k"}]}))
    assert "exports.0.quant:" in msg and "q9_k" in msg and "q4_k_m" in msg


def test_calibrate_on_a_float_type(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "exports": [{"format": "gguf", "quant": "f16",
                                                                         "calibrate": True}]}))
    assert "exports.0.calibrate:" in msg and "calibrate needs a quantized type" in msg


def test_unknown_runtime(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "bench": {"runtimes": ["llamacpp"]}}))
    assert "bench.runtimes: unknown runtime 'llamacpp'; did you mean 'llama.cpp'?" in msg


def test_runtime_that_runs_no_exported_format(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "bench": {"runtimes": ["onnxruntime"]}}))
    assert "bench.runtimes: runtime onnxruntime runs onnx" in msg


def test_missing_runtime_is_a_problem_only_when_named(tmp_path, monkeypatch):
    from edgekit import runtimes

    monkeypatch.setattr(runtimes.Runtime, "available", lambda self: f"{self.name} is not installed: pip install x")
    assert validate_recipe(write(tmp_path, "a.yaml", MINIMAL)) == []
    msg = one_problem(write(tmp_path, "b.yaml", {**MINIMAL, "bench": {"runtimes": ["llama.cpp"]}}))
    assert "bench.runtimes: llama.cpp is not installed" in msg


def test_device_without_a_runtime_for_the_format(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "device": "esp32-s3-psram", "distill": None,
                                                 "context": 256}))
    assert "exports.0.format:" in msg and "has no runtime for format 'gguf'" in msg


def test_explicit_huge_student_on_pi_zero_is_infeasible(tmp_path):
    student = {"layers": 30, "hidden_size": 576, "intermediate_size": 1536, "heads": 9, "kv_heads": 3}
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "device": "pi-zero-2w", "distill": {"student": student},
                                                 "exports": [{"format": "gguf", "quant": "q8_0"}]}))
    assert "r.yaml: distill.student:" in msg and "explicit student" in msg
    assert "allows 300MB" in msg and "choose a larger device" in msg


def test_teacher_as_is_too_big_for_the_device(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "device": "pi-zero-2w", "distill": None,
                                                 "exports": [{"format": "onnx", "quant": "fp32"}]}))
    assert "exports.0:" in msg and "exported as is" in msg and "add a distill section" in msg


def test_auto_student_nothing_fits_reports_the_planner(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "device": "pi-zero-2w", "context": 8192,
                                                 "distill": {"target_decode_tok_s": 10000}}))
    assert "distill.student: auto:" in msg


def test_package_format_not_exported(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "package": {"formats": ["onnx"]}}))
    assert "package.formats: 'onnx' is neither exported by this recipe" in msg and "bundle layout (" in msg


def test_package_layout_needs_an_export_it_takes(tmp_path):
    recipe = {**MINIMAL, "exports": [{"format": "onnx", "quant": "int4"}], "package": {"formats": ["ollama"]}}
    msg = one_problem(write(tmp_path, "r.yaml", recipe))
    assert "package.formats: the ollama bundle layout takes gguf exports" in msg and "add an export in gguf" in msg


def test_missing_data_source(tmp_path):
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "distill": {"data": {"sources": ["gone.jsonl"]}}}))
    assert "distill.data.sources.0:" in msg and "does not exist" in msg


def test_unreadable_teacher_is_reported_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    msg = one_problem(write(tmp_path, "r.yaml", {**MINIMAL, "teacher": "someone/not-cached-model"}))
    assert "teacher:" in msg and "validate never downloads" in msg


def test_validate_reports_several_problems_at_once(tmp_path):
    problems = validate_recipe(write(tmp_path, "r.yaml", {
        "device": "pi-6", "colour": "blue", "exports": [{"format": "gguf", "quant": "q9_k"}],
        "bench": {"runtimes": ["nope"]}}))
    joined = "\n".join(problems)
    assert len(problems) == 4, problems
    for words in ("colour: unknown key", "device: unknown device", "exports.0.quant:", "unknown runtime 'nope'"):
        assert words in joined


def test_validate_several_semantic_problems(tmp_path):
    problems = validate_recipe(write(tmp_path, "r.yaml", {
        **MINIMAL, "exports": [{"format": "gguf", "quant": "q9_k"}, {"format": "executorch", "quant": "q4_k_m"}],
        "bench": {"runtimes": ["nope"]}, "package": {"formats": ["onnx"]}}))
    assert len(problems) == 4, problems


def test_explicit_student_builds_a_distill_config(tmp_path):
    student = {"layers": 4, "hidden_size": 256, "intermediate_size": 512, "heads": 4, "kv_heads": 2}
    r = load_recipe(write(tmp_path, "r.yaml", {**MINIMAL, "distill": {"student": student, "cache": "none",
                                                                      "init": "random", "steps": 5}}))
    cfg = r.distill_config()
    assert cfg.student.device is None and cfg.student.layers == 4 and cfg.student.init == "random"
    assert cfg.cache is None and cfg.train.steps == 5
    assert validate_recipe(r.path) == []


def test_export_configs_refuse_a_format_without_exporter(tmp_path, monkeypatch):
    """A format registered for planning (as a plugin may) but with no exporter is refused by name."""
    import edgekit.recipe as recipe_mod

    r = load_recipe(write(tmp_path, "r.yaml", {**MINIMAL, "exports": [{"format": "executorch", "quant": "8da4w"}]}))
    monkeypatch.setattr(recipe_mod, "exporter_formats", lambda: ("gguf", "onnx"))
    with pytest.raises(RecipeError, match=r"exports.0.format: format executorch has no exporter; .*export gguf or onnx"):
        r.export_configs()


def test_executorch_exports_take_the_recipe_context(tmp_path):
    r = load_recipe(write(tmp_path, "r.yaml", {**MINIMAL, "context": 512, "exports": [
        {"format": "executorch", "quant": "8da4w"}, {"format": "gguf", "quant": "q4_k_m"}]}))
    et, gg = r.export_configs()
    assert (et.format, et.quant, et.context) == ("executorch", "8da4w", 512)
    assert gg.context is None  # llama.cpp grows its cache at run time
