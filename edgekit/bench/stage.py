"""The benchmark stage, for ``edgekit bench`` and recipes alike: exports in, one ``bench-<id>`` artifact out.

The folder holds ``results.json`` (the measurement, with quality columns joined in from fidelity
reports), ``report.md``, ``report.html`` and ``manifest.json``. Its id hashes the measured artifacts'
contents, the measurement settings and what the report shows (devices, quality, title), so asking
twice reuses it and `edgekit runs` lists it. Rows finished before an interruption are kept in a
journal in the stage's work folder and are not measured again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgekit import artifact
from edgekit.arch import Architecture
from edgekit.bench.config import BenchConfig
from edgekit.bench.measure import run_benchmark
from edgekit.bench.report import QUALITY_KEYS, write_report

log = logging.getLogger(__name__)


def run(cfg: BenchConfig, artifacts: list[Path], *, remote: str | None = None, devices: list | None = None,
        fidelity: list[dict] = (), title: str | None = None, out: Path | None = None) -> artifact.Artifact:
    """Benchmark ``artifacts`` (export folders, or HF folders for PyTorch) as ``cfg`` says; write the report artifact.

    ``remote`` (user@host) measures there; ``devices`` (profiles) are projected onto; ``fidelity``
    reports give the quality columns; ``out`` puts the artifact in a folder of your choice instead of
    the store. The artifact's ``result`` is results.json.
    """
    artifacts = [Path(a) for a in artifacts]
    config = {**cfg.model_dump(mode="json"), "remote": remote, "devices": [d.name for d in devices or []],
              "title": title}
    inputs = {"artifacts": ",".join(artifact.folder_id(a) for a in artifacts), "quality": _quality_id(fidelity)}
    labels = [_label(a) for a in artifacts]
    with artifact.stage("bench", config, inputs, at=out) as st:
        if not st.reused:
            results = run_benchmark(artifacts, cfg.runtimes, repeats=cfg.repeats, warmup=cfg.warmup,
                                    threads=cfg.threads, prompt_lengths=tuple(cfg.prompt_lengths),
                                    decode_tokens=cfg.decode_tokens, remote=remote, journal=st.work / "journal.jsonl")
            write_report(results, st.tmp, list(fidelity), devices=devices, arch=architecture(artifacts), title=title)
            st.extra = {"label": title or "bench " + ", ".join(labels)}
    st.result = json.loads((st.path / "results.json").read_text())
    return st.artifact


def architecture(artifacts: list[Path]) -> Architecture | None:
    """The benchmarked model's architecture (exact bytes per token for projections): from the first artifact
    that records it (an export's source model) or has a config.json (an HF folder, or an export's source)."""
    for a in artifacts:
        if (a / artifact.MANIFEST).is_file():
            m = artifact.read_manifest(a)
            if m.get("source_model", {}).get("architecture"):
                return Architecture.from_dict(m["source_model"]["architecture"])
            cfg = Path(m.get("config", {}).get("model_path", "")) / "config.json"
        else:
            cfg = a / "config.json"
        if cfg.is_file():
            return Architecture.from_hf_config(json.loads(cfg.read_text()), str(cfg))
    return None


def _label(folder: Path) -> str:
    if (folder / artifact.MANIFEST).is_file():
        return artifact.read_manifest(folder).get("label") or folder.name
    return folder.name


def _quality_id(reports) -> str | None:
    """What the joined quality columns depend on: each fidelity row's artifact, format and scores."""
    rows = [{k: r.get(k) for k in ("artifact", "format", *QUALITY_KEYS)}
            for rep in reports for r in rep.get("rows", [])]
    return artifact.content_id(rows) if rows else None
