"""Checking model files before anything opens them: safetensors, GGUF, ONNX and ExecuTorch ``.pte``.

Every check reads headers only -- never the tensor data -- and refuses a truncated,
corrupt or hostile file with one :class:`ModelError` line naming the file, before a
runtime allocates or maps what the file claims, and before any of its code could run.

Hand-written on purpose: the format libraries either trust the header and allocate or
memory-map whatever sizes it states (gguf-py's ``GGUFReader`` maps the file and builds
numpy views from the header's counts; llama.cpp and onnxruntime size buffers from it), or
fail deep inside with a traceback (protobuf ``DecodeError``, numpy reshape errors) that
does not say which file is bad or what to do. So the parsers below read incrementally
with ``struct``, check every count and length against the file's real size before using
it, and skip (seek over) anything they do not need instead of reading it.

- :func:`check_safetensors`: header length, JSON header, dtypes, shapes, offsets.
- :func:`check_gguf`: magic, version, counts, metadata lengths, tensor shapes, types and data ranges.
- :func:`check_onnx`: the protobuf parses; every tensor's shape and byte count agree; external
  data stays inside the model's folder and within its file.
- :func:`check_pte`: ExecuTorch's flatbuffer identifier and extended header.
- :func:`check_weights_folder` / :func:`check_model_path`: the same for an HF folder / any model path.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from edgekit.errors import ModelError

MAX_ELEMENTS = 1 << 40  # no real tensor has a trillion elements; more is a hostile or corrupt header
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
MAX_GGUF_COUNT = 1_000_000  # tensors or metadata keys in one GGUF
MAX_GGUF_ARRAY = 1 << 26  # elements of one GGUF metadata array (vocabularies are ~10^5)
MAX_GGUF_NAME = 65_535  # bytes of a metadata key or tensor name
GGML_MAX_DIMS = 4
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

FIX_SAFETENSORS = ("re-download it, or save the model again with model.save_pretrained(dir, "
                   "safe_serialization=True)")
FIX_GGUF = "re-download it or re-export it (`edgekit export MODEL --format gguf`)"
FIX_ONNX = "delete it and export again (`edgekit export MODEL --format onnx`)"
FIX_PTE = "delete it and export again (`edgekit export MODEL --format executorch`)"


def _bad(path: Path, kind: str, what: str, fix: str) -> ModelError:
    """The one-line refusal: ``<file> is not a readable <format>: <what> (<why>); <fix>``."""
    return ModelError(f"{path} is not a readable {kind}: {what}; {fix}")


def _numel(shape, path: Path, kind: str, what: str, fix: str) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise _bad(path, kind, f"{what} has dimension {d!r} (dimensions are non-negative integers)", fix)
        n *= d
        if n > MAX_ELEMENTS:
            raise _bad(path, kind, f"{what} claims shape {list(shape)} (more than 2^40 elements: the header is "
                                   "corrupt or hostile)", fix)
    return n


def _size(path: Path, fix: str) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError as e:
        raise ModelError(f"{path} is missing; {fix}") from e
    except OSError as e:
        raise ModelError(f"{path}: cannot read it ({e}); {fix}") from e


# --------------------------------------------------------------------------- safetensors

# bits per element of every dtype the safetensors format defines (0.8)
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
                    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def check_safetensors(path: Path) -> int:
    """Check a safetensors file's header against its size; return the bytes of tensor data it holds.

    The header length must be sane, the JSON header must parse, every tensor must have a known
    dtype, a sane shape and ``data_offsets`` whose size is shape x dtype, and the tensors must
    tile the data section exactly (no overlap, no gap, nothing past the end).
    """
    path = Path(path)
    size = _size(path, FIX_SAFETENSORS)

    def fail(what: str) -> ModelError:
        return _bad(path, "safetensors file", what, FIX_SAFETENSORS)

    if size < 8:
        raise fail(f"{size} bytes, shorter than its 8-byte header length (empty or truncated)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER:
            raise fail(f"header length {n} is absurd (safetensors allows at most 100 MB; corrupt or hostile)")
        if n > size - 8:
            raise fail(f"header length {n} is more than the {size - 8} bytes after it (truncated, or not "
                       "safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"header is not JSON ({type(e).__name__}: {str(e)[:120]}; corrupt or not safetensors)") from e
    if not isinstance(header, dict):
        raise fail("header is JSON but not an object (corrupt)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail("__metadata__ is not a map of strings (corrupt header)")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise fail(f"{what} lacks dtype, shape or data_offsets (corrupt header)")
        bits = SAFETENSORS_BITS.get(info["dtype"])
        if bits is None:
            raise fail(f"{what} has unknown dtype {info['dtype']!r} (corrupt header, or a newer safetensors)")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list):
            raise fail(f"{what} has shape {shape!r}, not a list (corrupt header)")
        numel = _numel(shape, path, "safetensors file", what, FIX_SAFETENSORS)
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[0] <= offsets[1] and all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise fail(f"{what} has data_offsets {offsets!r} (not [begin, end]; corrupt header)")
        begin, end = offsets
        if end > data_len:
            raise fail(f"{what} ends at byte {end} of the data section, which has {data_len} bytes (truncated, or "
                       "offsets beyond the file)")
        need = (numel * bits + 7) // 8
        if end - begin != need:
            raise fail(f"{what} holds {end - begin} bytes but shape {shape} of {info['dtype']} needs {need} "
                       "(corrupt header)")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            why = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise fail(f"tensor {name!r} starts at byte {begin} and {why} (corrupt header)")
        at = end
    if at != data_len:
        raise fail(f"the tensors use {at} bytes but the data section has {data_len} (corrupt, or bytes appended)")
    return at


def check_weights_folder(folder: Path) -> int:
    """Check every ``*.safetensors`` of an HF folder; refuse a folder whose only weights are pickles.

    Pickle weights (``pytorch_model.bin``, ``.pt``, ...) are never opened: unpickling runs
    whatever code the file names. Returns the bytes of tensor data in the folder.
    """
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        why = f" (found {', '.join(pickles)}: pickle files, which can run code when loaded)" if pickles else ""
        raise ModelError(
            f"{folder} has no .safetensors weights{why}; edgekit only loads safetensors or GGUF and pickle weights "
            "are never loaded: convert to safetensors on a trusted machine with transformers' "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    return sum(check_safetensors(w) for w in weights)


# --------------------------------------------------------------------------- GGUF

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Header:
    """Reads a file front to back through a bounded window; every read and skip is checked against its size."""

    CHUNK = 1 << 20

    def __init__(self, f, size: int, path: Path, order: str = "<"):
        self.f, self.size, self.path, self.order = f, size, path, order
        self.buf, self.start, self.pos = b"", 0, 0
        self.where = "the header"

    def fail(self, what: str) -> ModelError:
        return _bad(self.path, "GGUF", what, FIX_GGUF)

    def _need(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated in {self.where} (needs {n} bytes at byte {self.pos}, the file has "
                            f"{self.size})")

    def read(self, n: int) -> bytes:
        self._need(n)
        off = self.pos - self.start
        if off < 0 or off + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf, self.start, off = self.f.read(max(n, self.CHUNK)), self.pos, 0
        self.pos += n
        return self.buf[off:off + n]

    def skip(self, n: int) -> None:
        self._need(n)
        self.pos += n

    def unpack(self, fmt: str):
        fmt = self.order + fmt
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def string(self, limit: int | None = MAX_GGUF_NAME, what: str = "a name") -> str | None:
        """A GGUF string; with ``limit=None`` it is skipped (seeked over), never read."""
        n = self.u64()
        if n > self.size - self.pos:
            raise self.fail(f"{what} in {self.where} claims {n} bytes but only {self.size - self.pos} remain "
                            "(truncated or hostile length)")
        if limit is None:
            self.skip(n)
            return None
        if n > limit:
            raise self.fail(f"{what} in {self.where} is {n} bytes long (at most {limit}; corrupt)")
        return self.read(n).decode("utf-8", "replace")


def _gguf_value(h: _Header, vtype: int, depth: int = 0):
    """Read one metadata value: a scalar or a string; an array is walked and skipped (returns its length)."""
    if vtype in _GGUF_SCALARS:
        return h.unpack(_GGUF_SCALARS[vtype])[0]
    if vtype == _GGUF_STRING:  # a string value (a name, a chat template) is at most the file's size: _need checks
        return h.string(limit=h.size, what="a string value")
    if vtype == _GGUF_ARRAY:
        if depth > 2:
            raise h.fail(f"arrays nested more than 3 deep in {h.where} (corrupt)")
        itype, count = h.u32(), h.u64()
        if count > MAX_GGUF_ARRAY:
            raise h.fail(f"an array in {h.where} claims {count} elements (at most {MAX_GGUF_ARRAY}; corrupt or "
                         "hostile)")
        if itype in _GGUF_SCALARS:
            h.skip(count * struct.calcsize(_GGUF_SCALARS[itype]))
        elif itype == _GGUF_STRING:
            if count * 8 > h.size - h.pos:
                raise h.fail(f"an array of {count} strings in {h.where} cannot fit in the file (truncated or hostile)")
            for _ in range(count):
                h.string(limit=None, what="a string in an array")
        elif itype == _GGUF_ARRAY:
            for _ in range(count):
                _gguf_value(h, _GGUF_ARRAY, depth + 1)
        else:
            raise h.fail(f"an array in {h.where} has unknown element type {itype} (corrupt)")
        return count
    raise h.fail(f"unknown metadata value type {vtype} in {h.where} (corrupt)")


def check_gguf(path: Path) -> int:
    """Check a GGUF's header, metadata and tensor table against its size; return the bytes of tensor data.

    Magic ``GGUF``, version 2 or 3, sane tensor and key counts, every string and array
    within the file, every tensor with at most 4 non-negative dims (at most 2^40 elements),
    a known ggml type whose block divides its rows, an aligned offset, no overlap, and its
    data inside the file after the (``general.alignment``-padded) tensor table.
    """
    return gguf_table(path)["data_bytes"]


def gguf_table(path: Path) -> dict:
    """:func:`check_gguf`'s walk, with what it read: ``{metadata, arrays, tensors, data_bytes}``.

    ``metadata`` maps each scalar or string key to its value, ``arrays`` each array key to its
    length (the contents are skipped), ``tensors`` lists ``{name, type, shape, nbytes}`` in file
    order (``type`` a lowercase ggml type name, ``shape`` in ggml order: ``shape[0]`` is the row).

    Written by hand rather than with gguf-py's GGUFReader, which builds a numpy view of every
    element of every array: a 262k-token vocabulary (Gemma 3) costs it ~18 s per read on a
    2-core CPU, this walk well under a second, and it refuses a bad header with one line.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = _size(path, FIX_GGUF)
    with open(path, "rb") as f:
        h = _Header(f, size, path)
        magic = h.read(4) if size >= 4 else b""
        if magic != b"GGUF":
            raise h.fail(f"not a GGUF file (starts with {magic!r}, not b'GGUF'; corrupt or another format)")
        raw = h.read(4)
        version = struct.unpack("<I", raw)[0]
        if version not in (2, 3) and struct.unpack(">I", raw)[0] in (2, 3):
            h.order, version = ">", struct.unpack(">I", raw)[0]
        if version not in (2, 3):
            raise h.fail(f"GGUF version {version} is not supported (edgekit reads versions 2 and 3; "
                         "version 1 files are obsolete, anything else is corrupt)")
        n_tensors, n_kv = h.u64(), h.u64()
        for what, n in (("tensor count", n_tensors), ("metadata key count", n_kv)):
            if n > MAX_GGUF_COUNT:
                raise h.fail(f"{what} {n} is absurd (at most {MAX_GGUF_COUNT}; corrupt or hostile header)")
        alignment = 32
        keys, metadata, arrays = set(), {}, {}
        for i in range(n_kv):
            h.where = f"metadata entry {i + 1} of {n_kv}"
            key = h.string(what="a metadata key")
            if key in keys:
                raise h.fail(f"metadata key {key!r} appears twice (corrupt)")
            keys.add(key)
            h.where = f"metadata {key!r}"
            vtype = h.u32()
            value = _gguf_value(h, vtype)
            (arrays if vtype == _GGUF_ARRAY else metadata)[key] = value
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1):
                    raise h.fail(f"general.alignment is {value!r} (must be a power of two stored as uint32; corrupt)")
                alignment = value
        tensors, offsets, names = [], [], set()
        for i in range(n_tensors):
            h.where = f"tensor info {i + 1} of {n_tensors}"
            name = h.string(what="a tensor name")
            if name in names:
                raise h.fail(f"tensor {name!r} appears twice (corrupt)")
            names.add(name)
            h.where = f"tensor info {name!r}"
            n_dims = h.u32()
            if n_dims > GGML_MAX_DIMS:
                raise h.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows at most {GGML_MAX_DIMS}; corrupt)")
            dims = list(h.unpack(f"{n_dims}Q")) if n_dims else []
            numel = _numel(dims, path, "GGUF", f"tensor {name!r}", FIX_GGUF)
            ttype, offset = h.u32(), h.u64()
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise h.fail(f"tensor {name!r} has unknown ggml type {ttype} (corrupt, or a type newer than gguf "
                             "0.19 knows)") from None
            if dims and dims[0] % block:
                raise h.fail(f"tensor {name!r} has rows of {dims[0]} elements, not a multiple of its type's block "
                             f"of {block} (corrupt)")
            if offset % alignment:
                raise h.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment "
                             f"{alignment} (corrupt)")
            tensors.append({"name": name, "type": GGMLQuantizationType(ttype).name.lower(), "shape": dims,
                            "nbytes": numel // block * type_size})
            offsets.append(offset)
    data_start = -(-h.pos // alignment) * alignment
    total, at = 0, 0
    for offset, nbytes, name in sorted((o, t["nbytes"], t["name"]) for o, t in zip(offsets, tensors)):
        if offset < at:
            raise h.fail(f"tensor {name!r} at data offset {offset} overlaps the tensor before it (corrupt)")
        end = data_start + offset + nbytes
        if end > size:
            raise h.fail(f"tensor {name!r} needs bytes up to {end} but the file has {size} (truncated, or the "
                         "header claims more data than there is)")
        at, total = offset + nbytes, total + nbytes
    return {"metadata": metadata, "arrays": arrays, "tensors": tensors, "data_bytes": total}


# --------------------------------------------------------------------------- ONNX


def _onnx_bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type; None where the byte count is not a fixed product (strings)."""
    import onnx

    T = onnx.TensorProto
    packed = {T.INT4: 4, T.UINT4: 4, T.FLOAT4E2M1: 4}
    for name, bits in (("INT2", 2), ("UINT2", 2)):
        if hasattr(T, name):
            packed[getattr(T, name)] = bits
    if data_type in packed:
        return packed[data_type]
    if data_type in (T.STRING, T.UNDEFINED) or data_type in {getattr(T, n, -1) for n in ("FLOAT6E2M3", "FLOAT6E3M2")}:
        return None
    try:
        return 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _onnx_typed_count(t) -> tuple[int, int] | None:
    """(elements in the typed field that holds ``t``'s data, elements ``t``'s shape needs per element), or None."""
    import onnx

    T = onnx.TensorProto
    fields = {T.FLOAT: ("float_data", 1), T.COMPLEX64: ("float_data", 2), T.DOUBLE: ("double_data", 1),
              T.COMPLEX128: ("double_data", 2), T.INT64: ("int64_data", 1), T.UINT32: ("uint64_data", 1),
              T.UINT64: ("uint64_data", 1), T.STRING: ("string_data", 1)}
    for dt in (T.INT32, T.INT16, T.INT8, T.UINT16, T.UINT8, T.BOOL, T.FLOAT16, T.BFLOAT16):
        fields[dt] = ("int32_data", 1)
    if t.data_type not in fields:
        return None
    name, per = fields[t.data_type]
    return len(getattr(t, name)), per


def _onnx_tensors(graph) -> Iterator[tuple[object, str]]:
    """Every TensorProto a graph holds: initializers, sparse ones, and node attributes, subgraphs included."""
    for t in graph.initializer:
        yield t, f"initializer {t.name!r}"
    for s in graph.sparse_initializer:
        yield s.values, f"sparse initializer {s.values.name!r}"
        yield s.indices, f"indices of sparse initializer {s.values.name!r}"
    for node in graph.node:
        yield from _onnx_node_tensors(node)


def _onnx_node_tensors(node) -> Iterator[tuple[object, str]]:
    for a in node.attribute:
        what = f"attribute {a.name!r} of node {node.name or node.op_type!r}"
        if a.HasField("t"):
            yield a.t, what
        for t in a.tensors:
            yield t, what
        for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
            yield sparse.values, what
            yield sparse.indices, what
        if a.HasField("g"):
            yield from _onnx_tensors(a.g)
        for g in a.graphs:
            yield from _onnx_tensors(g)


def _external_file(folder: Path, location: str, path: Path, what: str) -> Path:
    """The external data file ``location`` names, refused unless it is a plain relative path inside ``folder``."""
    fix = f"{FIX_ONNX}; never run a model whose data points outside its folder"
    parts = location.replace("\\", "/").split("/")
    if (not location or "\x00" in location or PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive or ".." in parts):
        raise _bad(path, "ONNX model", f"{what} keeps its data at {location!r} (external data must be a relative "
                                       "path inside the model's folder; this one escapes it)", fix)
    data = folder / location
    root, real = os.path.realpath(folder), os.path.realpath(data)
    if os.path.commonpath([root, real]) != root:
        raise _bad(path, "ONNX model", f"{what} keeps its data at {location!r}, a link to {real} outside the "
                                       "model's folder (external data must stay inside it)", fix)
    return data


def check_onnx(path: Path) -> int:
    """Check an ONNX model before onnxruntime sees it; return the bytes of tensor data it holds.

    The protobuf must parse (external data is not loaded); every tensor -- initializers and
    node attributes, subgraphs included -- has non-negative dims (at most 2^40 elements) and
    holds exactly the bytes its shape needs; external data must name a relative path inside
    the model's folder (no ``..``, no absolute path, no symlink out), exist, and hold
    ``offset + length`` bytes.
    """
    return _read_onnx(Path(path))[1]


def load_checked_onnx(path: Path):
    """The ONNX ``ModelProto`` of ``path`` (external data not loaded), after :func:`check_onnx`'s checks."""
    return _read_onnx(Path(path))[0]


def _read_onnx(path: Path):
    import onnx

    size = _size(path, FIX_ONNX)

    def fail(what: str) -> ModelError:
        return _bad(path, "ONNX model", what, FIX_ONNX)

    if size == 0:
        raise fail("empty file (0 bytes: the export was interrupted)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx others, for a damaged file
        text = str(e).strip().splitlines()
        raise fail(f"the protobuf does not parse ({type(e).__name__}"
                   + (f": {text[0][:200]}" if text else "") + "; truncated or corrupt)") from e
    if not model.HasField("graph"):
        raise fail("it parses but holds no graph (truncated, corrupt or another format)")
    folder = path.parent
    sizes: dict[Path, int] = {}
    total = 0

    def all_tensors():
        yield from _onnx_tensors(model.graph)
        for fn in model.functions:
            for node in fn.node:
                yield from _onnx_node_tensors(node)

    for t, what in all_tensors():
        dims = list(t.dims)
        numel = _numel(dims, path, "ONNX model", what, FIX_ONNX)
        bits = _onnx_bits(t.data_type)
        need = None if bits is None else (numel * bits + 7) // 8
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {}
            for e in t.external_data:
                # protobuf hands back bytes, not str, for a string field that is not valid UTF-8
                if not isinstance(e.key, str) or not isinstance(e.value, str):
                    raise fail(f"{what} has an external data entry that is not UTF-8 text (corrupt)")
                info[e.key] = e.value
            data = _external_file(folder, info.get("location", ""), path, what)
            try:
                offset = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else None
            except ValueError:
                raise fail(f"{what} has external offset {info.get('offset')!r} and length {info.get('length')!r}, "
                           "not integers (corrupt)") from None
            if data not in sizes:
                sizes[data] = data.stat().st_size if data.is_file() else -1
            if sizes[data] < 0:  # "is incomplete": the wording edgekit.export.onnx has always used
                raise ModelError(f"{path} is incomplete (external data file {info['location']} is missing; {what} "
                                 f"needs it); {FIX_ONNX}")
            if offset < 0 or (length is not None and length < 0):
                raise fail(f"{what} has a negative external offset or length (corrupt)")
            length = sizes[data] - offset if length is None else length
            if offset + length > sizes[data]:
                raise ModelError(f"{path} is incomplete (external data file {info['location']} is shorter than "
                                 f"{what} needs: bytes {offset}..{offset + length} of {sizes[data]}); {FIX_ONNX}")
            if need is not None and length != need:
                raise fail(f"{what} has {length} bytes of external data but its shape {dims} needs {need} (corrupt)")
            total += length
        elif t.HasField("raw_data"):
            if need is not None and len(t.raw_data) != need:
                raise fail(f"{what} holds {len(t.raw_data)} bytes but its shape {dims} needs {need} (truncated or "
                           "corrupt)")
            total += len(t.raw_data)
        else:
            typed = _onnx_typed_count(t)
            if typed is not None and not t.HasField("segment") and typed[0] != numel * typed[1]:
                raise fail(f"{what} holds {typed[0]} values but its shape {dims} needs {numel * typed[1]} "
                           "(truncated or corrupt)")
            total += need or 0
    return model, total


# --------------------------------------------------------------------------- ExecuTorch

PTE_IDENTIFIER = b"ET12"  # executorch 1.x schema/program.fbs: file_identifier "ET12"
PTE_EXTENDED_HEADER = b"eh00"  # exir/_serialize/_program.py: _ExtendedHeader, right after the identifier


def check_pte(path: Path) -> int:
    """Check an ExecuTorch ``.pte``: its flatbuffer identifier and, when present, the extended header's sizes.

    Returns the file's size. ExecuTorch's loader then verifies the flatbuffer itself
    (``Verification.InternalConsistency``); this is the fast pre-check with a clean message.
    """
    path = Path(path)
    size = _size(path, FIX_PTE)

    def fail(what: str) -> ModelError:
        return _bad(path, "ExecuTorch program", what, FIX_PTE)

    if size < 8:
        raise fail(f"{size} bytes (empty or truncated)")
    with open(path, "rb") as f:
        head = f.read(64)
    ident = head[4:8]
    if ident != PTE_IDENTIFIER:
        raise fail(f"bytes 4..8 are {ident!r}, not {PTE_IDENTIFIER!r} (" + (
            "written for another ExecuTorch schema version than this runtime's" if ident[:2] == b"ET" else
            "corrupt, or not a .pte") + ")")
    (root,) = struct.unpack("<I", head[:4])
    program_size = size
    if head[8:12] == PTE_EXTENDED_HEADER and len(head) >= 40:
        _, program_size, seg_base, seg_size = struct.unpack("<IQQQ", head[12:40])
        if program_size > size:
            raise fail(f"the program is {program_size} bytes but the file has {size} (truncated)")
        if seg_base and (seg_base < program_size or seg_base + seg_size > size):
            raise fail(f"its data segments need bytes {seg_base}..{seg_base + seg_size} but the file has {size} "
                       "(truncated or corrupt)")
    if root >= program_size:
        raise fail(f"the flatbuffer root at byte {root} lies outside the {program_size}-byte program (truncated or "
                   "corrupt)")
    return size


# --------------------------------------------------------------------------- any model path


def check_model_path(path: Path) -> int:
    """Check whatever model files ``path`` is or holds (.gguf, .onnx, .pte, .safetensors); return their data bytes.

    A folder is checked file by file: every ``*.gguf``, ``*.onnx`` and ``*.pte`` in it, and its
    safetensors weights (a folder with ``config.json`` and only pickle weights is refused).
    """
    path = Path(path)
    checks = {".gguf": check_gguf, ".onnx": check_onnx, ".pte": check_pte, ".safetensors": check_safetensors}
    if path.is_file():
        check = checks.get(path.suffix)
        return check(path) if check else 0
    if not path.is_dir():
        raise ModelError(f"{path} is missing; pass an export folder or a model file")
    models = [p for suffix in (".gguf", ".onnx", ".pte") for p in sorted(path.glob(f"*{suffix}"))]
    total = sum(checks[p.suffix](p) for p in models)
    if (path / "config.json").is_file() and not models:
        return total + check_weights_folder(path)
    return total + sum(check_safetensors(p) for p in sorted(path.glob("*.safetensors")))
