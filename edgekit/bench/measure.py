"""Measuring export artifacts on every runtime that can run them: one worker process per (artifact, runtime).

:func:`run_benchmark` plans the rows -- each artifact on each registered runtime that runs
its format, plus the PyTorch fp32 reference once per distinct source model, plus a GPU row
for runtimes with a GPU variant -- and runs each row in a fresh ``python -m
edgekit.bench.worker`` subprocess with a timeout, so a crash, a hang or one runtime's
memory never touches the others. A runtime that is not installed gives an ``unavailable``
row with the reason; a worker that crashes or times out gives a ``failed`` row with its last
stderr line. Rows are measured one after another: concurrent runs would share the cores.

``remote="user@host"`` runs the same worker over ``ssh user@host python -m
edgekit.bench.worker --spec -`` (the spec goes over stdin). edgekit must be installed on the
remote, and every artifact must exist both here (its manifest is read here) and there at the
same path (rsync ``$EDGEKIT_HOME/artifacts`` over first; the PyTorch reference also needs the
source model folder). The ``host`` block still describes this machine; rows say where they were
measured in ``device`` / ``measured_on``.

The result follows :data:`SCHEMA` (checked by :func:`validate_results`); the statistics of
each metric come from :func:`summarize`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgekit import __version__, artifact, devices
from edgekit.bench.config import BenchConfig
from edgekit.bench.worker import THREAD_ENV
from edgekit.errors import ConfigError, EdgekitError
from edgekit.integrity import check_model_path
from edgekit.progress import bar as progress_bar
from edgekit.runtimes import Runtime, Source, describe, get_runtime, package_version
from edgekit.runtimes import runtimes as all_runtimes

log = logging.getLogger(__name__)

SCHEMA = "edgekit.bench/1"
STATUSES = ("ok", "unavailable", "failed")
# host.versions records every registered runtime's package (key: the name with "_" for "-") and transformers.
# Results must carry the keys the first schema had; a key added later (executorch, a plugin's) is checked
# only when present, so older results stay valid.
REQUIRED_VERSIONS = ("llama_cpp_python", "onnxruntime", "onnxruntime_genai", "torch", "transformers")


def version_packages() -> dict[str, str]:
    """``host.versions`` key -> pip distribution, for every registered runtime plus transformers."""
    packages = [rt.package for rt in all_runtimes(opt_in=False).values()] + ["transformers"]
    return {p.replace("-", "_"): p for p in dict.fromkeys(packages)}


DEFAULTS = BenchConfig()  # every setting run_benchmark is not given comes from the one bench config
STAT_KEYS = ("median", "min", "max", "q1", "q3", "iqr", "mean", "n", "values")
DECODE_PROMPT_TOKENS = 128  # decode speed is measured after a prompt of this many tokens


def summarize(values: list[float]) -> dict:
    """Median, min, max, quartiles, IQR and mean of repeated measurements.

    Quartiles use ``statistics.quantiles(method="inclusive")``: linear interpolation between
    order statistics, the same as numpy.percentile's default (type 7): for ``1, 2, 3, 4`` q1 is
    1.75 and q3 3.25. A single value is its own median and quartiles (IQR 0).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize() needs at least one value")
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "iqr": q3 - q1, "mean": statistics.fmean(values), "n": len(values), "values": values}


