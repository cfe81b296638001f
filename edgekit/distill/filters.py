"""Quality filters for teacher-written text: which synthesised prompts and sampled answers to keep.

Each ``*_problem`` function names why a text is unusable (the name is counted in the data
artifact's metrics) or returns None; :func:`choose_sample` picks the best surviving answer.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_SYSTEM = "You are a helpful AI assistant."  # Magpie's system prompt; a prompt echoing it is dropped
MAX_PROMPT_WORDS = 200
NGRAM = 3
MAX_REPEATED_NGRAM_RATIO = 0.3  # share of word trigrams that repeat an earlier one
_REFUSAL = re.compile(r"^(i'?m sorry|i am sorry|i cannot|i can'?t|i can not|as an ai\b|i'?m an ai\b|"
                      r"i am an ai\b|i'?m unable|i am unable)")
_ASSISTANT_VOICE = ("how can i help you", "how can i assist you", "how may i help you", "how may i assist you")


def prompt_problem(text: str, system_prompt: str = DEFAULT_SYSTEM, max_words: int = MAX_PROMPT_WORDS) -> str | None:
    """Why a synthesised prompt is unusable (``too_short``, ``too_long``, ``non_printable``, ``repetitive``,
    ``refusal``, ``echo``), or None if it is fine."""
    words = text.split()
    lowered = text.strip().lower().replace("\u2019", "'")
    norm, norm_system = normalise_text(text), normalise_text(system_prompt)
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


def response_problem(text: str) -> str | None:
    """Why a teacher response is degenerate (``empty``, ``repetitive``), or None. Truncation is flagged, not fatal."""
    if not text.strip():
        return "empty"
    if repeated_ngram_ratio(text) > MAX_REPEATED_NGRAM_RATIO:
        return "repetitive"
    return None


def choose_sample(candidates: list[dict]) -> dict | None:
    """The best non-degenerate sample: complete before truncated, then highest score; None if there is none."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: (not c["truncated"], c["score"]))


def repeated_ngram_ratio(text: str, n: int = NGRAM) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied text, near 1 for a loop."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _non_printable(text: str) -> bool:
    return "\ufffd" in text or any(
        unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn", "Cs") and c not in "\n\t\r" for c in text)


def normalise_text(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: the key for duplicates and echoes."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
