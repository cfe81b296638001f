"""Every default has one home, the stage config: the CLI with no options and a recipe without the key build it."""

from __future__ import annotations

import inspect

import pytest

from edgekit.arch import DEFAULT_CONTEXT
from edgekit.bench.config import BenchConfig
from edgekit.bench.measure import run_benchmark
from edgekit.cli import app
from edgekit.cli.bench import bench_config, fidelity_config
from edgekit.cli.distill import _distill_config
from edgekit.cli.export import _export_config
from edgekit.distill.config import CacheConfig, DistillConfig, StudentSpec, TrainConfig
from edgekit.export.config import ExportConfig
from edgekit.package import package
from edgekit.quantize import report as fidelity_report
from edgekit.quantize.config import FidelityConfig
from edgekit.recipe import DistillSection, ExportSpec, Recipe

MINIMAL = {"device": "pi-5-8gb", "exports": [{"format": "gguf", "quant": "q4_k_m"}]}


def parse(*argv: str):
    return app._parser().parse_args(list(argv))


def test_cli_without_options_builds_each_stage_configs_defaults():
    assert _distill_config(parse("distill")) == DistillConfig()
    assert _export_config(parse("export"), require_quant=False) == ExportConfig()
    assert fidelity_config(parse("fidelity", "some-export")) == FidelityConfig()
    assert bench_config(parse("bench", "some-export")) == BenchConfig()


def test_cli_options_land_in_the_stage_config():
    cfg = bench_config(parse("bench", "x", "--repeats", "7", "--prompt-lengths", "8", "16", "--runtimes", "a,b"))
    assert (cfg.repeats, cfg.prompt_lengths, cfg.runtimes, cfg.decode_tokens) == (7, [8, 16], ["a", "b"],
                                                                                 BenchConfig().decode_tokens)
    assert fidelity_config(parse("fidelity", "x", "--max-tokens", "99")).max_tokens == 99
    distill = _distill_config(parse("distill", "--time-budget", "2m", "--cache", "none"))
    assert distill.train.time_budget_s == 120 and distill.train.steps is None and distill.cache is None


@pytest.mark.parametrize("argv", [("bench", "x", "--repeats", "0"), ("fidelity", "x", "--max-tokens", "0"),
                                  ("export", "--calibration-tokens", "0")])
def test_cli_values_are_checked_by_the_stage_config(argv):
    from edgekit.errors import ConfigError

    build = {"bench": bench_config, "fidelity": fidelity_config,
             "export": lambda a: _export_config(a, require_quant=False)}[argv[0]]
    with pytest.raises(ConfigError, match=f"{argv[0]} options: "):
        build(parse(*argv))


def test_context_has_one_default():
    assert StudentSpec().context == DEFAULT_CONTEXT
    assert Recipe.model_validate(MINIMAL).context == DEFAULT_CONTEXT
    assert parse("plan").context == DEFAULT_CONTEXT and parse("package", "x").context == DEFAULT_CONTEXT


def test_recipe_sections_are_the_stage_configs():
    r = Recipe.model_validate(MINIMAL)
    assert r.bench == BenchConfig() and r.fidelity == FidelityConfig()
    assert r.distill.data == DistillConfig().data


def test_recipe_distill_words_take_their_default_from_the_stage_fields():
    """A recipe without distill keys distils exactly what the stage would by default."""
    r = Recipe.model_validate({**MINIMAL, "name": "r"})
    expected = DistillConfig(student=StudentSpec(device="pi-5-8gb", format="gguf", quant="q4_k_m"))
    assert r.distill_config() == expected
    d, train = DistillSection.model_fields, TrainConfig.model_fields
    for key in ("loss", "temperature", "steps", "batch_size", "lr"):
        assert d[key].default == train[key].default and d[key].metadata == train[key].metadata, key
    assert d["init"].default == StudentSpec.model_fields["init"].default
    assert d["cache"].default == CacheConfig.model_fields["mode"].default
    assert ExportSpec.model_fields["calibrate"].default == ExportConfig.model_fields["calibrate"].default



def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_run_benchmark_measures_what_the_bench_config_says_when_not_told():
    cfg = BenchConfig()
    assert _default(run_benchmark, "repeats") == cfg.repeats and _default(run_benchmark, "warmup") == cfg.warmup
    assert _default(run_benchmark, "threads") == cfg.threads
    assert list(_default(run_benchmark, "prompt_lengths")) == cfg.prompt_lengths
    assert _default(run_benchmark, "decode_tokens") == cfg.decode_tokens


def test_fidelity_scores_the_fidelity_configs_tokens_when_not_told():
    assert _default(fidelity_report.run, "max_tokens") == FidelityConfig().max_tokens
    assert _default(fidelity_report.fidelity, "max_tokens") == FidelityConfig().max_tokens


def test_package_sizes_bundles_for_the_one_context_default():
    assert _default(package, "context") == DEFAULT_CONTEXT
