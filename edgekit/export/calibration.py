"""Calibration text for the calibrated exports (llama.cpp's importance matrix, activation-aware int4): the
user's files or edgekit's bundled set (:data:`edgekit.export.config.DEFAULT_CALIBRATION`, the one default),
chats rendered through the model's own chat template."""

from __future__ import annotations

from pathlib import Path

from edgekit.chat import render_text
from edgekit.errors import RecipeError
from edgekit.export.config import DEFAULT_CALIBRATION, ExportConfig
from edgekit.sources import load_examples


def calibration_texts(paths: list[Path], tokenizer, max_tokens: int) -> list[str]:
    """Rendered calibration texts (chat examples through the chat template), up to ``max_tokens`` tokens."""
    examples = load_examples(paths or [DEFAULT_CALIBRATION], key="--calibration")
    texts, total = [], 0
    for e in examples:
        if "messages" in e and e["messages"][-1]["role"] != "assistant":
            continue
        text = render_text(e, tokenizer)
        texts.append(text)
        total += len(tokenizer(text, add_special_tokens=False).input_ids)
        if total >= max_tokens:
            break
    if not texts:
        raise RecipeError(f"no calibration text in {', '.join(map(str, paths))}: give JSONL/txt files with "
                          "'text' records or finished chats")
    return texts


def default_texts(model_dir: Path) -> list[str]:
    """The bundled calibration set rendered for the model in ``model_dir``, as the export stage uses by default
    (for callers of an exporter's function who pass no text of their own)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return calibration_texts([], tokenizer, ExportConfig.model_fields["calibration_tokens"].default)
