"""User data: the files a user points edgekit at, read into examples.

An example is a chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` or plain
``{"text": ...}``. :func:`load_examples` reads JSONL records, ``.txt``/``.md`` paragraphs
and folders saved by ``datasets.Dataset.save_to_disk``; every error names the file (and
line), the setting the path came from, and the fix. Distillation data, calibration text
and evaluation text are all read here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgekit.artifact import user_path
from edgekit.errors import ConfigError

ROLES = ("system", "user", "assistant")
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (".jsonl", *TEXT_SUFFIXES)


def load_examples(paths: Iterable[Path], key: str = "data.sources (--data)") -> list[dict]:
    """Read user data into examples: ``{"messages": [...]}`` or ``{"text": ...}``.

    ``key`` is the setting the paths came from (``--calibration``, ``--text`` ...); errors name it
    together with the file (and line) and the fix.

    Accepted sources, each a path in ``data.sources``:

    - ``.jsonl``, one record a line: ``{"prompt": ...}`` (the teacher answers it),
      ``{"prompt": ..., "response": ...}``, ``{"messages": [{"role", "content"}, ...]}``
      or ``{"text": ...}``; other keys (ids, metadata) are ignored;
    - ``.txt`` / ``.md``: one ``{"text"}`` example per paragraph (blank-line separated);
    - a folder saved with ``datasets``' ``save_to_disk`` (rows of the same shapes as JSONL,
      every split); needs the optional ``datasets`` package;
    - any other folder: every supported file under it, in sorted order.
    """
    examples = []
    for path in paths:
        path = user_path(path)
        if not path.exists():
            raise ConfigError(f"data source {path} does not exist; fix the path in {key}")
        if path.is_dir() and _is_hf_dataset(path):
            examples += _load_hf_dataset(path, key)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not files:
                raise ConfigError(f"data source {path} is a folder with no {', '.join(SUPPORTED_SUFFIXES)} files and "
                                  f"is not a saved `datasets` folder; point {key} at the data files")
            for f in files:
                examples += _load_file(f, key)
        else:
            examples += _load_file(path, key)
    return examples


def check_sources(sources: Sequence[Path], key: str = "data.sources (--data)") -> list[dict]:
    """:func:`load_examples`, refusing sources that hold no example at all (ConfigError naming them)."""
    examples = load_examples(sources, key)
    if not examples:
        raise ConfigError(f"{key} {[str(s) for s in sources]} hold no examples; add data to them")
    return examples


def needs_response(example: dict) -> bool:
    """True for a chat example whose last turn is not the assistant's (a prompt awaiting an answer)."""
    return "messages" in example and example["messages"][-1]["role"] != "assistant"


def _load_file(path: Path, key: str = "data.sources (--data)") -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ConfigError(f"data source {path} has an unsupported type {suffix or '(no suffix)'}; use "
                          f"{', '.join(SUPPORTED_SUFFIXES)} or a folder saved with datasets' save_to_disk")
    text = _read_text(path, key)
    if suffix in TEXT_SUFFIXES:
        return [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                              'file must be one JSON object, e.g. {"prompt": "..."}') from e
        examples.append(_normalise_record(record, f"{path}:{lineno}"))
    return examples


def _read_text(path: Path, key: str = "data.sources (--data)") -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read data source {path}: {e.strerror or e}; check its permissions or fix the path "
                          f"in {key}") from e
    if not data.strip():
        raise ConfigError(f"data source {path} is empty; put examples in it or remove it from {key}")
    if b"\x00" in data[:8192]:
        raise ConfigError(f"data source {path} is a binary file (it holds NUL bytes), not {path.suffix or 'text'} "
                          f"text; point {key} at the JSONL/text file you meant")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"data source {path} is not UTF-8 text (line {line}, byte {e.start}: {e.reason}); re-save it "
                          f"as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed{path.suffix}`") from e


def _normalise_record(record: object, where: str) -> dict:
    """One JSONL line or dataset row as an example; ``where`` names it in errors (``file:line``)."""
    shapes = ('{"prompt"}, {"prompt", "response"}, {"messages": [{"role", "content"}, ...]} or {"text"}')
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}; write one of {shapes}")
    primary = [k for k in ("messages", "prompt", "text") if k in record]
    if len(primary) != 1 or ("response" in record and primary != ["prompt"]):
        renames = [f"{k} to {_RENAME[k]}" for k in sorted(record) if k in _RENAME and _RENAME[k] not in record]
        hint = f" (rename {', '.join(renames)})" if renames and not primary else ""
        raise ConfigError(f"{where}: unknown record shape with keys {sorted(record)}; expected {shapes}{hint}")
    key = primary[0]
    if key == "messages":
        return {"messages": _check_messages(record["messages"], where)}
    for k in (key, "response"):
        if k in record and (not isinstance(record[k], str) or not record[k].strip()):
            raise ConfigError(f"{where}: {k!r} must be a non-empty string; fix or remove that record")
    if key == "text":
        return {"text": record["text"]}
    messages = [{"role": "user", "content": record["prompt"]}]
    if "response" in record:
        messages.append({"role": "assistant", "content": record["response"]})
    return {"messages": messages}


_RENAME = {"instruction": "prompt", "question": "prompt", "query": "prompt", "input": "prompt", "output": "response",
           "answer": "response", "completion": "response", "content": "text", "conversations": "messages"}


def _check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] is {json.dumps(m)[:80]}; each message needs a role "
                              f"({', '.join(ROLES)}) and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _load_hf_dataset(path: Path, key: str = "data.sources (--data)") -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"data source {path} is a saved Hugging Face `datasets` folder, but the `datasets` package "
                          "is not installed; run `pip install datasets`, or export the data to .jsonl") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, pyarrow errors)
        raise ConfigError(f"cannot read the saved dataset {path} ({e}); re-save it with save_to_disk") from e
    splits = {name: ds[name] for name in sorted(ds)} if isinstance(ds, dict) else {"": ds}
    examples = []
    for name, split in splits.items():
        label = f"{path}[{name}]" if name else str(path)
        for i, row in enumerate(split):
            examples.append(_normalise_record(dict(row), f"{label} row {i}"))
    if not examples:
        raise ConfigError(f"data source {path} is an empty dataset; add rows or remove it from {key}")
    return examples
