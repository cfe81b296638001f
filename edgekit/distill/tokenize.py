"""Examples as training sequences: token ids, and labels only on what the assistant said.

Chat examples are rendered with the tokenizer's chat template (:mod:`edgekit.chat`); text
examples are tokenized as they are.
"""

from __future__ import annotations

import logging

from edgekit.chat import chat_format, encode, render
from edgekit.errors import ModelError

log = logging.getLogger(__name__)


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
    return chat_format(tokenizer).eot_text if "messages" in example else None


def _tokenize(example: dict, tokenizer, eot_text: str | None) -> tuple[list[int], list[int]]:
    if "text" in example:
        ids = encode(tokenizer, example["text"])
        return ids, list(ids)
    messages = example["messages"]
    if not tokenizer.is_fast:
        raise ModelError(f"the tokenizer in {tokenizer.name_or_path} is a slow (Python) tokenizer without offsets; "
                         "add a tokenizer.json so a fast tokenizer loads")
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[:i + 1])
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
