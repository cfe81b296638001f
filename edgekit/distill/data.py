"""The data stage of distillation: user data or synthetic prompts, teacher responses, a held-out split.

``run(cfg, teacher_dir, out_dir)`` writes an artifact folder with ``train.jsonl``,
``heldout.jsonl`` and ``manifest.json``. Each line is one example, either a chat
``{"messages": [{"role": ..., "content": ...}, ...]}`` or plain ``{"text": ...}``;
examples the teacher answered also carry ``score`` (its mean log-probability per
response token) and ``truncated`` (no end-of-turn within ``max_new_tokens``).

Where the examples come from:

- ``sources`` (user data): JSONL records, ``.txt``/``.md`` paragraphs, or a
  folder saved by ``datasets.Dataset.save_to_disk`` (see :func:`load_examples`).
- no sources: prompts synthesised from the teacher itself with the Magpie method
  (:func:`synthesize_prompts`).

Prompts without an answer get one from the teacher (:func:`generate_responses`,
sequence-level KD), with rejection sampling when ``samples_per_prompt > 1``.
Generation is resumable: finished prompts are appended to
``<out_dir>.inprogress/generated.jsonl`` after each batch, so a killed run loses
at most one batch and a re-run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


from edgekit import artifact
from edgekit.distill.config import DataConfig
from edgekit.errors import CacheError, ConfigError, ModelError
from edgekit.progress import bar

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (".jsonl", *TEXT_SUFFIXES)

DEFAULT_SYSTEM = "You are a helpful AI assistant."
COT_INSTRUCTION = "Think step by step: reason through the problem first, then give your final answer."
MAX_PROMPT_TOKENS = 64  # Magpie prompts that do not end within this many tokens are dropped
MAX_PROMPT_WORDS = 200
NGRAM = 3
MAX_REPEATED_NGRAM_RATIO = 0.3  # share of word trigrams that repeat an earlier one
SCORE_BATCH = 4  # rows per scoring forward pass (bounds the logits tensor: rows x tokens x vocab)
_SENTINEL = "\u2063EDGEKIT_SENTINEL\u2063"
_REFUSAL = re.compile(r"^(i'?m sorry|i am sorry|i cannot|i can'?t|i can not|as an ai\b|i'?m an ai\b|"
                      r"i am an ai\b|i'?m unable|i am unable)")
_ASSISTANT_VOICE = ("how can i help you", "how can i assist you", "how may i help you", "how may i assist you")


# --------------------------------------------------------------------------- user data


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
        path = Path(path).expanduser()
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


# --------------------------------------------------------------------------- chat template facts


@dataclass(frozen=True)
class _Chat:
    """What the tokenizer's chat template says about turns: the end-of-turn text and the ids that stop generation."""

    eot_text: str
    stop_ids: frozenset[int]
    pad_id: int


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return apply_chat_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def apply_chat_template(tokenizer, messages: list[dict], **kwargs):
    """``tokenizer.apply_chat_template``, with a hostile or broken template turned into a ModelError naming its file.

    transformers renders chat templates in Jinja's ``ImmutableSandboxedEnvironment``: a template
    that reaches for Python internals (``__class__``, ``__globals__``, ``list.append`` ...) raises
    ``SecurityError`` there before anything runs. Every edgekit caller renders through this function.
    """
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (SecurityError, OverflowError) as e:
        raise ModelError(f"the chat template in {chat_template_file(tokenizer)} tried something the Jinja sandbox "
                         f"forbids ({e}); it was refused and nothing ran. Do not use this model as is: replace that "
                         "template with a known one (e.g. the base model's) or remove it") from e
    except TemplateError as e:
        raise ModelError(f"the chat template in {chat_template_file(tokenizer)} failed to render "
                         f"({type(e).__name__}: {e}); fix that template or replace it with the base model's") from e


