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
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from edgekit import __version__
from edgekit.errors import CacheError, ModelError

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def user_path(text: str | Path) -> Path:
    """``text`` as a path with ``~`` / ``~user`` expanded; an unknown ``~user`` stays as written (it then fails as a
    missing file, naming it) instead of raising RuntimeError from deep inside pathlib."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def home() -> Path:
    """edgekit's cache and artifact root: ``$EDGEKIT_HOME`` or the user cache dir."""
    env = os.environ.get("EDGEKIT_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("edgekit"))


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named place where the fault tests kill the process: ``EDGEKIT_FAULT=name[:n]`` sends SIGKILL to
    this process the n-th time (default 1st) execution reaches ``fault_point(name)``.

    A hand-rolled hook (like SQLite's and FoundationDB's fault injection) because a kill from outside
    at a random time cannot be aimed at the moments that matter: between writing a file and renaming
    it, between two checkpoints, after some journal lines. Costs one environment lookup when unset.
    """
    spec = os.environ.get("EDGEKIT_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(nth or 1):
        caller = sys._getframe(1)
        sys.stderr.write(f"\nEDGEKIT_FAULT {spec}: SIGKILL in {caller.f_globals.get('__name__')}."
                         f"{caller.f_code.co_name}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota exceeded, file size limit


def disk_error(e: OSError, path: Path, needed: int | None = None) -> CacheError:
    """The one-line error for a failed write: for a full disk, the path, the space needed and free.

    Some writers (numpy's ``tofile`` under gguf-py) report a short write without an errno;
    with under 1 MB left on the disk that is a full disk too.
    """
    try:
        free = free_bytes(path)
    except OSError:
        free = 0
    if e.errno in DISK_FULL or (e.errno is None and free < (1 << 20)):
        need = f"needs about {needed / 1e6:.1f} MB, " if needed else ""
        why = {errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}.get(e.errno, "disk full")
        return CacheError(
            f"{why} while writing {path} ({need}{free / 1e6:.1f} MB free); free some space or set EDGEKIT_HOME "
            "to a larger disk, then re-run: earlier artifacts were left intact and finished work is reused."
        )
    return CacheError(f"cannot write {path}: {e.strerror or e}; check permissions or set EDGEKIT_HOME elsewhere")


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def require_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``what`` under ``path`` when the disk has less than ``needed`` bytes free.

    Checked before a stage starts, so a full disk stops it while nothing has been written; a
    write that still fails (the estimate was low, or something else filled the disk) is caught
    by :func:`disk_error`.
    """
    free = free_bytes(path)
    if free < needed:
        raise CacheError(
            f"not enough disk space for {what} in {Path(path).parent}: needs about {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB free; free some space or set EDGEKIT_HOME to a larger disk. Nothing was written.")


def read_journal(path: Path | None) -> list[dict]:
    """The complete records of an append-only JSONL journal; a torn last line (killed mid-write) is cut off.

    Journals hold the finished part of a long stage (teacher answers, benchmark rows) so that a
    re-run after an interruption redoes only what was not finished.
    """
    if path is None or not Path(path).exists():
        return []
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes after the last newline are an unfinished write
    records = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise CacheError(f"{path} has a corrupt record ({e}); delete it to start that work over") from e
    if end < len(data):
        log.warning("%s ends with an unfinished record (the run was killed mid-write); dropping it", path)
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def append_journal(path: Path, records: list[dict], fault: str) -> None:
    """Append ``records`` to a JSONL journal and fsync; ``fault`` names the fault points around the write
    (``<fault>-torn`` in the middle of it, ``<fault>`` after it)."""
    path = Path(path)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text[:len(text) // 2])
            f.flush()
            fault_point(f"{fault}-torn")  # a kill in the middle of a record
            f.write(text[len(text) // 2:])
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise disk_error(e, path, len(text)) from e
    fault_point(fault)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("write.before-rename")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(e, path, len(data)) from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success rename it to ``final``.

    If ``final`` exists already it is replaced (the old one is removed only after
    the new one is complete), unless it holds exactly the files just built (another process
    finished the same content-addressed artifact meanwhile): then it is kept and the copy
    dropped, so a reader of ``final`` never sees it vanish. On any exception the temporary
    folder is removed; temporary folders left by killed processes are swept on the next call.
    """
    final = Path(final)
    sweep_leftovers(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise disk_error(e, tmp) from e
    try:
        yield tmp
        _fsync_tree(tmp)
        fault_point("dir.before-rename")
        if final.exists() and _same_files(final, tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif final.exists():
            trash = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
            os.replace(final, trash)
            fault_point("dir.swap")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(e, final, needed) from e
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _says_disk_full(e):  # a Rust/C++ writer (safetensors, onnx) that reports ENOSPC in its own exception
            raise disk_error(OSError(errno.ENOSPC, str(e)), final, needed) from e
        raise


def _says_disk_full(e: BaseException) -> bool:
    text = str(e)
    return not isinstance(e, CacheError) and ("No space left on device" in text or "os error 28" in text)


def _same_files(a: Path, b: Path) -> bool:
    """Both folders have manifests listing the same files with the same hashes, and ``a``'s files match them."""
    try:
        return read_manifest(a)["files"] == read_manifest(b)["files"] and not verify_manifest(a)
    except (CacheError, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


TEMP_SUFFIXES = (".partial", ".old", ".tmp")


def is_leftover(path: Path) -> bool:
    """A temporary file/folder (``.<name>.<pid>-<hex>.partial|.old|.tmp``) whose writer is no longer running.

    One whose pid is alive (ours or another process's) is work in progress; names without a
    pid, from older versions, count as leftovers.
    """
    name = Path(path).name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIXES)):
        return False
    tag = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    pid = tag.split("-", 1)[0]
    return not ("-" in tag and pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))))


def leftovers(folder: Path) -> list[Path]:
    """The temporary files/folders directly in ``folder`` left by edgekit processes that are no longer running."""
    return [p for p in Path(folder).glob(".*") if is_leftover(p)]


def sweep_leftovers(final: Path) -> None:
    """Remove what killed processes left next to ``final`` while building it (never a finished artifact)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for p in leftovers(final.parent):
        if p.name.startswith(f".{final.name}."):
            log.info("removing %s, left by an interrupted run", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so the rename publishes data, not empty files
    (after a power cut, a renamed folder could otherwise hold files the kernel had not written yet)."""
    for p in sorted(folder.rglob("*"), reverse=True):
        if not p.is_symlink() and (p.is_file() or p.is_dir()):
            _fsync(p)
    _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush one file or folder (a folder: its entries, e.g. a rename) to disk; best effort."""
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


def verify_manifest(folder: Path, progress=None, hashes: bool = True) -> list[str]:
    """Re-hash the files a manifest lists; return the problems found (empty list: intact).

    ``hashes=False`` checks presence and sizes only (fast: no file is read).
    """
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
        if hashes and sha256_file(p, progress=progress) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    return problems


_HELD: set[Path] = set()
STORE_LOCK = "store"  # held by every edgekit command that writes artifacts (see cli.WRITERS)


@contextlib.contextmanager
def locked(name: str, wait: bool = True) -> Iterator[Path]:
    """Hold ``$EDGEKIT_HOME/locks/<name>.lock`` (an flock, released if the process dies).

    A second holder logs who holds it ("waiting for ... locked by pid N (edgekit run x.yaml)")
    and waits, or with ``wait=False`` raises CacheError naming the pid. Re-entrant within one
    process (the CLI holds the store lock around a command that takes it again).
    """
    import fcntl

    folder = home() / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, folder) from e
    path = folder / f"{name}.lock"
    if path.resolve() in _HELD:
        yield path
        return
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
        what = " ".join(["edgekit", *sys.argv[1:]])[:200] if sys.argv and "edgekit" in sys.argv[0] else "edgekit"
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({what}, since {time.strftime('%H:%M:%S')})")
        f.flush()
        _HELD.add(path.resolve())
        try:
            yield path
        finally:
            _HELD.discard(path.resolve())
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the stage contract


@dataclass(frozen=True)
class Artifact:
    """What every stage returns: its finished folder, the folder's name as its id, its manifest, whether an
    earlier run's folder was reused, the seconds this call took, and ``result``: what the stage reports
    beyond its files (a fidelity report, benchmark results, a distillation summary).

    ``a["key"]`` reads the dict shape stages returned before (``path`` as a string, then ``result``'s
    keys, then the fields); new code reads the attributes.
    """

    path: Path
    id: str
    manifest: dict
    reused: bool
    seconds: float
    result: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        if key == "path":
            return str(self.path)
        if key in self.result:
            return self.result[key]
        if key in ("id", "manifest", "reused", "seconds"):
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def as_dict(self) -> dict:
        """JSON-ready: path, id, reused, seconds, then ``result``'s keys."""
        return {"path": str(self.path), "id": self.id, "reused": self.reused, "seconds": self.seconds,
                **self.result}


class Stage:
    """What ``with stage(...) as st`` gives the stage's body.

    ``st.reused`` says an intact earlier artifact was found (then ``st.tmp`` is None and the body
    builds nothing); otherwise the body writes its files into ``st.tmp`` and may set ``st.metrics``
    and ``st.extra`` (manifest keys), and ``st.result``. ``st.work`` is a folder for resumable work in
    progress (journals, finished shards) that survives a kill and is removed once the artifact is
    published. After the ``with`` block, ``st.artifact`` is the finished :class:`Artifact`.
    """

    def __init__(self, name: str, path: Path, config: dict, inputs: dict):
        self.name, self.path, self.id = name, path, path.name
        self.config, self.inputs = config, inputs
        self.reused = False
        self.tmp: Path | None = None
        self.metrics: dict = {}
        self.extra: dict = {}
        self.result: dict = {}
        self.manifest: dict = {}
        self.seconds = 0.0

    @property
    def work(self) -> Path:
        return self.path.with_name(self.path.name + ".inprogress")

    @property
    def artifact(self) -> Artifact:
        if not self.manifest:
            raise CacheError(f"{self.path} is not finished yet: read st.artifact after the `with stage(...)` block")
        return Artifact(self.path, self.id, self.manifest, self.reused, self.seconds, self.result)


def store_path(name: str, *key: object) -> Path:
    """Where the store keeps the ``name`` artifact whose identity is ``key``: ``artifacts/<name>-<content id>``."""
    return home() / "artifacts" / f"{name}-{content_id(name, *key)}"


def _plain(obj: object) -> object:
    """``obj`` as it reads back from a manifest (tuples become lists, paths strings)."""
    return json.loads(json.dumps(obj, default=str))


def find(path: Path, stage: str | None = None, config: dict | None = None, inputs: dict | None = None) -> dict | None:
    """The manifest of the finished, intact artifact at ``path``, or None (nothing there, another ``stage``,
    ``config`` or ``inputs`` when given, an unreadable manifest, or files that do not match it)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(path)
        stale = [k for k, want in (("stage", stage), ("config", config), ("inputs", inputs))
                 if want is not None and manifest.get(k) != _plain(want)]
        problems = [f"its {', '.join(stale)} differ{'s' if len(stale) == 1 else ''}"] if stale else \
            verify_manifest(path)
    except CacheError as e:
        problems = [str(e)]
    if problems:
        log.warning("rebuilding %s: %s", path, "; ".join(problems[:3]))
        return None
    return manifest


def _in_store(path: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(home().resolve())
    except OSError:
        return False


@contextlib.contextmanager
def stage(name: str, config: dict, inputs: dict | None = None, *, key: tuple | None = None, at: Path | None = None,
          needed: int | None = None, what: str | None = None) -> Iterator[Stage]:
    """Reuse or build one artifact: the one place that owns id, reuse check, lock, temp folder, manifest and rename.

    The folder is ``$EDGEKIT_HOME/artifacts/<name>-<id>`` with id = content_id(name, *key), ``key``
    defaulting to (config, inputs); or ``at`` (a caller-chosen folder, reused only when its manifest
    records the same stage, config and inputs). Inside the store the store lock is held throughout, so
    two processes never build one artifact at once and the second reuses the first's. When an intact
    artifact is there, ``st.reused`` is True and the body should build nothing. Otherwise, after a
    disk-space check (``needed`` bytes for ``what``), the body writes into ``st.tmp``; on leaving the
    block the manifest (stage ``name``, ``config``, ``inputs``, ``st.metrics``, ``st.extra``) is written and
    the folder renamed into place, so a killed or failed build leaves nothing that looks whole::

        with artifact.stage("fidelity", config, inputs) as st:
            if not st.reused:
                (st.tmp / "report.json").write_text(...)
        return st.artifact
    """
    t0 = time.perf_counter()
    inputs = dict(inputs or {})
    path = Path(at) if at is not None else store_path(name, *(key if key is not None else (config, inputs)))
    st = Stage(name, path, config, inputs)
    with contextlib.ExitStack() as held:
        if _in_store(path):
            held.enter_context(locked(STORE_LOCK))
        compare = at is not None  # a content-addressed folder's name already says which config made it
        found = find(path, name, config if compare else None, inputs if compare else None)
        if found is not None:
            log.info("reusing %s", path)
            st.reused, st.manifest = True, found
            shutil.rmtree(st.work, ignore_errors=True)  # left by a run killed between publishing and cleaning up
            st.seconds = round(time.perf_counter() - t0, 3)
            yield st
            return
        if at is not None and path.is_dir() and not (path / MANIFEST).exists() and any(path.iterdir()):
            raise CacheError(f"{path} exists and is not an edgekit artifact (no {MANIFEST}), so it would be replaced; "
                             "choose an empty or new folder")
        if needed:
            require_space(path, needed, what or f"the {name} artifact")
        with atomic_dir(path, needed) as tmp:
            st.tmp = tmp
            yield st
            st.manifest = write_manifest(tmp, name, config, inputs, metrics=st.metrics, extra=st.extra)
        st.tmp = None
        shutil.rmtree(st.work, ignore_errors=True)
        st.seconds = round(time.perf_counter() - t0, 3)
