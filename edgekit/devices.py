"""Device profiles: what a target can hold and how fast it moves bytes.

Profiles live in ``devices/<name>.yaml`` (one per device, facts cited from
vendor specs in comments) and are parsed into :class:`DeviceProfile`, which
forbids unknown keys. ``host`` is not a file: :func:`detect_host` reads this
machine (RAM, cores, ISA flags) and measures its memory bandwidth and matmul
throughput once, caching the result per machine under ``EDGEKIT_HOME``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Literal

import psutil
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit import artifact, registry
from edgekit.artifact import user_path
from edgekit.errors import DeviceError, validation_problem, yaml_problem
from edgekit.units import Bandwidth, Bytes, Flops, Frequency, format_bytes, parse_bytes

log = logging.getLogger(__name__)

ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx",
    "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme", "xtensa_pie", "rvv",
)
Isa = Literal[ISA_FLAGS]  # type: ignore[valid-type]


def device_runtimes() -> list[str]:
    """Runtimes a device profile can list: the registered ones that run a registered export format
    (the PyTorch reference runs the HF folder itself, which is no device's runtime), not the opt-in ones (the
    browser runtimes, which the planner has no model of)."""
    fmts = set(registry.names(registry.FORMAT))
    return [name for name, rt in registry.items(registry.RUNTIME).items()
            if set(rt.formats) & fmts and not getattr(rt, "opt_in", False)]


def _check_runtimes(names: list[str]) -> list[str]:
    known = device_runtimes()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown runtime {', '.join(map(repr, bad))}: use any of {', '.join(known)} (a plugin "
                         "package adds more through the 'edgekit' entry-point group)")
    return names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cpu(_Strict):
    name: str
    arch: Literal["x86_64", "aarch64", "armv7", "xtensa", "riscv64", "riscv32"]
    cores: int = Field(ge=1)
    threads: int = Field(ge=1)
    clock: Frequency
    isa: list[Isa] = []
    peak_fp32: Flops = Field(description="theoretical (or, for host, measured) FP32 throughput")

    @model_validator(mode="after")
    def _threads_cover_cores(self):
        if self.threads < self.cores:
            raise ValueError(f"threads ({self.threads}) cannot be fewer than cores ({self.cores})")
        return self


class Accelerator(_Strict):
    kind: Literal["gpu", "npu", "dsp"]
    name: str
    peak: Flops | None = None
    precision: Literal["fp32", "fp16", "bf16", "int8", "int4"] | None = None
    memory: str = "shared"
    usable_by: list[str] = []

    @field_validator("usable_by")
    @classmethod
    def _usable_by(cls, v: list[str]) -> list[str]:
        return _check_runtimes(v)

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if v != "shared":
            parse_bytes(v)  # a dedicated size must be readable
        return v


class DeviceProfile(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    display_name: str
    device_class: Literal["sbc", "phone", "laptop", "desktop", "embedded-gpu", "mcu", "wearable", "server"] = Field(
        alias="class"
    )
    ram: Bytes = Field(gt=0)
    memory_budget: Bytes = Field(gt=0, description="memory one app process may really use")
    memory_bandwidth: Bandwidth = Field(gt=0)
    cpu: Cpu
    accelerators: list[Accelerator] = []
    runtimes: list[str]
    os: str
    notes: str = ""
    measured: dict[str, str] = Field(default_factory=dict, description="how detected figures were measured (host)")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v: list[str]) -> list[str]:
        return _check_runtimes(v)

    @model_validator(mode="after")
    def _budget_within_ram(self):
        if self.memory_budget > self.ram:
            raise ValueError(
                f"memory_budget ({format_bytes(self.memory_budget)}) is larger than ram ({format_bytes(self.ram)}); "
                "the budget is what one app may use, so it must be at most the RAM"
            )
        return self

    def summary(self) -> dict:
        """A JSON-ready dict with numbers in base units (bytes, bytes/s, FLOP/s)."""
        return self.model_dump(mode="python", by_alias=True)


def devices_dir() -> Path:
    """Where device YAMLs live: ``$EDGEKIT_DEVICES_DIR`` or the repository's ``devices/``."""
    env = os.environ.get("EDGEKIT_DEVICES_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "devices"


def _keys_at(loc: tuple) -> list[str]:
    """The keys a profile allows at ``loc`` (top level, ``cpu``, an accelerator)."""
    where = tuple(p for p in loc if isinstance(p, str))  # list indexes dropped: accelerators.0 -> accelerators
    model = {(): DeviceProfile, ("cpu",): Cpu, ("accelerators",): Accelerator}.get(where)
    return [f.alias or name for name, f in model.model_fields.items()] if model else []


def _format_validation(err: ValidationError, source: str) -> str:
    typos = {}  # unknown key -> the allowed key it is a misspelling of (reported once, not also as missing)
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_at(e["loc"][:-1]), n=1, cutoff=0.6)
            if close:
                typos[e["loc"]] = close[0]
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = validation_problem(e)
        if e["type"] == "missing" and any(loc[:-1] + (k,) == e["loc"] for loc, k in typos.items()):
            continue
        if e["type"] == "extra_forbidden":
            hint = f"did you mean {typos[e['loc']]!r}? " if e["loc"] in typos else ""
            msg = f"unknown key; {hint}check the spelling against devices/README.md or another profile"
        elif e["type"] == "missing":
            msg = "required key is missing; add it (devices/README.md lists every key)"
        problems.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(problems)


