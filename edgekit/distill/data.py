"""The data stage of distillation: user data or synthetic prompts, teacher responses, a held-out split.

``run(cfg, teacher_dir, out_dir)`` writes an artifact folder with ``train.jsonl``,
``heldout.jsonl`` and ``manifest.json``. Each line is one example, either a chat
``{"messages": [{"role": ..., "content": ...}, ...]}`` or plain ``{"text": ...}``;
examples the teacher answered also carry ``score`` (its mean log-probability per
response token) and ``truncated`` (no end-of-turn within ``max_new_tokens``).

Where the examples come from:

- ``sources`` (user data): JSONL records, ``.txt``/``.md`` paragraphs, or a
  folder saved by ``datasets.Dataset.save_to_disk`` (:func:`edgekit.sources.load_examples`).
- no sources: prompts synthesised from the teacher itself with the Magpie method
  (:func:`edgekit.distill.synth.synthesize_prompts`).

Prompts without an answer get one from the teacher (:func:`edgekit.distill.synth.generate_responses`,
sequence-level KD), with rejection sampling when ``samples_per_prompt > 1``.
Generation is resumable: finished prompts are appended to
``<out_dir>.inprogress/generated.jsonl`` after each batch, so a killed run loses
at most one batch and a re-run picks up where it stopped.

This module is the stage: where the examples come from and what they become live in
:mod:`edgekit.sources` (user files), :mod:`edgekit.chat` (chat templates),
:mod:`edgekit.distill.synth` (teacher-written prompts and answers), :mod:`edgekit.distill.filters`
and :mod:`edgekit.distill.tokenize` (training sequences).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from edgekit import artifact
from edgekit.chat import chat_format
from edgekit.distill.config import DataConfig
from edgekit.distill.synth import generate_responses, prompt_key, synthesize_prompts
from edgekit.distill.tokenize import tokenize_examples
from edgekit.errors import CacheError, ConfigError, ModelError
from edgekit.quantize.gguf import quantize_gguf, read_gguf
from edgekit.runtimes.llamacpp import ParallelSampler
from edgekit.sources import check_sources, needs_response

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- the stage


def run(cfg: DataConfig, teacher_dir: Path, out_dir: Path, teacher_gguf: Path | None = None) -> Path:
    """Build the data artifact in ``out_dir``: ``train.jsonl``, ``heldout.jsonl``, ``manifest.json``.

    Reuses ``out_dir`` when its manifest verifies and records the same config and
    inputs (teacher, source files). Otherwise: load user examples (or synthesise
    prompts), have the teacher answer prompt-only examples, split, and publish the
    folder atomically. Work in progress lives in ``<out_dir>.inprogress`` and is
    resumed by a re-run with the same config; it is removed once published.

    ``teacher_gguf``: the GGUF the teacher folder was converted from, if any; with ``cfg.backend``
    auto or llama.cpp the teacher runs from it (:class:`edgekit.runtimes.llamacpp.ParallelSampler`).
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
        chat_format(tokenizer)  # a missing, broken or hostile chat template fails here, before any work
    work = _work_dir(out_dir, config, inputs)
    stats: Counter = Counter()
    model = None

    try:
        if examples is not None:
            stats["user_examples"] = len(examples)
        else:
            model = _load_teacher(teacher_dir, teacher_gguf, cfg, work)
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
            model = model or _load_teacher(teacher_dir, teacher_gguf, cfg, work)
            answers = generate_responses(model, tokenizer, [e["messages"] for e in pending], cfg,
                                         journal=work / "generated.jsonl", stats=stats)
            answered = {prompt_key(a["messages"][:-1]): a for a in answers}
            examples = [e for e in examples if not needs_response(e)] + [
                answered.pop(prompt_key(e["messages"])) for e in pending if prompt_key(e["messages"]) in answered]
            if not examples:
                raise ModelError(f"the teacher in {teacher_dir} gave no usable answer to any prompt ({dict(stats)}); "
                                 "raise data.max_new_tokens or data.samples_per_prompt, or check the teacher")
    finally:
        if isinstance(model, ParallelSampler):
            model.close()

    train, heldout = split_heldout(examples, cfg.heldout_fraction, cfg.seed)
    metrics = {"train_examples": len(train), "heldout_examples": len(heldout), **_token_counts(train, heldout,
                                                                                                  tokenizer, cfg)}
    for key, value in sorted(stats.items()):
        metrics[key] = round(value, 3) if isinstance(value, float) else value
    metrics["generation_backend"] = _backend_name(model)
    if stats["generation_seconds"]:
        metrics["generation_tokens_per_s"] = round(stats["generated_tokens"] / stats["generation_seconds"], 1)

    with artifact.atomic_dir(out_dir) as tmp:
        for name, part in (("train.jsonl", train), ("heldout.jsonl", heldout)):
            (tmp / name).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in part), encoding="utf-8")
        artifact.write_manifest(tmp, stage="data", config=config, inputs=inputs, metrics=metrics)
    shutil.rmtree(work, ignore_errors=True)
    log.info("data: %d train / %d held-out examples in %s", len(train), len(heldout), out_dir)
    return out_dir


