"""A mutation fuzzer for every input edgekit reads, and the rule each case must keep.

Each :class:`Target` names one parser (recipe, device profile, data file, chat template, GGUF / safetensors /
ONNX / .pte header, bundle manifest and tarball, units, CLI arguments), the real files it starts from (seeds) and
how to feed it one input. :func:`fuzz` mutates the seeds with a seeded ``random.Random`` (byte flips, inserts of
bytes and tokens that parsers trip on, deletions, duplicated and spliced chunks, and for text formats whole-line
edits), runs each case, and sorts it:

- ``accepted``: the parser returned;
- ``refused``: it raised edgekit's own error (:class:`edgekit.errors.EdgekitError`), which the CLI prints as one
  line with exit 2;
- ``crash``: any other exception -- a bug, reported with the input that caused it;
- ``slow``: the case took longer than ``max_seconds`` (a hang is cut off by SIGALRM after ``hang_seconds``);
- ``wrote``: the case left a file in its working folder other than its input (edgekit writes only to its store).

Written here rather than with a coverage-guided fuzzer: atheris has no wheel for every Python this project
supports and needs its own build, and hypothesis's shrinking costs ~1 ms a case where these parsers take tens of
microseconds; the mutations below are what the issue's first fuzzer used to find the recipe crash, seeded and
deterministic so a failure replays from (target, seed, case number).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import struct
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError

ROOT = Path(__file__).resolve().parents[2]
# Bytes and tokens that parsers trip on: structure of YAML/JSON, path tricks, huge and odd numbers, encodings.
TOKENS = [b"[", b"]", b"{", b"}", b":", b": ", b"- ", b"\n", b"\t", b"#", b"&a", b"*a", b"!!python/object:os.system",
          b"<<", b"'", b'"', b"\\", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"..", b"../", b"/", b"~", b"%", b"$",
          b"null", b"true", b"-1", b"0", b"1e309", b"nan", b"9" * 30, b"-9223372036854775809", b"4294967296",
          b"18446744073709551616", b"MB", b"GiB", b"bpw", b"e", b"a[b", b"extends", b"teacher", b"device",
          b"\xf0\x9f\x99\x82", b"\xc3\x28", b"{{", b"}}", b"{%", b"%}"]


@dataclass
class Target:
    """One parser: its seeds, the file suffix of an input, and ``run(path)`` that feeds it one input file."""

    name: str
    seeds: Callable[[], list[bytes]]
    run: Callable[[Path], object]
    suffix: str = ""
    text: bool = True  # line mutations apply
    extra: dict = field(default_factory=dict)  # files the input sits beside (name -> bytes), e.g. a recipe's base
    filename: str | None = None  # the input's file name (default: input<suffix>)


@dataclass
class Report:
    target: str
    seed: int
    cases: int = 0
    accepted: int = 0
    refused: int = 0
    crashes: list = field(default_factory=list)
    slow: list = field(default_factory=list)
    wrote: list = field(default_factory=list)
    seconds: float = 0.0
    max_case_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.slow or self.wrote)

    def summary(self) -> dict:
        return {"target": self.target, "seed": self.seed, "cases": self.cases, "accepted": self.accepted,
                "refused": self.refused, "crashes": len(self.crashes), "slow": len(self.slow),
                "wrote": len(self.wrote), "seconds": round(self.seconds, 3),
                "max_case_seconds": round(self.max_case_seconds, 4)}


def mutate(rng: random.Random, data: bytes, seeds: list[bytes], text: bool) -> bytes:
    """One to four random edits of ``data``."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9 if text else 7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip bits of one byte
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert a token
            b[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and b:  # delete a run
            del b[pos:pos + rng.randint(1, 16)]
        elif op == 3 and b:  # duplicate a chunk
            start = rng.randrange(len(b))
            b[pos:pos] = b[start:start + rng.randint(1, 64)]
        elif op == 4:  # splice in a chunk of another seed
            other = rng.choice(seeds)
            if other:
                start = rng.randrange(len(other))
                b[pos:pos] = other[start:start + rng.randint(1, 128)]
        elif op == 5 and len(b) >= 4:  # an interesting integer over 1, 2, 4 or 8 bytes (binary headers)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice((0, 1, 0x7F, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1, rng.getrandbits(64)))
            at = min(pos, len(b) - width) if len(b) >= width else 0
            b[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op == 6 and b:  # truncate
            del b[pos:]
        elif op == 7:  # text: duplicate, drop or swap whole lines
            lines = bytes(b).split(b"\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            choice = rng.randrange(3)
            if choice == 0:
                lines.insert(i, lines[j])
            elif choice == 1 and len(lines) > 1:
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            b = bytearray(b"\n".join(lines))
        elif op == 8:  # text: change the indentation of a line
            lines = bytes(b).split(b"\n")
            i = rng.randrange(len(lines))
            lines[i] = (b" " * rng.choice((0, 1, 2, 4, 7))) + lines[i].lstrip()
            b = bytearray(b"\n".join(lines))
    return bytes(b)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def fuzz(target: Target, cases: int, seed: int, workdir: Path, *, max_seconds: float = 1.0,
         hang_seconds: float = 10.0, keep: int = 20) -> Report:
    """Run ``cases`` mutated inputs through ``target`` in ``workdir``; the report keeps the first ``keep`` findings
    of each kind with the input that caused them."""
    rng = random.Random(f"{target.name}:{seed}")
    seeds = [s for s in target.seeds() if s is not None]
    assert seeds, f"{target.name} has no seeds"
    workdir.mkdir(parents=True, exist_ok=True)
    for name, content in target.extra.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(content)
    path = workdir / (target.filename or f"input{target.suffix}")
    allowed = {path.name, *(Path(n).parts[0] for n in target.extra)}
    report = Report(target.name, seed)
    for seed_input in seeds:  # warm-up, untimed: first calls pay for imports and once-per-machine work (the host's
        path.write_bytes(seed_input)  # measurement when a plan names no device), not for their input
        try:
            target.run(path)
        except EdgekitError:
            pass
    old = signal.signal(signal.SIGALRM, _alarm)
    t_all = time.perf_counter()
    try:
        for i in range(cases):
            data = rng.choice(seeds) if i < len(seeds) else mutate(rng, rng.choice(seeds), seeds, target.text)
            path.write_bytes(data)
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, hang_seconds)
            try:
                target.run(path)
                report.accepted += 1
            except EdgekitError:
                report.refused += 1
            except _Hang:
                report.slow.append({"case": i, "seconds": hang_seconds, "input": data[:4096]})
            except RecursionError as e:  # still a crash, but the traceback would be huge
                _note(report.crashes, keep, i, data, e, "RecursionError")
            except Exception as e:  # noqa: BLE001 -- finding these is the point
                _note(report.crashes, keep, i, data, e, traceback.format_exc(limit=6))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            took = time.perf_counter() - t0
            if took > max_seconds and not (report.slow and report.slow[-1]["case"] == i):
                took = min(took, _again(target, path, hang_seconds))  # a slow input is slow twice; a busy CPU is not
            report.max_case_seconds = max(report.max_case_seconds, took)
            if took > max_seconds and len(report.slow) < keep:
                report.slow.append({"case": i, "seconds": round(took, 3), "input": data[:4096]})
            stray = [p.name for p in workdir.iterdir() if p.name not in allowed]
            if stray:
                if len(report.wrote) < keep:
                    report.wrote.append({"case": i, "files": stray, "input": data[:4096]})
                for name in stray:
                    p = workdir / name
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            report.cases += 1
    finally:
        signal.signal(signal.SIGALRM, old)
        report.seconds = time.perf_counter() - t_all
    return report


def _again(target: Target, path: Path, hang_seconds: float) -> float:
    """Seconds a second run of the same input takes (whatever it ends in)."""
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, hang_seconds)
    try:
        target.run(path)
    except Exception:  # noqa: BLE001 -- its outcome was recorded by the first run; only the time counts
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return time.perf_counter() - t0


def _note(found: list, keep: int, case: int, data: bytes, e: BaseException, where: str) -> None:
    if len(found) < keep:
        found.append({"case": case, "error": f"{type(e).__name__}: {e}"[:500], "where": where[-1500:],
                      "input": data[:4096]})


# --------------------------------------------------------------------------- seeds of the binary formats


def gguf_seeds() -> list[bytes]:
    """Small GGUF files written by gguf-py: metadata of every value type, a few tensors."""
    import gguf
    import numpy as np

    out = []
    for n in (1, 3):
        fd, name = tempfile.mkstemp(suffix=".gguf", prefix="edgekit-fuzz-seed-")  # gguf-py writes to a path
        os.close(fd)
        buf = Path(name)
        w = gguf.GGUFWriter(str(buf), "llama")
        w.add_block_count(n)
        w.add_context_length(128)
        w.add_string("general.name", "seed")
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        w.add_float32("x.f", 1.5)
        w.add_bool("x.b", True)
        for i in range(n):
            w.add_tensor(f"t{i}", np.arange(16 * (i + 1), dtype=np.float32).reshape(i + 1, 16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out.append(buf.read_bytes())
        buf.unlink()
    return out


def safetensors_seeds() -> list[bytes]:
    import numpy as np
    from safetensors.numpy import save

    return [save({"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.int64)}, metadata={"format": "pt"}),
            save({"w": np.zeros((1,), np.float16)})]


def onnx_seeds() -> list[bytes]:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    inline = helper.make_model(g).SerializeToString()
    # the same graph with its weight in an external file beside it (ONNX_DATA_FILE, an extra file of the target),
    # as large exports store it: mutations then reach the location, offset and length entries
    from onnx.external_data_helper import set_external_data

    set_external_data(w, location=ONNX_DATA_FILE, offset=0, length=64)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return [inline, helper.make_model(g).SerializeToString()]


ONNX_DATA_FILE = "weights.bin"
ONNX_DATA = bytes(64) + b"\x01" * 64  # the external weight (64 bytes) and more, so offsets past it can still fit


def pte_seeds() -> list[bytes]:
    """ExecuTorch ``.pte`` heads as exir serializes them: the flatbuffer root offset, the ``ET12`` identifier, then
    either the ``eh00`` extended header (its length, program size, segment base and size) with a data segment, or
    the flatbuffer straight away."""
    import struct

    from edgekit.integrity import PTE_EXTENDED_HEADER, PTE_IDENTIFIER

    program = bytes(range(64)) * 2  # stands in for the flatbuffer tables
    header = PTE_EXTENDED_HEADER + struct.pack("<IQQQ", 32, 48 + len(program), 48 + len(program), 32)
    extended = struct.pack("<I", 48) + PTE_IDENTIFIER + header + b"\0" * (48 - 8 - len(header)) + program + b"\xab" * 32
    plain = struct.pack("<I", 16) + PTE_IDENTIFIER + program
    return [extended, plain]


def tar_seeds(folder_files: dict[str, bytes]) -> list[bytes]:
    """A bundle-shaped tarball: one top folder, a manifest listing the files."""
    import hashlib

    files = dict(folder_files)
    files["manifest.json"] = json.dumps({"schema": "edgekit.bundle/1", "files": {
        n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in folder_files.items()}}).encode()
    out = []
    for mode in ("w:gz", "w"):  # gzip, as `edgekit package` writes it, and plain tar, which verify also reads
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tf:
            for name, content in files.items():
                info = tarfile.TarInfo(f"bundle/{name}")
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
        out.append(buf.getvalue())
    return out


def read(paths) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