def run_benchmark(artifacts: list[Path], runtimes: list[str] | None = None, *, repeats: int = DEFAULTS.repeats,
                  warmup: int = DEFAULTS.warmup, threads: int | None = DEFAULTS.threads,
                  prompt_lengths: tuple[int, ...] = tuple(DEFAULTS.prompt_lengths),
                  decode_tokens: int = DEFAULTS.decode_tokens, timeout_s: float = 600, progress: bool = True,
                  remote: str | None = None, remote_python: str = "python", journal: Path | None = None) -> dict:
    """Benchmark ``artifacts`` (export folders, or HF folders for PyTorch) on ``runtimes`` (default: all registered).

    The settings default to :class:`edgekit.bench.config.BenchConfig`'s (what `edgekit bench` and a
    recipe's ``bench:`` measure). ``threads`` defaults to this host's physical cores; ``progress`` draws a bar on stderr
    (when edgekit.progress allows). Returns the :data:`SCHEMA` dict. ``journal`` (a JSONL file)
    makes a long benchmark resumable: each finished row is appended to it, and a re-run with the
    same settings on the same host takes those rows from it instead of measuring them again.
    """
    _check_settings(repeats, warmup, threads, prompt_lengths, decode_tokens)
    selected = [get_runtime(name) for name in runtimes] if runtimes else list(all_runtimes(opt_in=False).values())
    sources = [describe(Path(a)) for a in artifacts]  # a path that is no artifact raises ConfigError here
    for src in sources:  # headers only: a corrupt or hostile model file stops the run here, not in a worker
        if src.model.exists():  # a missing one is the worker's to report, as a failed row
            check_model_path(src.model)
    _check_context(sources, prompt_lengths, decode_tokens)
    profile = devices.detect_host()
    threads = threads or profile.cpu.cores
    settings = {"repeats": repeats, "warmup": warmup, "threads": threads,
                "prompt_lengths": [int(n) for n in prompt_lengths], "decode_tokens": decode_tokens}
    where = "host" if remote is None else f"measured on {remote.rsplit('@', 1)[-1]}"
    plan = plan_rows(sources, selected)
    done = {r["key"]: r["rows"] for r in artifact.read_journal(journal)}
    runs = []
    with progress_bar(total=len(plan), desc="bench", unit="run") if progress else _NoBar() as bar:
        ids: set[str] = set()
        for src, runner, error in plan:
            row_id = _unique(f"{src.path.name}:{runner.name}", ids)
            bar.set_postfix_str(row_id)
            row = _row(row_id, src, runner.name, where)
            if error:
                rows = [{**row, "status": "failed", "reason": error}]
            else:
                spec = {"artifact": str(src.path), "runtime": runner.name, "module": runner.open.__module__,
                        "threads": threads, **{k: settings[k] for k in ("repeats", "warmup", "decode_tokens")},
                        "prompt_lengths": settings["prompt_lengths"], "decode_prompt_tokens": DECODE_PROMPT_TOKENS}
                key = _journal_key(spec, src, where)
                rows = done.get(key)
                if rows is not None:
                    ids.update(r["id"] for r in rows)
                    log.info("%s: measured before the interruption; taken from %s", row_id, journal)
                else:
                    rows = _measure_row(row, runner, spec, settings, timeout_s, remote, remote_python, ids)
                    if journal is not None:
                        artifact.append_journal(journal, [{"key": key, "rows": rows}], fault="bench.row")
            runs.extend(rows)
            for r in rows:
                log.info("%s: %s%s", r["id"], r["status"], f" ({r['reason']})" if r["reason"] else "")
            bar.update(1)
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "edgekit_version": __version__, "host": host_block(profile, threads), "settings": settings, "runs": runs}


def _journal_key(spec: dict, src: Source, where: str) -> str:
    """A row's identity in the journal: what is measured, on which host, by which edgekit."""
    return artifact.content_id(spec, src.path.name, platform.node(), where, __version__)


def plan_rows(sources: list[Source], selected: list[Runtime]) -> list[tuple[Source, Runtime, str | None]]:
    """(source, runner, error) per CPU row: every artifact on every runner of its format, then each source model once.

    A runner that runs the ``pytorch`` format is the reference: it runs each distinct source
    model (an export's ``config.model_path``, or an HF folder given directly) once.
    """
    plan = [(src, r, None) for src in sources for r in selected if src.format in r.formats and src.format != "pytorch"]
    references = [r for r in selected if "pytorch" in r.formats]
    seen: list[Path] = []
    for src in sources:
        model = src.model if src.format == "pytorch" else src.source_model
        if model is None or model in seen:
            continue
        seen.append(model)
        try:
            ref, error = describe(model), None
        except EdgekitError as e:
            ref, error = Source(path=model, format="pytorch", quant="fp32", label="pytorch-fp32", model=model,
                                source_model=model, file_bytes=None, params=src.params), str(e)
        plan.extend((ref, r, error) for r in references)
    return plan


