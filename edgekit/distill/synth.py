"""Teacher-written data: prompts synthesised from the teacher (Magpie) and the teacher's answers to prompts.

:func:`synthesize_prompts` samples user messages from the chat template's text up to a user
turn; :func:`generate_responses` answers prompts (sequence-level KD), with rejection sampling
when ``samples_per_prompt > 1``. Both are seeded per round / per group, journal their work
so an interrupted run replays it, and drop what :mod:`edgekit.distill.filters` rejects.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from edgekit import artifact
from edgekit.chat import SENTINEL, ChatFormat, chat_format, encode, render, require_template
from edgekit.distill.config import DataConfig
from edgekit.distill.filters import (
    DEFAULT_SYSTEM,
    choose_sample,
    normalise_text,
    prompt_problem,
    response_problem,
)
from edgekit.errors import ConfigError, ModelError
from edgekit.progress import bar
from edgekit.runtimes.llamacpp import ParallelSampler, SampleRequest

log = logging.getLogger(__name__)

COT_INSTRUCTION = "Think step by step: reason through the problem first, then give your final answer."
MAX_PROMPT_TOKENS = 64  # Magpie prompts that do not end within this many tokens are dropped
SCORE_BATCH = 4  # rows per scoring forward pass (bounds the logits tensor: rows x tokens x vocab)


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
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
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
        ids, mask, positions = ids.to(model.device), mask.to(model.device), positions.to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, width - keep + 1:].cpu()
        logprobs = logprobs.cpu()
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for i, r in enumerate(responses):
            scores.append(token_lp[i, keep - 1 - len(r):].mean().item() if r else -math.inf)
    return scores


# --------------------------------------------------------------------------- synthetic prompts (Magpie)


def pre_query_prefix(tokenizer, system_prompt: str = DEFAULT_SYSTEM) -> str:
    """The chat text up to where a user's message starts (Magpie's "pre-query template").

    Rendered for [system, user] with a sentinel as the user content and cut at the
    sentinel, e.g. ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`` for ChatML.
    """
    require_template(tokenizer)
    text = render(tokenizer, [{"role": "system", "content": system_prompt}, {"role": "user", "content": SENTINEL}])
    if SENTINEL not in text:
        raise ModelError(f"the chat template in {tokenizer.name_or_path} drops the user's message, so prompts cannot "
                         "be synthesised from it; give user data in data.sources instead")
    return text[:text.index(SENTINEL)]


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
    prompts or after ``4 x ceil(n / batch_size)`` rounds. In llama.cpp the rounds the acceptance
    rate so far says are still needed are sampled in one continuous batch (``batch_size`` slots),
    which gives each round the same samples as alone without waiting for every round's slowest
    sample. ``journal`` (a JSONL file)
    records every round's raw samples, so an interrupted run replays them instead of
    sampling again. ``stats`` counts the rejections by reason.
    """
    chat = chat_format(tokenizer, model)
    prefix_ids = encode(tokenizer, pre_query_prefix(tokenizer, system_prompt))
    stats = Counter() if stats is None else stats
    replay = [r["samples"] for r in artifact.read_journal(journal)] if journal else []
    prompts, seen = [], set()
    max_rounds = max(4, 4 * math.ceil(n / batch_size))
    kept, tried = 0, 0  # the acceptance rate so far, which sizes how many rounds llama.cpp samples at once
    with bar(total=n, desc="synthetic prompts", unit="prompt") as progress:
        for round_ in range(max_rounds):
            if len(prompts) >= n:
                break
            if round_ >= len(replay):
                # llama.cpp: the rounds that should give the prompts still missing go in one continuous batch
                # (a round alone waits for its slowest sample while the other slots idle); each sample keeps
                # its round's seed, so the rounds are the ones sampled one at a time
                rate = kept / tried if tried else 0.65  # before any round: about what the embedded teacher gives
                ahead = math.ceil((n - len(prompts)) / max(0.1, rate) / batch_size)
                rounds = range(round_, min(max_rounds, round_ + (ahead if isinstance(model, ParallelSampler) else 1)))
                for r, samples in _sample_prompt_rounds(model, tokenizer, prefix_ids, chat, batch_size, rounds,
                                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                                        top_p=top_p, seed=seed):
                    replay.append(samples)  # journaled as each round is whole: a kill loses the rounds in flight
                    if journal:
                        artifact.append_journal(journal, [{"round": r, "samples": samples}], fault="data.journal")
            samples = replay[round_]
            tried += len(samples)
            for text, stopped in samples:
                problem = "truncated" if not stopped else prompt_problem(text, system_prompt)
                key = normalise_text(text)
                if problem is None and key in seen:
                    problem = "duplicate"
                if problem:
                    stats[problem] += 1
                    continue
                seen.add(key)
                prompts.append(text)
                kept += 1
                progress.update(1)
                if len(prompts) >= n:
                    break
    stats["accepted"] += len(prompts)
    if len(prompts) < n:
        log.warning("the teacher gave only %d usable prompts of %d asked in %d rounds (rejected: %s); "
                    "raise data.batch_size or give user data in data.sources", len(prompts), n, max_rounds,
                    dict(stats))
    return prompts


