"""Hugging Face model folders, read without torch: which files travel with a model, its JSON files, and the
special tokens generation stops on. Every exporter, the distillation stages and the bundles copy and read
folders through here, so a new format reuses them instead of importing another exporter.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from edgekit.errors import ModelError

log = logging.getLogger(__name__)

# The files that travel with a model's weights: configs, tokenizer, chat template.
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "NOTICE")

# A tokenizer's files, as transformers saves them (what students and bundles copy beside a model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

# A model's terms that must travel with everything made from it: ``NOTICE`` in a model folder, whose first
# line is ``License: <id>``. Known licenses whose terms require a notice, with the notice they require.
NOTICE_FILE = "NOTICE"
NOTICES = {
    # Gemma Terms of Use, section 3.1: redistributions must carry this notice.
    "gemma": "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
}


def notice_text(license: str | None, extra: str = "") -> str | None:
    """The NOTICE file for a model under ``license``, or None when the license needs none."""
    body = NOTICES.get((license or "").lower())
    if body is None:
        return None
    return f"License: {license}\n{body}\n" + (f"{extra}\n" if extra else "")


def read_notice(folder: Path) -> tuple[str | None, str | None]:
    """(license, notice text) from a folder's NOTICE file, or (None, None)."""
    path = Path(folder) / NOTICE_FILE
    if not path.is_file():
        return None, None
    text = path.read_text(encoding="utf-8", errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    return (first.split(":", 1)[1].strip() if first.lower().startswith("license:") else None), text

# End-of-turn tokens of the chat formats edgekit knows (ChatML, Llama 3, Phi, Gemma, OpenChat).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def worth_copying(path: Path) -> bool:
    """False for a ``tokenizer.model`` that is really a copy of a GGUF file.

    transformers' ``save_pretrained`` of a tokenizer loaded from a GGUF writes the whole GGUF
    (weights included: 98 MB for the embedded teacher) as ``tokenizer.model``; tokenizer.json
    holds the tokenizer, so exports, students and bundles leave that copy behind.
    """
    if path.name != "tokenizer.model":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) != b"GGUF"
    except OSError:
        return True


def read_json(path: Path, required: bool = True, needed: str = "a model folder needs it") -> dict:
    """A model folder's JSON file; missing (when ``required``) or broken gives one ModelError line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        if not required:
            return {}
        raise ModelError(f"{path} is missing; {needed}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); restore or re-download it") from e


def copy_hf_files(model_dir: Path, out: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Copy the tokenizer, config and generation files; files named in ``keep`` that ``out`` has stay."""
    model_dir, out = Path(model_dir), Path(out)
    copied = []
    for name in HF_FILES:
        src = model_dir / name
        if src.is_file() and worth_copying(src) and not (name in keep and (out / name).is_file()):
            shutil.copy2(src, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        log.warning("%s has no tokenizer.json: runtimes will not be able to tokenize text", model_dir)
    return copied


def chat_template_text(model_dir: Path) -> str:
    """The folder's chat template source (chat_template.jinja, else tokenizer_config.json's), or ''."""
    path = Path(model_dir) / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    template = read_json(Path(model_dir) / "tokenizer_config.json", required=False).get("chat_template") or ""
    return template if isinstance(template, str) else json.dumps(template)


def special_vocab(model_dir: Path) -> dict[str, int]:
    """The tokenizer's added (special) tokens: text -> id."""
    tokens = read_json(Path(model_dir) / "tokenizer.json", required=False).get("added_tokens", [])
    return {t["content"]: t["id"] for t in tokens if "content" in t and "id" in t}


def special_token_ids(model_dir: Path) -> tuple[int, list[int], int]:
    """(bos, eos ids, pad) for generation: config and generation_config eos plus the chat end-of-turn token.

    A chat model ends each assistant turn with a token such as ``<|im_end|>`` that config.json
    does not always list as eos; without it generation runs on into invented next turns.
    """
    model_dir = Path(model_dir)
    cfg = read_json(model_dir / "config.json", needed="an HF model folder needs it to export")
    gen = read_json(model_dir / "generation_config.json", required=False)
    vocab = special_vocab(model_dir)
    eos: list[int] = []
    for value in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    template = chat_template_text(model_dir)
    for token in END_OF_TURN:
        if token in template and token in vocab and vocab[token] not in eos:
            eos.append(vocab[token])
    if not eos:
        raise ModelError(
            f"{model_dir / 'config.json'} names no eos_token_id and the chat template has no known end-of-turn "
            "token; set eos_token_id in config.json or generation_config.json"
        )
    bos = next((v for v in (cfg.get("bos_token_id"), gen.get("bos_token_id")) if isinstance(v, int)), eos[0])
    pad = next((v for v in (cfg.get("pad_token_id"), gen.get("pad_token_id")) if isinstance(v, int)), eos[0])
    return bos, eos, pad


def copy_tokenizer(src: Path, dst: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> None:
    """Copy the tokenizer files of ``names`` that ``src`` holds (and that are worth copying) into ``dst``."""
    for n in names:
        if (Path(src) / n).is_file() and worth_copying(Path(src) / n):
            shutil.copyfile(Path(src) / n, Path(dst) / n)
