"""Examples as training sequences: token ids, and labels only on what the assistant said.

Chat examples are rendered with the tokenizer's chat template (:mod:`edgekit.chat`); text
examples are tokenized as they are.
"""

from __future__ import annotations

import logging

from edgekit.chat import eot_text_for, labelled_ids, labelled_sequences

log = logging.getLogger(__name__)


def tokenize_example(example: dict, tokenizer, max_seq_len: int) -> dict:
    """``{"input_ids", "labels"}`` for training, cut to ``max_seq_len`` tokens.

    Chat examples are rendered with the tokenizer's chat template; labels are -100
    on system/user text and template markup, and the token ids on each assistant
    turn's content and its end-of-turn token (not on the end-of-turn of a
    ``truncated`` answer, which the teacher never ended). Text examples are
    tokenized without special tokens and every token is a label.
    """
    input_ids, labels = labelled_ids(example, tokenizer, eot_text_for(example, tokenizer))
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def tokenize_examples(examples: list[dict], tokenizer, max_seq_len: int) -> list[dict]:
    """:func:`tokenize_example` for a list, with one warning saying how many were cut to ``max_seq_len``."""
    out, cut = [], 0
    for input_ids, labels in labelled_sequences(examples, tokenizer):
        cut += len(input_ids) > max_seq_len
        out.append({"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]})
    if cut:
        log.warning("%d of %d examples are longer than max_seq_len=%d tokens and were truncated; raise "
                    "data.max_seq_len to keep them whole", cut, len(examples), max_seq_len)
    return out
