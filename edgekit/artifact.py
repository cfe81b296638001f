"""Artifact folders: files plus a ``manifest.json``, written atomically, verified by sha256.

Every stage writes its output into a temporary sibling folder and renames it into
place only when complete, so a killed run never leaves a folder that looks whole.
The manifest records each output file's sha256 and size; :func:`verify_manifest`
re-hashes them, which is how the teacher cache detects corruption.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from edgekit import __version__
from edgekit.errors import CacheError, ModelError

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def home() -> Path:
    """edgekit's cache and artifact root: ``$EDGEKIT_HOME`` or the user cache dir."""
    env = os.environ.get("EDGEKIT_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgekit"))


def disk_error(e: OSError, path: Path, needed: int | None = None) -> CacheError:
    if e.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(path.parent if not path.exists() else path).free
        except OSError:
            free = 0
        need = f" (needs about {needed / 1e6:.0f} MB, {free / 1e6:.0f} MB free)" if needed else ""
        return CacheError(
            f"disk full while writing {path}{need}; free some space or set EDGEKIT_HOME to a larger disk. "
            "Earlier artifacts were left intact."
        )
    return CacheError(f"cannot write {path}: {e.strerror or e}; check permissions or set EDGEKIT_HOME elsewhere")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(e, path, len(data)) from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success rename it to ``final``.

    If ``final`` exists already it is replaced (the old one is removed only after
    the new one is complete). On any exception the temporary folder is removed.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise disk_error(e, tmp) from e
    try:
        yield tmp
        _fsync_dir(tmp)
        if final.exists():
            trash = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(e, final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20, progress=None) -> str:
    """Hex sha256 of a file; ``progress(n_bytes)`` is called per chunk if given."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def content_id(*parts: object) -> str:
    """A short stable id for (stage, config, input ids): the same inputs give the same id."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_id(folder: Path) -> str:
    """A model folder's identity: its manifest's file hashes if it has one, else file names, sizes and mtimes."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return content_id(read_manifest(folder)["files"])
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist; resolve the teacher first (edgekit teacher)")
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return content_id(files)


def host_facts() -> dict:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def write_manifest(
    folder: Path,
    stage: str,
    config: dict,
    inputs: dict[str, str] | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    progress=None,
) -> dict:
    """Hash every file under ``folder`` and write ``manifest.json`` describing the artifact."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"sha256": sha256_file(p, progress=progress), "size": p.stat().st_size}
    manifest = {
        "stage": stage,
        "edgekit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "inputs": inputs or {},
        "files": files,
        "metrics": metrics or {},
        "host": host_facts(),
        **(extra or {}),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CacheError(f"{path} is missing: {folder} is not a complete edgekit artifact") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path} is unreadable ({e}); delete {folder} and re-run to rebuild it") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CacheError(f"{path} has no 'files' table; delete {folder} and re-run to rebuild it")
    return manifest


def verify_manifest(folder: Path, progress=None) -> list[str]:
    """Re-hash the files a manifest lists; return the problems found (empty list: intact)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for rel, meta in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        if p.stat().st_size != meta.get("size"):
            problems.append(f"{rel}: size {p.stat().st_size} != {meta.get('size')}")
            continue
        if sha256_file(p, progress=progress) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    return problems


@contextlib.contextmanager
def locked(name: str, wait: bool = True) -> Iterator[Path]:
    """Hold ``$EDGEKIT_HOME/locks/<name>.lock`` (an flock, released if the process dies).

    A second holder logs who holds it ("waiting for ... locked by pid N") and waits, or with
    ``wait=False`` raises CacheError naming the pid.
    """
    import fcntl

    folder = home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise CacheError(f"{path} is locked by {holder}: another edgekit run is writing the same "
                                 "artifacts; wait for it to finish or stop it") from None
            log.warning("waiting for %s, locked by %s", path, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield path
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