def _span(i: int, n: int) -> range:
    return range(i * n, (i + 1) * n)


def _sample_prompt_rounds(model, tokenizer, prefix_ids: list[int], chat: ChatFormat, n: int, rounds: Sequence[int], *,
                          max_new_tokens: int, temperature: float, top_p: float, seed: int = 0):
    """Yields ``(round, samples)`` in round order, each round as soon as it is whole: ``n`` continuations of the
    pre-query prefix as ``[text, ended_the_turn]`` pairs.

    Every sample is seeded by (seed, round, index), so a round gives the same samples whether it is sampled
    alone or with others (llama.cpp: one continuous batch over all rounds; PyTorch: one generate per round).
    """
    import torch

    def decoded(rows):
        return [[tokenizer.decode(ids, skip_special_tokens=True).strip(), stop is not None] for ids, stop in rows]

    rounds = list(rounds)
    if isinstance(model, ParallelSampler):
        requests = [SampleRequest(prefix_ids, max_new_tokens, temperature, top_p, chat.stop_ids,
                                  _seed_from(_seed_from(seed, "magpie", r), "magpie", j))
                    for r in rounds for j in range(n)]
        results, next_round = {}, 0
        with bar(total=len(requests), desc=f"sampling {len(rounds)} rounds", unit="sample") as progress:
            for k, result in model.run(requests):
                results[k] = result
                progress.update(1)
                while next_round < len(rounds) and all(i in results for i in _span(next_round, n)):
                    whole = [results[i] for i in _span(next_round, n)]
                    yield rounds[next_round], decoded([(res.tokens, res.stop) for res in whole])
                    next_round += 1
        return
    for r in rounds:
        torch.manual_seed(_seed_from(seed, "magpie", r))
        yield r, decoded(_sample(model, [prefix_ids], max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, stop_ids=chat.stop_ids, pad_id=chat.pad_id, num_return_sequences=n))


# --------------------------------------------------------------------------- teacher responses


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
    chat = chat_format(tokenizer, model)
    unique = {prompt_key(m): m for m in (_as_messages(p) for p in prompts)}
    done = _whole_groups(artifact.read_journal(journal)) if journal else {}
    pending = [m for k, m in unique.items() if k not in done]
    answered = (_respond_parallel(model, tokenizer, pending, cfg, chat) if isinstance(model, ParallelSampler)
                else _respond_groups(model, tokenizer, pending, cfg, chat))
    with bar(total=len(unique), desc="teacher responses", unit="prompt") as progress:
        progress.update(len(unique) - len(pending))
        began = time.perf_counter()
        for records in answered:
            stats["generation_seconds"] += time.perf_counter() - began
            stats["generated_tokens"] += sum(r.pop("sampled_tokens", 0) for r in records)
            if journal:
                artifact.append_journal(journal, records, fault="data.journal")
            done.update((r["key"], r) for r in records)
            progress.update(len(records))
            began = time.perf_counter()
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


