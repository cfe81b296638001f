"""Chat templates: rendering a conversation with a tokenizer's own template, and what that template says about turns.

Every edgekit caller renders through :func:`apply_chat_template`, which turns a hostile or broken
template into a :class:`~edgekit.errors.ModelError` naming its file. :func:`chat_format` reads
the end-of-turn text and the ids that stop generation off a rendered assistant turn.

Nothing here imports transformers: the functions take a loaded tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import ModelError

# Stands in for message content while rendering, to find where content starts and ends.
SENTINEL = "\u2063EDGEKIT_SENTINEL\u2063"

# The five fixed questions every model of a run answers greedily, side by side (teacher, float student, each
# export), in the fidelity report and at the end of `edgekit run`: the same questions for every model and run.
QUESTIONS = (
    "What is the capital of France?",
    "Explain in a few sentences why the sky is blue.",
    "Give me three tips for staying focused while studying.",
    "Write a Python function that returns the sum of a list of numbers.",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
)
ANSWER_TOKENS = 64  # new tokens at most per answer


@dataclass(frozen=True)
class ChatFormat:
    """What the tokenizer's chat template says about turns: the end-of-turn text and the ids that stop generation."""

    eot_text: str
    stop_ids: frozenset[int]
    pad_id: int


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
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError,
            NameError) as e:  # NameError: Jinja compiles a float literal past 1e308 to `inf`, undefined when run
        # raised by the template's own expressions (`+ 'x'` on a number, a string called as a function, 1/0, ...)
        raise ModelError(f"the chat template in {chat_template_file(tokenizer)} failed while rendering "
                         f"({type(e).__name__}: {str(e)[:200]}); fix that template or replace it with the base "
                         "model's") from e


def chat_template_file(tokenizer) -> str:
    """Where a tokenizer's chat template comes from: chat_template.jinja, else tokenizer_config.json, in its folder."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return str(folder) if str(folder) != "." else "(the tokenizer in memory)"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A conversation as chat text (not tokenized)."""
    return apply_chat_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_text(example: dict, tokenizer) -> str:
    """An example as the plain text the model reads: the chat template's rendering, or the text itself."""
    if "text" in example:
        return example["text"]
    require_template(tokenizer)
    return render(tokenizer, example["messages"])


def require_template(tokenizer) -> None:
    """A ModelError unless the tokenizer has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer in {tokenizer.name_or_path or '(in memory)'} has no chat template, so chat "
                         "prompts cannot be rendered; use an instruct/chat teacher (its tokenizer_config.json or "
                         "chat_template.jinja defines one), or give data.sources with {\"text\"} records only")


def chat_format(tokenizer, model=None) -> ChatFormat:
    """Find the end-of-turn token by rendering an assistant turn and reading what follows its content.

    ``model`` (optional) adds the eos ids of its generation config to the stop ids.
    """
    require_template(tokenizer)
    text = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}])
    tail = text[text.index(SENTINEL) + len(SENTINEL):]
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
    return ChatFormat(eot_text=eot_text, stop_ids=frozenset(stop_ids), pad_id=pad)


def question_ids(tokenizer, question: str) -> list[int]:
    """Token ids a model answers ``question`` from: the chat template's user turn and generation prompt, or the
    question itself when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        text = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    else:
        text = question
    return encode(tokenizer, text)


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """The ids that end an answer: the chat template's end-of-turn and eos, or only eos without a template."""
    if getattr(tokenizer, "chat_template", None):
        return chat_format(tokenizer).stop_ids
    return frozenset() if tokenizer.eos_token_id is None else frozenset({int(tokenizer.eos_token_id)})


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of chat text. Chat templates put any BOS in the text themselves; the tokenizer must not add another."""
    return tokenizer(text, add_special_tokens=False).input_ids


def eot_text_for(example: dict, tokenizer) -> str | None:
    """The end-of-turn text for a chat example (None for a text example, which needs no chat template)."""
    return chat_format(tokenizer).eot_text if "messages" in example else None


def labelled_ids(example: dict, tokenizer, eot_text: str | None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of an example: labels are the ids of what the assistant said, -100 elsewhere.

    Chat examples render with the tokenizer's chat template; labels cover each assistant turn's content
    and its end-of-turn token (not the end-of-turn of a ``truncated`` answer, which the teacher never
    ended); system/user text and template markup are -100. Text examples: every token is a label.
    ``eot_text`` is :func:`eot_text_for` the example (pass it once for a list of examples).
    """
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


def labelled_sequences(examples, tokenizer):
    """:func:`labelled_ids` of each example in turn, the end-of-turn text found once for the list."""
    eot_text = None
    for example in examples:
        if eot_text is None:
            eot_text = eot_text_for(example, tokenizer)
        yield labelled_ids(example, tokenizer, eot_text)