def host_block(profile, threads: int) -> dict:
    versions = {key: package_version(package) for key, package in version_packages().items()}
    return {"cpu": profile.cpu.name, "cores_physical": profile.cpu.cores, "threads_used": threads,
            "ram_bytes": int(profile.ram), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "memory_bandwidth_bytes_s": float(profile.memory_bandwidth),
            "fp32_flops": float(profile.cpu.peak_fp32)}


def worker_command(remote: str | None = None, python: str = "python", threads: int | None = None) -> list[str]:
    """The argv that runs one worker reading its spec from stdin: locally, or ``ssh <remote> ...``."""
    if remote is None:
        return [sys.executable, "-m", "edgekit.bench.worker", "--spec", "-"]
    env = [f"{name}={threads}" for name in THREAD_ENV] if threads else []
    remote_cmd = ["env", *env, python, "-m", "edgekit.bench.worker", "--spec", "-"] if env else \
        [python, "-m", "edgekit.bench.worker", "--spec", "-"]
    return ["ssh", "-o", "BatchMode=yes", remote, shlex.join(remote_cmd)]


def run_worker(spec: dict, timeout_s: float, remote: str | None = None, python: str = "python") -> dict:
    """Run one worker; its JSON, or ``{"status": "failed", "reason": ...}`` for a crash, a timeout or bad output."""
    cmd = worker_command(remote, python, spec.get("threads"))
    env = {**os.environ, **{name: str(spec["threads"]) for name in THREAD_ENV}}
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "reason": f"timed out after {timeout_s:g}s; last stderr: {_last_line(e.stderr)}"}
    except OSError as e:
        return {"status": "failed", "reason": f"cannot start {cmd[0]}: {e}"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        try:
            result = json.loads(lines[-1])
            if isinstance(result, dict) and result.get("status") in STATUSES:
                return result
        except json.JSONDecodeError:
            pass
    how = f"exited with code {proc.returncode}"
    if proc.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            pass
    return {"status": "failed", "reason": f"worker {how}; last stderr: {_last_line(proc.stderr)}"}


def _measure_row(row: dict, runner: Runtime, spec: dict, settings: dict, timeout_s: float, remote: str | None,
                 python: str, ids: set[str]) -> list[dict]:
    """The CPU row and, for runtimes with a GPU variant, the GPU row."""
    missing = runner.available() if remote is None else None
    result = {"status": "unavailable", "reason": missing} if missing else run_worker(spec, timeout_s, remote, python)
    rows = [_finish(row, result, settings)]
    if runner.gpu_variant:
        if "gpu" in result:  # the worker checked the GPU where it ran
            gpu_reason = result["gpu"]
        elif remote is None:
            gpu_reason = runner.gpu_available()
        else:
            gpu_reason = f"not checked: the {runner.name} worker on {remote} did not answer"
        gpu_row = {**row, "id": _unique(f"{row['id']}-gpu", ids), "runtime": f"{runner.name}-gpu"}
        if gpu_reason is None:
            rows.append(_finish(gpu_row, run_worker({**spec, "gpu": True}, timeout_s, remote, python), settings))
        else:
            rows.append({**gpu_row, "status": "unavailable", "reason": gpu_reason})
    return rows


def _row(row_id: str, src: Source, runtime: str, where: str) -> dict:
    return {"id": row_id, "artifact": str(src.path), "label": src.label, "format": src.format, "quant": src.quant,
            "runtime": runtime, "device": where, "measured_on": where, "status": "failed", "reason": None,
            "file_bytes": src.file_bytes, "params": src.params, "metrics": None}


def _finish(row: dict, result: dict, settings: dict) -> dict:
    """Fill a row from a worker's answer (summarising its per-repeat values)."""
    if result.get("status") != "ok":
        return {**row, "status": result.get("status", "failed"), "reason": result.get("reason") or "no reason given"}
    want = settings["decode_tokens"]
    if any(n != want for n in result["decoded"]) or len(result["decoded"]) != settings["repeats"]:
        return {**row, "status": "failed", "reason": f"decoded {result['decoded']} tokens per repeat, expected "
                                                     f"{want} in each of {settings['repeats']} repeats"}
    lengths = [str(n) for n in settings["prompt_lengths"]]
    metrics = {"load_s": summarize(result["load_s"]),
               "ttft_s": {n: summarize(result["ttft_s"][n]) for n in lengths},
               "prefill_tok_s": {n: summarize(result["prefill_tok_s"][n]) for n in lengths},
               "decode_tok_s": summarize(result["decode_tok_s"]),
               "peak_rss_bytes": int(result["peak_rss_bytes"]),
               "rss_after_load_bytes": int(result["rss_after_load_bytes"])}
    env = {"environment": str(result["environment"])} if result.get("environment") else {}  # e.g. a browser's
    return {**row, "status": "ok", "reason": None, "metrics": metrics, **env}


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}#{i}", i + 1
    taken.add(candidate)
    return candidate