def chat_template_file(tokenizer) -> str:
    """Where a tokenizer's chat template comes from: chat_template.jinja, else tokenizer_config.json, in its folder."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return str(folder) if str(folder) != "." else "(the tokenizer in memory)"


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer in {tokenizer.name_or_path or '(in memory)'} has no chat template, so chat "
                         "prompts cannot be rendered; use an instruct/chat teacher (its tokenizer_config.json or "
                         "chat_template.jinja defines one), or give data.sources with {\"text\"} records only")


def _chat_format(tokenizer, model=None) -> _Chat:
    """Find the end-of-turn token by rendering an assistant turn and reading what follows its content."""
    _require_template(tokenizer)
    text = _render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}])
    tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    stop_ids, eot_text = set(), ""
    if tail_ids and tail_ids[0] in special:
        stop_ids.add(tail_ids[0])
        eot_text = tokenizer.decode([tail_ids[0]])
        if not tail.startswith(eot_text):
            eot_text = ""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for extra in (eos if isinstance(eos, list) else [eos]) + [tokenizer.eos_token_id]:
        if extra is not None:
            stop_ids.add(int(extra))
    if not stop_ids:
        raise ModelError(f"cannot tell where a turn ends for the tokenizer in {tokenizer.name_or_path}: its chat "
                         "template adds no special token after an assistant turn and it has no eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    return _Chat(eot_text=eot_text, stop_ids=frozenset(stop_ids), pad_id=pad)


def _encode(tokenizer, text: str) -> list[int]:
    # Chat templates put any BOS in the text themselves; the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- sampling and scoring


def _sample(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
            stop_ids: frozenset[int], pad_id: int, num_return_sequences: int = 1) -> list[tuple[list[int], int | None]]:
    """Sample continuations of left-padded prompts; per row: (tokens before the first stop token, that stop
    token or None if none came within ``max_new_tokens``).

    Rows come out prompt-major: prompt 0's ``num_return_sequences`` samples first.
    """
    import torch

    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompt_ids):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(stop_ids), pad_token_id=pad_id,
                             num_return_sequences=num_return_sequences, **sampling)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row, None) if cut is None else (row[:cut], row[cut]))
    return results


def _score(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
    """The model's mean log-probability per response token, given the prompt (one forward pass per few rows)."""
    import torch

    scores = []
    for start in range(0, len(prompt_ids), SCORE_BATCH):
        prompts, responses = prompt_ids[start:start + SCORE_BATCH], response_ids[start:start + SCORE_BATCH]
        rows = [p + r for p, r in zip(prompts, responses)]
        width = max(len(r) for r in rows)
        keep = max(len(r) for r in responses) + 1  # logits at the position before each response token
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every response ends in the last column
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, width - keep + 1:]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for i, r in enumerate(responses):
            scores.append(token_lp[i, keep - 1 - len(r):].mean().item() if r else -math.inf)
    return scores