def load_profile_file(path: Path) -> DeviceProfile:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise DeviceError(f"device profile {path} is not UTF-8 text (line {line}, byte {e.start}: {e.reason}); "
                          "re-save it as UTF-8") from e
    except yaml.YAMLError as e:
        raise DeviceError(f"device profile {path}: {yaml_problem(e)}; fix the YAML there") from e
    except OSError as e:
        raise DeviceError(f"cannot read device profile {path}: {e.strerror or e}; fix the file or remove it") from e
    if not isinstance(raw, dict):
        raise DeviceError(f"device profile {path} must be a YAML mapping of keys to values, not "
                          f"{'an empty file' if raw is None else 'a ' + type(raw).__name__}; copy a profile from "
                          "devices/ and edit it (devices/README.md lists every key)")
    try:
        profile = DeviceProfile.model_validate(raw)
    except ValidationError as e:
        raise DeviceError(_format_validation(e, f"device profile {path}")) from e
    if profile.name != path.stem:
        raise DeviceError(
            f"device profile {path}: name {profile.name!r} differs from the file name; "
            f"rename the file to {profile.name}.yaml or set name: {path.stem}"
        )
    return profile


# Listed profiles by path, with the bytes they were read from: listing every device (a plan without --device, the
# device table) parses only files that changed. Profiles are frozen, so sharing them is safe.
_LISTED: dict[Path, tuple[bytes, DeviceProfile]] = {}


def _profile_unless_changed(path: Path) -> DeviceProfile:
    try:
        content = path.read_bytes()
    except OSError:
        return load_profile_file(path)  # says what is wrong with it
    hit = _LISTED.get(path)
    if hit is not None and hit[0] == content:
        return hit[1]
    profile = load_profile_file(path)
    _LISTED[path] = (content, profile)
    return profile


def list_devices(directory: Path | None = None, include_host: bool = False) -> list[DeviceProfile]:
    directory = directory or devices_dir()
    if not directory.is_dir():
        raise DeviceError(f"no device profiles folder at {directory}; set EDGEKIT_DEVICES_DIR to the folder of YAMLs")
    profiles = [_profile_unless_changed(p) for p in sorted(directory.glob("*.yaml"))]
    if include_host:
        profiles.append(detect_host())
    return profiles


def load_device(name: str, directory: Path | None = None) -> DeviceProfile:
    """A profile by name (``pi-zero-2w``), by path to a YAML, or ``host``."""
    if name == "host":
        return detect_host()
    as_path = user_path(name)
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise DeviceError(f"device profile {as_path} does not exist; fix the path (a recipe's `device:` path is "
                              "relative to the recipe file) or give a device name from `edgekit devices`")
        return load_profile_file(as_path)
    directory = directory or devices_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml")) + ["host"]
        close = _closest(name, known)
        hint = f"did you mean {close!r}? " if close else ""
        raise DeviceError(f"unknown device {name!r}: {hint}known devices are {', '.join(known)} (see `edgekit devices`)")
    return load_profile_file(path)