def _last_line(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(nothing on stderr)"


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass


def _check_settings(repeats, warmup, threads, prompt_lengths, decode_tokens) -> None:
    problems = []
    if repeats < 1:
        problems.append(f"repeats must be at least 1, not {repeats}")
    if warmup < 0:
        problems.append(f"warmup must be 0 or more, not {warmup}")
    if threads is not None and threads < 1:
        problems.append(f"threads must be at least 1, not {threads}")
    if not prompt_lengths or min(prompt_lengths) < 1:
        problems.append(f"prompt_lengths must be positive token counts, not {list(prompt_lengths)}")
    if decode_tokens < 1:
        problems.append(f"decode_tokens must be at least 1, not {decode_tokens}")
    if problems:
        raise ConfigError("bench settings: " + "; ".join(problems))


def _check_context(sources: list[Source], prompt_lengths, decode_tokens: int) -> None:
    """Refuse, before any worker starts, prompts longer than a model was trained for (its config's context)."""
    need = max(max(prompt_lengths), DECODE_PROMPT_TOKENS + decode_tokens)  # positions one sequence uses
    for src in sources:
        limit, where = _trained_context(src)
        if limit and need > limit:
            raise ConfigError(
                f"the benchmark needs {need} positions (longest prompt {max(prompt_lengths)}, or a "
                f"{DECODE_PROMPT_TOKENS}-token prompt plus {decode_tokens} decoded tokens) but {src.path} was trained "
                f"for {limit} ({where}); keep prompt_lengths (--prompt-lengths) at most {limit} and decode_tokens "
                f"(--decode-tokens) at most {max(limit - DECODE_PROMPT_TOKENS, 1)}")


def _trained_context(src: Source) -> tuple[int | None, str]:
    """(positions the model was trained for, where that number comes from), or (None, "") when unknown."""
    try:
        if src.format == "pytorch":
            cfg = json.loads((Path(src.path) / "config.json").read_text(encoding="utf-8"))
            return int(cfg["max_position_embeddings"]), f"max_position_embeddings in {Path(src.path) / 'config.json'}"
        arch = artifact.read_manifest(src.path)["source_model"]["architecture"]
        return int(arch["max_context"]), f"max_context of its source model in {Path(src.path) / 'manifest.json'}"
    except (OSError, ValueError, KeyError, TypeError, EdgekitError):
        return None, ""


# --------------------------------------------------------------------------- schema


_TOP = {"schema": str, "created": str, "edgekit_version": str, "host": dict, "settings": dict, "runs": list}
_HOST = {"cpu": str, "cores_physical": int, "threads_used": int, "ram_bytes": int, "platform": str, "python": str,
         "versions": dict, "memory_bandwidth_bytes_s": (float, type(None)), "fp32_flops": (float, type(None))}
_SETTINGS = {"repeats": int, "warmup": int, "threads": int, "prompt_lengths": list, "decode_tokens": int}
_RUN = {"id": str, "artifact": (str, type(None)), "label": str, "format": str, "quant": str, "runtime": str,
        "device": str, "measured_on": str, "status": str, "reason": (str, type(None)),
        "file_bytes": (int, type(None)), "params": (int, type(None)), "metrics": (dict, type(None))}
_METRICS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "rss_after_load_bytes")


