"""The property every bad input must have: one clear line, non-zero exit, no traceback, nothing changed.

``assert_clean_failure(capsys, argv, fragments, watch=[...])`` runs the CLI in-process and checks:
exit code 2, nothing on stdout, exactly one stderr line starting ``edgekit: error:`` that contains
every fragment (the file or key it names, and the fix), no traceback, and that every file under the
watched paths (the input itself, the artifact store) is byte-identical afterwards, with no new
artifact folder that looks complete.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgekit.cli import main


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given paths (files or folders; missing paths are skipped)."""
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def complete_artifacts(home: Path) -> set[str]:
    """Names of artifact folders in the store that carry a manifest (i.e. look complete)."""
    root = Path(home) / "artifacts"
    return {p.name for p in root.iterdir() if (p / "manifest.json").is_file()} if root.is_dir() else set()


def assert_clean_failure(capsys, argv: list[str], fragments: list[str], watch: list[Path] = (),
                         home: Path | None = None) -> str:
    """Run ``edgekit *argv``; assert the clean-failure property; return the error line."""
    before = snapshot(*watch)
    complete_before = complete_artifacts(home) if home else set()
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert out == "", out
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("edgekit: error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), f"want one error line, got: {err!r}"
    line = errors[0]
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    assert snapshot(*watch) == before, "a watched file changed"
    if home:
        assert complete_artifacts(home) == complete_before, "a new artifact folder looks complete"
    return line