def choose_backend(cfg: DataConfig, teacher_gguf: Path | None) -> str:
    """``llama.cpp`` or ``pytorch`` for ``cfg.backend`` (see :class:`edgekit.distill.config.DataConfig`)."""
    if cfg.backend == "llama.cpp":
        if teacher_gguf is None:
            raise ConfigError("data.backend llama.cpp needs a teacher that came from a GGUF (the embedded one, a "
                              ".gguf file or a packaged GGUF); this teacher is an HF folder -- set data.backend: "
                              "pytorch or auto")
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError("data.backend llama.cpp needs llama-cpp-python: pip install llama-cpp-python")
        return "llama.cpp"
    if cfg.backend == "pytorch" or teacher_gguf is None or importlib.util.find_spec("llama_cpp") is None:
        return "pytorch"
    import torch

    return "pytorch" if torch.cuda.is_available() else "llama.cpp"


def _backend_name(model) -> str | None:
    if model is None:
        return None
    if isinstance(model, ParallelSampler):
        return f"llama.cpp ({model.path.name})"
    return f"pytorch ({model.device.type})"


def _batched_copy(gguf: Path, work: Path | None) -> Path:
    """The teacher's GGUF in a type llama.cpp multiplies fast in batches: q8_0, made once per data run in ``work``.

    llama.cpp runs batches of Q8_0 (and float) weights through its tiled matrix kernels, but Q4_1 or
    K-quants one column at a time: on a 2-core AMD EPYC the embedded Q4_1 teacher wrote 112 tokens/s
    with 32 answers in flight, its Q8_0 copy 172 (benchmarks/RESULTS.md). The copy is requantized
    from the source's own values (llama.cpp dequantizes, then rounds to 8 bits per block of 32); its
    KL to the PyTorch teacher, 0.005 per token, is of the order of running the Q4_1 itself (0.0035).
    A float or q8_0 source is used as it is.
    """
    info = read_gguf(gguf)
    if work is None or all(t["type"] in ("f32", "f16", "bf16", "q8_0") for t in info["tensors"]):
        return gguf
    copy = work / "teacher-q8_0.gguf"
    if not copy.is_file():
        log.info("requantizing %s to q8_0 for batched generation (once per data run)", gguf.name)
        quantize_gguf(gguf, copy, "q8_0", warn_requant=False)
    return copy


def _load_teacher(teacher_dir: Path, teacher_gguf: Path | None = None, cfg: DataConfig | None = None,
                  work: Path | None = None):
    """The teacher as the data stage runs it: a llama.cpp :class:`ParallelSampler` over its GGUF, or the HF model
    (on the GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if cfg is not None and choose_backend(cfg, teacher_gguf) == "llama.cpp":
        gguf = _batched_copy(teacher_gguf, work)
        sampler = ParallelSampler(gguf, slots=cfg.batch_size)
        try:
            sampler.generation_config = GenerationConfig.from_pretrained(str(teacher_dir))
        except OSError:
            sampler.generation_config = None
        log.info("teacher data from %s in llama.cpp, %d sequences in flight", gguf, cfg.batch_size)
        return sampler
    try:
        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the teacher from {teacher_dir} ({e}); it must be an HF folder with "
                         "safetensors weights -- resolve it with `edgekit teacher` first") from e
    if torch.cuda.is_available():  # the standard way: the whole teacher on the GPU, generate batches there
        model = model.to("cuda")
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
        source = artifact.user_path(source)
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for p in files:
            if p.is_file():
                digests[str(p)] = artifact.sha256_file(p)
    return artifact.content_id(digests)