def validate_results(d: dict) -> None:
    """Raise ValueError listing every way ``d`` departs from :data:`SCHEMA` (nothing when it conforms)."""
    problems: list[str] = []
    if not isinstance(d, dict):
        raise ValueError(f"bench results must be a JSON object, not {type(d).__name__}")
    _check_keys(d, _TOP, "", problems)
    if d.get("schema") != SCHEMA:
        problems.append(f"schema is {d.get('schema')!r}, expected {SCHEMA!r}")
    if isinstance(d.get("host"), dict):
        _check_keys(d["host"], _HOST, "host.", problems)
        versions = d["host"].get("versions")
        if isinstance(versions, dict):
            _check_keys(versions, {k: (str, type(None)) for k in REQUIRED_VERSIONS + tuple(
                k for k in version_packages() if k in versions and k not in REQUIRED_VERSIONS)},
                        "host.versions.", problems)
    settings = d.get("settings")
    lengths = []
    if isinstance(settings, dict):
        _check_keys(settings, _SETTINGS, "settings.", problems)
        lengths = [str(n) for n in settings.get("prompt_lengths") or []]
    seen_ids: set = set()
    for i, run in enumerate(d.get("runs") if isinstance(d.get("runs"), list) else []):
        where = f"runs[{i}]."
        if not isinstance(run, dict):
            problems.append(f"runs[{i}] is not an object")
            continue
        # "quality" (ppl, KL, top-1 from a fidelity report) is optional: bench.report.join_quality adds it;
        # "environment" too: what a runtime reports of where it ran (a browser's version, threads, SIMD)
        _check_keys({k: v for k, v in run.items() if k not in ("quality", "environment")}, _RUN, where, problems)
        if not isinstance(run.get("quality", {}), (dict, type(None))):
            problems.append(f"{where}quality must be an object or null")
        if not isinstance(run.get("environment", ""), str):
            problems.append(f"{where}environment must be a string")
        if run.get("id") in seen_ids:
            problems.append(f"{where}id {run.get('id')!r} is not unique")
        seen_ids.add(run.get("id"))
        status = run.get("status")
        if status not in STATUSES:
            problems.append(f"{where}status is {status!r}, expected one of {', '.join(STATUSES)}")
        if status == "ok":
            _check_metrics(run.get("metrics"), lengths, where + "metrics.", problems)
        elif status in ("unavailable", "failed"):
            if not run.get("reason"):
                problems.append(f"{where}reason is empty for status {status}")
            if run.get("metrics") is not None:
                problems.append(f"{where}metrics must be null for status {status}")
    if problems:
        raise ValueError(f"bench results do not follow {SCHEMA}: " + "; ".join(problems))


def _check_keys(obj: dict, spec: dict, where: str, problems: list[str]) -> None:
    for key, types in spec.items():
        if key not in obj:
            problems.append(f"{where}{key} is missing")
        elif not _is(obj[key], types):
            problems.append(f"{where}{key} has type {type(obj[key]).__name__}")
    for key in sorted(set(obj) - set(spec)):
        problems.append(f"{where}{key} is not in the schema")


def _is(value, types) -> bool:
    """isinstance, except that a bool is no int and an int is a fine float."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _check_metrics(m, lengths: list[str], where: str, problems: list[str]) -> None:
    if not isinstance(m, dict):
        problems.append(f"{where[:-1]} must be an object for status ok")
        return
    for key in sorted(set(m) ^ set(_METRICS)):
        problems.append(f"{where}{key} " + ("is missing" if key in _METRICS else "is not in the schema"))
    for key in ("load_s", "decode_tok_s"):
        _check_stats(m.get(key), where + key, problems)
    for key in ("ttft_s", "prefill_tok_s"):
        per = m.get(key)
        if not isinstance(per, dict) or sorted(per) != sorted(lengths):
            problems.append(f"{where}{key} must have one entry per prompt length {lengths}")
            continue
        for n in lengths:
            _check_stats(per[n], f"{where}{key}.{n}", problems)
    for key in ("peak_rss_bytes", "rss_after_load_bytes"):
        if key in m and not _is(m[key], int):
            problems.append(f"{where}{key} must be an integer")


def _check_stats(s, where: str, problems: list[str]) -> None:
    if not isinstance(s, dict) or set(s) != set(STAT_KEYS):
        problems.append(f"{where} must have exactly {', '.join(STAT_KEYS)}")
        return
    if not isinstance(s["values"], list) or len(s["values"]) != s["n"]:
        problems.append(f"{where}.values must be a list of n values")