def _closest(name: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return match[0] if match else None


# --------------------------------------------------------------------------- host


_X86_FLAGS = {
    "sse4_2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni", "amx_tile": "amx",
}
_ARM_FEATURES = {
    "asimd": "neon", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2", "sme": "sme",
}


def _cpuinfo() -> tuple[str, list[str]]:
    """CPU model name and ISA flags (in edgekit's vocabulary) from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            name = value.strip()
        elif key in ("flags", "features"):
            for f in value.split():
                mapped = _X86_FLAGS.get(f) or _ARM_FEATURES.get(f)
                if mapped:
                    flags.add(mapped)
    if platform.machine() in ("arm64", "aarch64"):
        flags.add("neon")  # mandatory in AArch64
    return name, [f for f in ISA_FLAGS if f in flags]


def cpu_name() -> str:
    """This CPU's model name (``AMD EPYC ...``), as /proc/cpuinfo gives it; else what ``platform`` knows."""
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """This CPU's ISA flags in edgekit's vocabulary (``avx2``, ``amx``, ``neon``, ``dotprod`` ...)."""
    return _cpuinfo()[1]


def _physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _host_key(cpu_name: str, threads: int, ram: int) -> str:
    node = platform.node()
    return hashlib.sha256(f"{node}|{cpu_name}|{threads}|{ram}".encode()).hexdigest()[:16]


def measure_memory_bandwidth(size_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-N read bandwidth (bytes/s) summing a buffer far larger than the caches, on all threads.

    Decode in every LLM runtime streams the weights once per token, so a multi-threaded
    read of a large buffer is the matching ceiling. torch.sum is used because it
    is multi-threaded and vectorised; numpy's reductions run on one core.
    """
    import torch

    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    x.sum()  # fault pages in and warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-N FP32 GEMM throughput (FLOP/s) on all threads: the host's practical compute peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def installed_runtimes() -> list[str]:
    """The device runtimes this host can import (each runtime's descriptor knows its module)."""
    return [name for name in device_runtimes() if registry.get(registry.RUNTIME, name).available() is None]


def detect_host(refresh: bool = False) -> DeviceProfile:
    """Profile this machine; bandwidth and compute are measured once and cached per machine."""
    cpu_name, isa = _cpuinfo()
    threads = os.cpu_count() or 1
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        pass
    ram = psutil.virtual_memory().total
    cache = artifact.home() / "host" / f"{_host_key(cpu_name, threads, ram)}.json"
    measured = None
    if cache.is_file() and not refresh:
        try:
            measured = json.loads(cache.read_text())
            float(measured["bandwidth"]), float(measured["fp32_flops"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("host measurement cache %s is unreadable; measuring again", cache)
            measured = None
    if measured is None:
        log.info("measuring this host's memory bandwidth and matmul throughput (once per machine)")
        measured = {
            "bandwidth": measure_memory_bandwidth(),
            "fp32_flops": measure_matmul_flops(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threads": threads,
        }
        artifact.atomic_write_text(cache, json.dumps(measured, indent=2))
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if arch not in ("x86_64", "aarch64", "armv7", "riscv64"):
        arch = "x86_64" if "86" in arch else "aarch64"
    freq = psutil.cpu_freq()
    available = psutil.virtual_memory().available
    return DeviceProfile(
        name="host",
        display_name=f"this machine ({platform.node() or 'host'})",
        device_class="server" if not _has_battery() else "laptop",
        ram=ram,
        memory_budget=int(min(ram, available) * 0.75),
        memory_bandwidth=measured["bandwidth"],
        cpu=Cpu(
            name=cpu_name,
            arch=arch,
            cores=min(_physical_cores(), threads),
            threads=threads,
            clock=(freq.max or freq.current) * 1e6 if freq and (freq.max or freq.current) else 1e9,
            isa=isa,
            peak_fp32=measured["fp32_flops"],
        ),
        runtimes=installed_runtimes(),
        os=f"{platform.system()} {platform.release()}",
        notes="Detected at run time. memory_budget is 75% of the memory available when detected.",
        measured={
            "memory_bandwidth": f"multi-threaded read of a 256 MiB buffer, best of 5, {measured['when']}",
            "cpu.peak_fp32": f"1024x1024 FP32 matmul on {measured['threads']} threads, best of 5, {measured['when']}",
            "cache": str(cache),
        },
    )


def _has_battery() -> bool:
    try:
        return psutil.sensors_battery() is not None
    except (AttributeError, NotImplementedError, OSError):
        return False