def _respond_groups(model, tokenizer, pending: list[list[dict]], cfg: DataConfig, chat: ChatFormat):
    """PyTorch: a few prompts at a time through ``generate`` (one padded batch each); yields each group's records.

    A group is sampled together from one seed, so it is journaled (and resumed) whole or not at all.
    """
    group_size = max(1, cfg.batch_size // cfg.samples_per_prompt)
    for start in range(0, len(pending), group_size):
        records = _respond_group(model, tokenizer, pending[start:start + group_size], cfg, chat)
        for r in records:
            r.update(group=records[0]["key"], group_size=len(records))
        yield records


def _respond_group(model, tokenizer, group: list[list[dict]], cfg: DataConfig, chat: ChatFormat) -> list[dict]:
    """Sample, score and choose answers for a few prompts; one journal record per prompt."""
    import torch

    k = cfg.samples_per_prompt
    torch.manual_seed(_seed_from(cfg.seed, "respond", prompt_key(group[0])))
    prompt_ids = [_prompt_ids(tokenizer, m, cfg) for m in group]
    rows = _sample(model, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, stop_ids=chat.stop_ids, pad_id=chat.pad_id, num_return_sequences=k)
    scored_prompts = [p for p in prompt_ids for _ in range(k)]
    # a finished sample is scored with its end-of-turn token: ending well is part of a good answer
    scores = _score(model, scored_prompts, [ids if stop is None else ids + [stop] for ids, stop in rows])
    return [_record(tokenizer, messages, [(*rows[j], scores[j]) for j in range(i * k, (i + 1) * k)])
            for i, messages in enumerate(group)]


def _respond_parallel(sampler: ParallelSampler, tokenizer, pending: list[list[dict]], cfg: DataConfig,
                      chat: ChatFormat):
    """llama.cpp: every sample of every prompt through the sampler's slots (continuous batching); yields
    one prompt's record as soon as all its samples are done.

    Each sample has its own seed (prompt, sample number), so a prompt's answers do not depend on
    which prompts ran beside it, and each prompt is journaled on its own.
    """
    k = cfg.samples_per_prompt
    requests = [SampleRequest(_prompt_ids(tokenizer, m, cfg), cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                              chat.stop_ids, _seed_from(cfg.seed, "respond", prompt_key(m), j))
                for m in pending for j in range(k)]
    got: dict[int, list] = {}
    for index, result in sampler.run(requests):
        i = index // k
        got.setdefault(i, [None] * k)[index % k] = result
        if all(r is not None for r in got[i]):
            samples = [(r.tokens, r.stop, r.logprob_sum / max(1, len(r.tokens) + (r.stop is not None)))
                       for r in got.pop(i)]
            yield [_record(tokenizer, pending[i], samples)]


def _prompt_ids(tokenizer, messages: list[dict], cfg: DataConfig) -> list[int]:
    return encode(tokenizer, render(tokenizer, _teacher_view(messages, cfg), add_generation_prompt=True))


def _record(tokenizer, messages: list[dict], samples: list[tuple[list[int], int | None, float]]) -> dict:
    """One prompt's journal record from its samples ``(tokens, stop token or None, mean log-probability)``:
    the best usable sample as the example, and what was rejected and why."""
    candidates, degenerate = [], Counter()
    for ids, stop, score in samples:
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        problem = response_problem(text)
        if problem:
            degenerate[problem] += 1
        else:
            candidates.append({"text": text, "score": score, "truncated": stop is None})
    best = choose_sample(candidates)
    example = None if best is None else {
        "messages": messages + [{"role": "assistant", "content": best["text"]}],
        "score": round(best["score"], 4), "truncated": best["truncated"]}
    return {"key": prompt_key(messages), "example": example, "degenerate": dict(degenerate),
            "sampled_tokens": sum(len(ids) for ids, _, _ in samples)}


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


def prompt_key(messages: list[dict]) -> str:
    """The prompt's identity for resuming: its user text, or the whole message list when there is more than one turn."""
    if len(messages) == 1:
        return messages[0]["content"]
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _seed_from(*parts: object) -> int:
    return int(artifact.content_id(*parts), 16) % (2**63)