def repeated_ngram_ratio(text: str, n: int = NGRAM) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied text, near 1 for a loop."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _non_printable(text: str) -> bool:
    return "\ufffd" in text or any(
        unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn", "Cs") and c not in "\n\t\r" for c in text)


def _normalise_text(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key for duplicates and echoes."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# --------------------------------------------------------------------------- synthetic prompts (Magpie)


def prompt_problem(text: str, system_prompt: str = DEFAULT_SYSTEM, max_words: int = MAX_PROMPT_WORDS) -> str | None:
    """Why a synthesised prompt is unusable (``too_short``, ``too_long``, ``non_printable``, ``repetitive``,
    ``refusal``, ``echo``), or None if it is fine."""
    words = text.split()
    lowered = text.strip().lower().replace("\u2019", "'")
    norm, norm_system = _normalise_text(text), _normalise_text(system_prompt)
    if len(words) < 3:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if _non_printable(text):
        return "non_printable"
    if repeated_ngram_ratio(text) > MAX_REPEATED_NGRAM_RATIO:
        return "repetitive"
    if _REFUSAL.match(lowered):
        return "refusal"
    if (norm_system and (norm_system in norm or norm in norm_system)) or any(p in norm for p in _ASSISTANT_VOICE):
        return "echo"
    return None


def pre_query_prefix(tokenizer, system_prompt: str = DEFAULT_SYSTEM) -> str:
    """The chat text up to where a user's message starts (Magpie's "pre-query template").

    Rendered for [system, user] with a sentinel as the user content and cut at the
    sentinel, e.g. ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`` for ChatML.
    """
    _require_template(tokenizer)
    text = _render(tokenizer, [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}])
    if _SENTINEL not in text:
        raise ModelError(f"the chat template in {tokenizer.name_or_path} drops the user's message, so prompts cannot "
                         "be synthesised from it; give user data in data.sources instead")
    return text[:text.index(_SENTINEL)]


def synthesize_prompts(model, tokenizer, n: int, seed: int, batch_size: int, *,
                       max_new_tokens: int = MAX_PROMPT_TOKENS, temperature: float = 1.0, top_p: float = 1.0,
                       system_prompt: str = DEFAULT_SYSTEM, journal: Path | None = None,
                       stats: Counter | None = None) -> list[str]:
    """Up to ``n`` user prompts sampled from the teacher itself (Magpie, Xu et al. 2024).

    An aligned chat model given only the chat template's text up to the start of a
    user turn writes a plausible user message and ends the turn; that message is a
    prompt. Each round samples ``batch_size`` continuations (seeded by ``seed`` and
    the round number, so rounds replay identically), keeps those that ended the turn,
    pass :func:`prompt_problem` and are new after normalisation. Rounds stop at ``n``
    prompts or after ``4 x ceil(n / batch_size)`` rounds. ``journal`` (a JSONL file)
    records every round's raw samples, so an interrupted run replays them instead of
    sampling again. ``stats`` counts the rejections by reason.
    """
    import torch

    chat = _chat_format(tokenizer, model)
    prefix_ids = _encode(tokenizer, pre_query_prefix(tokenizer, system_prompt))
    stats = Counter() if stats is None else stats
    replay = [r["samples"] for r in artifact.read_journal(journal)] if journal else []
    prompts, seen = [], set()
    max_rounds = max(4, 4 * math.ceil(n / batch_size))
    with bar(total=n, desc="synthetic prompts", unit="prompt") as progress:
        for round_ in range(max_rounds):
            if len(prompts) >= n:
                break
            if round_ < len(replay):
                samples = replay[round_]
            else:
                torch.manual_seed(_seed_from(seed, "magpie", round_))
                samples = _sample_prompt_round(model, tokenizer, prefix_ids, chat, batch_size,
                                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
                if journal:
                    artifact.append_journal(journal, [{"round": round_, "samples": samples}], fault="data.journal")
            for text, stopped in samples:
                problem = "truncated" if not stopped else prompt_problem(text, system_prompt)
                key = _normalise_text(text)
                if problem is None and key in seen:
                    problem = "duplicate"
                if problem:
                    stats[problem] += 1
                    continue
                seen.add(key)
                prompts.append(text)
                progress.update(1)
                if len(prompts) >= n:
                    break
    stats["accepted"] += len(prompts)
    if len(prompts) < n:
        log.warning("the teacher gave only %d usable prompts of %d asked in %d rounds (rejected: %s); "
                    "raise data.batch_size or give user data in data.sources", len(prompts), n, max_rounds,
                    dict(stats))
    return prompts


def _sample_prompt_round(model, tokenizer, prefix_ids: list[int], chat: _Chat, n: int, *, max_new_tokens: int,
                         temperature: float, top_p: float) -> list[list]:
    """``n`` continuations of the pre-query prefix as ``[text, ended_the_turn]`` pairs."""
    rows = _sample(model, [prefix_ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   stop_ids=chat.stop_ids, pad_id=chat.pad_id, num_return_sequences=n)
    return [[tokenizer.decode(ids, skip_special_tokens=True).strip(), stop is not None] for ids, stop in rows]


# --------------------------------------------------------------------------- teacher responses


def response_problem(text: str) -> str | None:
    """Why a teacher response is degenerate (``empty``, ``repetitive``), or None. Truncation is flagged, not fatal."""
    if not text.strip():
        return "empty"
    if repeated_ngram_ratio(text) > MAX_REPEATED_NGRAM_RATIO:
        return "repetitive"
    return None


def generate_responses(model, tokenizer, prompts: Sequence[str | list[dict]], cfg: DataConfig, *,
                       journal: Path | None = None, stats: Counter | None = None) -> list[dict]:
    """Teacher answers for prompts (sequence-level KD): ``{"messages": [..., assistant], "score", "truncated"}``.

    A prompt is a user message string or a message list ending in a user turn.
    Each prompt gets ``cfg.samples_per_prompt`` samples; each is scored by the
    teacher's own mean log-probability per response token (a forward pass), those
    that are empty or loop (:func:`response_problem`) are dropped, and the best of
    the rest is kept: complete answers before truncated ones (no end-of-turn within
    ``max_new_tokens``; kept but flagged), then the highest score. A prompt with no
    usable sample is dropped (counted in ``stats``).

    ``cfg.chain_of_thought`` appends :data:`COT_INSTRUCTION` to the last user turn
    that the teacher sees; the stored example keeps the original prompt, so the
    student learns to reason step by step without being asked.

    ``journal`` (a JSONL file) makes this resumable: prompts recorded there are not
    generated again, and each batch's results are appended and fsynced as it ends.
    Duplicate prompts are answered once.
    """
    stats = Counter() if stats is None else stats
    chat = _chat_format(tokenizer, model)
    unique = {_prompt_key(m): m for m in (_as_messages(p) for p in prompts)}
    done = _whole_groups(artifact.read_journal(journal)) if journal else {}
    pending = [m for k, m in unique.items() if k not in done]
    group_size = max(1, cfg.batch_size // cfg.samples_per_prompt)
    with bar(total=len(unique), desc="teacher responses", unit="prompt") as progress:
        progress.update(len(unique) - len(pending))
        for start in range(0, len(pending), group_size):
            began = time.perf_counter()
            records = _respond_group(model, tokenizer, pending[start:start + group_size], cfg, chat)
            for r in records:  # a group is sampled together, so it is resumed whole or not at all
                r.update(group=records[0]["key"], group_size=len(records))
            stats["generation_seconds"] += time.perf_counter() - began
            stats["generated_tokens"] += sum(r.pop("sampled_tokens", 0) for r in records)
            if journal:
                artifact.append_journal(journal, records, fault="data.journal")
            done.update((r["key"], r) for r in records)
            progress.update(len(records))
    examples = []
    for key in unique:
        record = done[key]
        stats.update({f"samples_rejected_{k}": v for k, v in record.get("degenerate", {}).items()})
        if record.get("example") is None:
            stats["prompts_rejected"] += 1
            continue
        stats["responses_kept"] += 1
        stats["responses_truncated"] += record["example"]["truncated"]
        examples.append(record["example"])
    return examples


def _whole_groups(records: list[dict]) -> dict[str, dict]:
    """Journal records by prompt key, leaving out groups a kill cut short.

    The prompts of a group are sampled in one batch from one seed, so a group whose records
    were only partly written must be sampled again whole: answering its missing prompts in
    a different batch would give different answers than an uninterrupted run.
    """
    sizes = Counter(r.get("group") for r in records if r.get("group") is not None)
    return {r["key"]: r for r in records
            if r.get("group") is None or sizes[r["group"]] == r.get("group_size", sizes[r["group"]])}


def _respond_group(model, tokenizer, group: list[list[dict]], cfg: DataConfig, chat: _Chat) -> list[dict]:
    """Sample, score and choose answers for a few prompts; one journal record per prompt."""
    import torch

    k = cfg.samples_per_prompt
    torch.manual_seed(_seed_from(cfg.seed, "respond", _prompt_key(group[0])))
    prompt_ids = [_encode(tokenizer, _render(tokenizer, _teacher_view(m, cfg), add_generation_prompt=True))
                  for m in group]
    rows = _sample(model, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, stop_ids=chat.stop_ids, pad_id=chat.pad_id, num_return_sequences=k)
    scored_prompts = [p for p in prompt_ids for _ in range(k)]
    # a finished sample is scored with its end-of-turn token: ending well is part of a good answer
    scores = _score(model, scored_prompts, [ids if stop is None else ids + [stop] for ids, stop in rows])
    records = []
    for i, messages in enumerate(group):
        candidates, degenerate = [], Counter()
        for j in range(i * k, (i + 1) * k):
            ids, stop = rows[j]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            problem = response_problem(text)
            if problem:
                degenerate[problem] += 1
            else:
                candidates.append({"text": text, "score": scores[j], "truncated": stop is None})
        best = choose_sample(candidates)
        example = None if best is None else {
            "messages": messages + [{"role": "assistant", "content": best["text"]}],
            "score": round(best["score"], 4), "truncated": best["truncated"]}
        records.append({"key": _prompt_key(messages), "example": example, "degenerate": dict(degenerate),
                        "sampled_tokens": sum(len(rows[j][0]) for j in range(i * k, (i + 1) * k))})
    return records


def choose_sample(candidates: list[dict]) -> dict | None:
    """The best non-degenerate sample: complete before truncated, then highest score; None if there is none."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: (not c["truncated"], c["score"]))


def _teacher_view(messages: list[dict], cfg: DataConfig) -> list[dict]:
    if not cfg.chain_of_thought:
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    view = [dict(m) for m in messages]
    view[last]["content"] = f"{view[last]['content']}\n\n{COT_INSTRUCTION}"
    return view


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not prompt or prompt[-1]["role"] != "user":
        raise ConfigError(f"a prompt must end with a user turn, got {json.dumps(prompt)[:120]}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _prompt_key(messages: list[dict]) -> str:
    """The prompt's identity for resuming: its user text, or the whole message list when there is more than one turn."""
    if len(messages) == 1:
        return messages[0]["content"]
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _seed_from(*parts: object) -> int:
    return int(artifact.content_id(*parts), 16) % (2**63)


# --------------------------------------------------------------------------- held-out split


def split_heldout(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): an example is held out when a hash of (seed, its prompt) falls below ``fraction``.

    The hash covers the prompt side only (non-assistant turns, or the text), so an
    example stays on its side when data is added or the teacher's answer changes,
    and answers to one prompt never straddle the split. The held-out share is
    ``fraction`` on average, not exactly. With ``fraction > 0`` and at least two
    examples neither side is empty (the lowest / highest hash is moved over).
    """
    hashes = [_split_hash(e, seed) for e in examples]
    held = [h < fraction for h in hashes]
    if fraction > 0 and len(examples) >= 2:
        if not any(held):
            held[min(range(len(hashes)), key=hashes.__getitem__)] = True
        if all(held):
            held[max(range(len(hashes)), key=hashes.__getitem__)] = False
    train = [e for e, h in zip(examples, held) if not h]
    heldout = [e for e, h in zip(examples, held) if h]
    return train, heldout


def _split_hash(example: dict, seed: int) -> float:
    if "messages" in example:
        content = [m for m in example["messages"] if m["role"] != "assistant"]
    else:
        content = example["text"]
    blob = json.dumps([seed, content], ensure_ascii=False, sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") / 2**64


# --------------------------------------------------------------------------- tokenization


def render_text(example: dict, tokenizer) -> str:
    """An example as the plain text the model reads: the chat template's rendering, or the text itself."""
    if "text" in example:
        return example["text"]
    _require_template(tokenizer)
    return _render(tokenizer, example["messages"])


def tokenize_example(example: dict, tokenizer, max_seq_len: int) -> dict:
    """``{"input_ids", "labels"}`` for training, cut to ``max_seq_len`` tokens.

    Chat examples are rendered with the tokenizer's chat template; labels are -100
    on system/user text and template markup, and the token ids on each assistant
    turn's content and its end-of-turn token (not on the end-of-turn of a
    ``truncated`` answer, which the teacher never ended). Text examples are
    tokenized without special tokens and every token is a label.
    """
    input_ids, labels = _tokenize(example, tokenizer, _eot_text(example, tokenizer))
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def tokenize_examples(examples: list[dict], tokenizer, max_seq_len: int) -> list[dict]:
    """:func:`tokenize_example` for a list, with one warning saying how many were cut to ``max_seq_len``."""
    out, cut, eot_text = [], 0, None
    for example in examples:
        if eot_text is None:
            eot_text = _eot_text(example, tokenizer)
        input_ids, labels = _tokenize(example, tokenizer, eot_text)
        cut += len(input_ids) > max_seq_len
        out.append({"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]})
    if cut:
        log.warning("%d of %d examples are longer than max_seq_len=%d tokens and were truncated; raise "
                    "data.max_seq_len to keep them whole", cut, len(examples), max_seq_len)
    return out


def _eot_text(example: dict, tokenizer) -> str | None:
    """The end-of-turn text for chat examples (None for text examples, which do not need the chat template)."""
    return _chat_format(tokenizer).eot_text if "messages" in example else None


def _tokenize(example: dict, tokenizer, eot_text: str | None) -> tuple[list[int], list[int]]:
    if "text" in example:
        ids = _encode(tokenizer, example["text"])
        return ids, list(ids)
    messages = example["messages"]
    if not tokenizer.is_fast:
        raise ModelError(f"the tokenizer in {tokenizer.name_or_path} is a slow (Python) tokenizer without offsets; "
                         "add a tokenizer.json so a fast tokenizer loads")
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[:i + 1])
        if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
            raise ModelError(f"the chat template in {tokenizer.name_or_path} does not render conversations "
                             "incrementally (a prefix of a conversation renders differently inside it), so "
                             "assistant tokens cannot be located for label masking")
        start, end = len(before), len(upto)
        eot = full.rfind(eot_text, start, end) if eot_text else -1
        if eot >= 0:
            last_truncated = example.get("truncated") and i == len(messages) - 1
            end = eot if last_truncated else eot + len(eot_text)
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tid if any(s <= a < e for s, e in spans) else -100
              for tid, (a, _) in zip(enc.input_ids, enc.offset_mapping)]
    return list(enc.input_ids), labels


# --------------------------------------------------------------------------- the stage


def run(cfg: DataConfig, teacher_dir: Path, out_dir: Path) -> Path:
    """Build the data artifact in ``out_dir``: ``train.jsonl``, ``heldout.jsonl``, ``manifest.json``.

    Reuses ``out_dir`` when its manifest verifies and records the same config and
    inputs (teacher, source files). Otherwise: load user examples (or synthesise
    prompts), have the teacher answer prompt-only examples, split, and publish the
    folder atomically. Work in progress lives in ``<out_dir>.inprogress`` and is
    resumed by a re-run with the same config; it is removed once published.
    """
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    config = cfg.model_dump(mode="json")
    inputs = {"teacher": artifact.folder_id(teacher_dir), "sources": _sources_id(cfg.sources)}
    if _is_complete(out_dir, config, inputs):
        log.info("data artifact %s is complete for this config; reusing it", out_dir)
        return out_dir

    from transformers import AutoTokenizer

    examples = check_sources(cfg.sources) if cfg.sources else None  # bad user data fails before anything is written
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer from {teacher_dir} ({e}); the teacher folder needs its "
                         "tokenizer files -- resolve it with `edgekit teacher` first") from e
    if examples is None or any("messages" in e for e in examples):
        _chat_format(tokenizer)  # a missing, broken or hostile chat template fails here, before any work
    work = _work_dir(out_dir, config, inputs)
    stats: Counter = Counter()
    model = None

    if examples is not None:
        stats["user_examples"] = len(examples)
    else:
        model = _load_teacher(teacher_dir)
        synth = Counter()
        prompts = synthesize_prompts(model, tokenizer, cfg.synthetic_prompts, cfg.seed, cfg.batch_size,
                                     journal=work / "prompts.jsonl", stats=synth)
        if not prompts:
            raise ModelError(f"the teacher in {teacher_dir} produced no usable prompts (rejected: {dict(synth)}); "
                             "give user data in data.sources")
        stats.update({f"synthetic_{k}": v for k, v in synth.items()})
        examples = [{"messages": [{"role": "user", "content": p}]} for p in prompts]

    pending = [e for e in examples if needs_response(e)]
    if cfg.generate_responses and pending:
        model = model or _load_teacher(teacher_dir)
        answers = generate_responses(model, tokenizer, [e["messages"] for e in pending], cfg,
                                     journal=work / "generated.jsonl", stats=stats)
        answered = {_prompt_key(a["messages"][:-1]): a for a in answers}
        examples = [e for e in examples if not needs_response(e)] + [
            answered.pop(_prompt_key(e["messages"])) for e in pending if _prompt_key(e["messages"]) in answered]
        if not examples:
            raise ModelError(f"the teacher in {teacher_dir} gave no usable answer to any prompt ({dict(stats)}); "
                             "raise data.max_new_tokens or data.samples_per_prompt, or check the teacher")

    train, heldout = split_heldout(examples, cfg.heldout_fraction, cfg.seed)
    metrics = {"train_examples": len(train), "heldout_examples": len(heldout), **_token_counts(train, heldout,
                                                                                                  tokenizer, cfg)}
    for key, value in sorted(stats.items()):
        metrics[key] = round(value, 3) if isinstance(value, float) else value
    if stats["generation_seconds"]:
        metrics["generation_tokens_per_s"] = round(stats["generated_tokens"] / stats["generation_seconds"], 1)

    with artifact.atomic_dir(out_dir) as tmp:
        for name, part in (("train.jsonl", train), ("heldout.jsonl", heldout)):
            (tmp / name).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in part), encoding="utf-8")
        artifact.write_manifest(tmp, stage="data", config=config, inputs=inputs, metrics=metrics)
    shutil.rmtree(work, ignore_errors=True)
    log.info("data: %d train / %d held-out examples in %s", len(train), len(heldout), out_dir)
    return out_dir


def _load_teacher(teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the teacher from {teacher_dir} ({e}); it must be an HF folder with "
                         "safetensors weights -- resolve it with `edgekit teacher` first") from e
    return model.eval()


def _token_counts(train: list[dict], heldout: list[dict], tokenizer, cfg: DataConfig) -> dict:
    counts = {}
    for name, part in (("train", train), ("heldout", heldout)):
        tokenized = tokenize_examples(part, tokenizer, cfg.max_seq_len)
        counts[f"{name}_tokens"] = sum(len(t["input_ids"]) for t in tokenized)
        counts[f"{name}_label_tokens"] = sum(sum(label != -100 for label in t["labels"]) for t in tokenized)
    return counts


def _is_complete(out_dir: Path, config: dict, inputs: dict) -> bool:
    if not (out_dir / artifact.MANIFEST).is_file():
        return False
    try:
        manifest = artifact.read_manifest(out_dir)
        if (manifest.get("stage"), manifest.get("config"), manifest.get("inputs")) != ("data", config, inputs):
            return False
        problems = artifact.verify_manifest(out_dir)
    except CacheError as e:
        log.warning("rebuilding %s: %s", out_dir, e)
        return False
    if problems:
        log.warning("rebuilding %s: %s", out_dir, "; ".join(problems))
    return not problems


def _work_dir(out_dir: Path, config: dict, inputs: dict) -> Path:
    """The in-progress folder for this config, emptied first if it holds another config's work."""
    work = out_dir.parent / (out_dir.name + ".inprogress")
    state = {"config": config, "inputs": inputs}
    state_path = work / "state.json"
    if work.exists():
        try:
            same = json.loads(state_path.read_text(encoding="utf-8")) == state
        except (OSError, ValueError):
            same = False
        if same:
            log.info("resuming the unfinished data stage in %s", work)
            return work
        log.warning("discarding %s: it was started with a different config or inputs", work)
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True)
    except OSError as e:
        raise CacheError(f"cannot create {work}: {e.strerror or e}; check permissions or free disk space") from e
    artifact.atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    return work


def _sources_id(sources: list[Path]) -> str | None:
    """A hash of every source file's bytes, so edited user data is never silently reused."""
    if not sources:
        return None
    digests = {}
    for source in sources:
        source = Path(source).expanduser()
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for p in files:
            if p.is_file():
                digests[str(p)] = artifact.sha256_file(p)
    return artifact.content_id(digests)
