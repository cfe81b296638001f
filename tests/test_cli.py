import json
import os
import subprocess
import sys

import pytest

from edgekit import __version__
from edgekit.cli import main
from edgekit.errors import DeviceError


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_the_command_starts_without_torch_transformers_numpy_or_tqdm():
    """Every command module (and through them every stage) is imported at start-up, so each must defer its heavy
    libraries: `edgekit --help` or a typo should not wait for torch."""
    code = ("import sys, edgekit.cli.app\n"
            "print(' '.join(m for m in ('torch', 'transformers', 'numpy', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_devices_json_lists_every_profile(capsys):
    rc, out, _ = run(capsys, "devices", "--json", "--no-host")
    names = [d["name"] for d in json.loads(out)]
    assert rc == 0 and len(names) >= 7 and "pi-zero-2w" in names
    zero = next(d for d in json.loads(out) if d["name"] == "pi-zero-2w")
    assert zero["memory_budget"] == 300_000_000  # numbers in base units for machines


def test_devices_table_for_people(capsys, home):
    rc, out, _ = run(capsys, "devices")
    assert rc == 0 and "pi-zero-2w" in out and "host" in out and "(measured)" in out


def test_plan_json_has_the_promised_keys(capsys, tiny_llama_dir):
    rc, out, _ = run(capsys, "plan", "--teacher", str(tiny_llama_dir), "--device", "pi-zero-2w", "--quant", "q4_0",
                     "--context", "256", "--json")
    r = json.loads(out)
    assert rc == 0
    assert {"params", "layers", "hidden_size"} <= set(r["student"])
    assert {"weights_bytes", "kv_cache_bytes", "compute_buffer_bytes", "runtime_overhead_bytes",
            "safety_margin_bytes", "total_bytes"} <= set(r["memory"])
    assert r["budget_bytes"] == 300_000_000 and r["predicted_decode_tok_s"] > 0


def test_plan_over_all_devices_reports_each_and_keeps_going(capsys, tiny_llama_dir, home):
    rc, out, _ = run(capsys, "plan", "--teacher", str(tiny_llama_dir), "--context", "256", "--json")
    results = json.loads(out)
    assert rc == 0 and results[-1]["device"]["name"] == "host"
    esp = next(r for r in results if r["device"]["name"] == "esp32-s3-psram")
    assert "no runtime for format 'gguf'" in esp["error"]
    rc, out, _ = run(capsys, "plan", "--teacher", str(tiny_llama_dir), "--context", "256")
    assert rc == 0 and "predicted, not measured" in out and "pi-zero-2w" in out


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "--device", "nope"], "unknown device 'nope'"),
    (["plan", "--quant", "q9"], "unknown quant 'q9'"),
    (["plan", "--format", "tflite"], "unknown format 'tflite'"),
    (["teacher", "--teacher", "/no/such/folder"], "not found"),
])
def test_user_errors_are_one_line_exit_2_no_traceback(capsys, argv, fragment):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("edgekit: error:") and fragment in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_infeasible_budget_is_a_clear_error(capsys, tiny_llama_dir, tmp_path):
    import yaml

    from edgekit.devices import devices_dir

    raw = yaml.safe_load((devices_dir() / "pi-zero-2w.yaml").read_text())
    raw.update(name="tiny-box", memory_budget="1MB")
    path = tmp_path / "tiny-box.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc, _, err = run(capsys, "plan", "--teacher", str(tiny_llama_dir), "--device", str(path), "--context", "256")
    assert rc == 2 and "nothing fits" in err and "tiny-box" in err and "Fix:" in err


def test_debug_shows_the_traceback():
    with pytest.raises(DeviceError):
        main(["plan", "--device", "nope", "--debug"])


@pytest.mark.slow
def test_console_script_describes_and_plans_the_embedded_teacher(teacher, teacher_home):
    env = {**os.environ, "EDGEKIT_HOME": str(teacher_home), "HF_HUB_OFFLINE": "1"}
    exe = [sys.executable, "-m", "edgekit.cli"]
    t = subprocess.run([*exe, "teacher", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert t.returncode == 0, t.stderr
    info = json.loads(t.stdout)
    assert info["name"] == "SmolLM2-135M-Instruct" and info["architecture"]["params"] == 134_515_008
    p = subprocess.run([*exe, "plan", "--device", "pi-zero-2w", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["teacher"]["name"] == "SmolLM2-135M-Instruct" and plan["memory"]["total_bytes"] <= 300_000_000
