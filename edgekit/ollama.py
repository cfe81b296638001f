"""Ollama: a model's Jinja chat template translated into an Ollama (Go text/template) TEMPLATE, and its Modelfile.

Ollama renders prompts with Go's ``text/template`` over ``.Messages`` (each with ``.Role`` and
``.Content``), so a Hugging Face Jinja template has to be rewritten. No library does this (Ollama
keeps hand-written templates for the models in its own library, matched by their Jinja text), so it
is written here. It is not a general Jinja-to-Go compiler: it reads the template's *shape* by
rendering probe conversations through the real Jinja template, then checks the shape back.

The shape (:class:`ChatShape`) is what chat templates of the supported families have in common:

- each message is ``prefix[role] + content + suffix[role]`` (ChatML, Llama 3, Phi, Gemma);
- ``generation`` opens the assistant's reply after the last message;
- ``default_system``: a system prompt the template inserts when the conversation has none (SmolLM2,
  Qwen2.5) -- it becomes the Modelfile's ``SYSTEM``, which Ollama inserts in the same case;
- ``fold``: a template without a system turn puts the system text at the start of the first message,
  followed by this separator (Gemma).

:func:`read_shape` probes a ``render(messages, add_generation_prompt)`` callable (the tokenizer's own
template) and raises :class:`Untranslatable` with a one-line reason when the template does anything
else -- dates, tools, per-position logic -- so a wrong TEMPLATE is never written. :func:`render_shape`
is the Python twin of the Go template, rendering exactly what Ollama will; the test suite runs the
generated template in Go's text/template against the Jinja rendering.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from edgekit.errors import EdgekitError

ROLES = ("system", "user", "assistant")
# Probe contents: distinctive, free of whitespace at either end and of anything a template escapes.
_SYS, _U1, _A1, _U2, _A2, _U3 = "EKPROBESYSTEM", "EKPROBEUSER1", "EKPROBEASSISTANT1", "EKPROBEUSER2", \
    "EKPROBEASSISTANT2", "EKPROBEUSER3"
# Conversations every translation is checked on (ending with a user turn: the prompt Ollama renders).
_CHECK_TEXTS = ("Hello!", "Two\nlines, {{ braces }} and {% tags %}", "quotes \" ' and \\ backslash",
                "unicode: café, 日本語, emoji 🙂", "$.Messages {{ .Content }}")


class Untranslatable(EdgekitError):
    """The chat template does something an Ollama TEMPLATE of edgekit's shape cannot reproduce."""


@dataclass(frozen=True)
class ChatShape:
    """A chat template as an Ollama TEMPLATE reproduces it (see the module docstring)."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    start: str = ""
    default_system: str | None = None
    fold: str | None = None  # system text folded into the first message, followed by this separator
    notes: tuple[str, ...] = field(default=())


Render = Callable[[list[dict], bool], str]


def read_shape(render: Render, *, bos: str | None = None, bos_added: bool = True) -> ChatShape:
    """The shape of the chat template behind ``render``; raises :class:`Untranslatable` if it has none.

    ``bos``: the BOS token's text; when the runtime adds BOS itself (``bos_added``, as llama.cpp does
    for a GGUF whose tokenizer.ggml.add_bos_token is true) a leading BOS in the Jinja rendering is
    left out of the TEMPLATE, since Ollama's tokenizer adds it.

    Where an assistant turn ends and the next user turn begins is read as the longest text both the end of a
    conversation and the next turn share; when that overshoots into the next turn's first characters (Phi-3's
    ``<|end|>\n`` then ``</s>`` or ``<|user|>``), shorter ends are tried, and the first that checks is kept.
    """
    first = None
    for cut in _ends(render):
        try:
            return _read_shape(render, bos, bos_added, cut)
        except Untranslatable as e:
            first = first or e
    raise first


def _split(text: str, *parts: str) -> list[str]:
    out, rest = [], text
    for p in parts:
        i = rest.find(p)
        if i < 0:
            raise Untranslatable(f"a message's content does not appear verbatim in the rendering ({p!r} missing), "
                                 "so the template rewrites content")
        out.append(rest[:i])
        rest = rest[i + len(p):]
    return [*out, rest]


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _ends(render: Render) -> range:
    """The lengths to try for the end of an assistant turn, longest first."""
    _, _, f2, _ = _split(render([_m("user", _U1), _m("assistant", _A1), _m("user", _U2)], True), _U1, _A1, _U2)
    *_, tail = _split(render([_m("user", _U1), _m("assistant", _A1)], False), _U1, _A1)
    return range(len(_common_prefix(tail, f2)), -1, -1)


def _read_shape(render: Render, bos: str | None, bos_added: bool, asst_end: int) -> ChatShape:
    r, split, m = render, _split, _m
    # Ollama renders a conversation that ends with a user turn, with the generation prompt: every probe is such a
    # rendering, but for the ends of turns, read off conversations that end after that turn (their tail may add
    # a closing text, as Phi-3's end-of-text without a generation prompt, which the common prefix leaves out).
    user, asst = [m("user", _U1)], [m("user", _U1), m("assistant", _A1)]
    f0, f1, f2, f3 = split(r([*asst, m("user", _U2)], True), _U1, _A1, _U2)
    _, tail_user = split(r(user, False), _U1)
    s_user = _common_prefix(tail_user, f1, f3)
    p_asst, generation = f1[len(s_user):], f3[len(s_user):]
    s_asst, p_user = f2[:asst_end], f2[asst_end:]
    if not f0.endswith(p_user):
        raise Untranslatable("the first user turn is introduced differently from the later ones")
    lead = f0[:len(f0) - len(p_user)]  # what precedes the first message when there is no system message
    g0, g1, g2 = split(r([m("system", _SYS), m("user", _U1)], True), _SYS, _U1)
    if g2 != s_user + generation:
        raise Untranslatable("a user turn after a system message ends differently from one without")
    # A BOS the template writes once before everything (not one that opens every turn, as SmolLM2's <|im_start|>)
    lone_bos = bool(bos) and lead.startswith(bos) and g0.startswith(bos) and not p_user.startswith(bos)
    if lone_bos:
        lead, g0 = lead[len(bos):], g0[len(bos):]
    start = bos if lone_bos and not bos_added else ""  # the TEMPLATE writes BOS only if Ollama's tokenizer does not
    notes: list[str] = []
    fold = default_system = None
    if g1.endswith(p_user):  # a system turn of its own
        p_sys, s_sys = g0, g1[:len(g1) - len(p_user)]
        if lead:  # text the template adds when no system message is given: its default system prompt
            if not (lead.startswith(p_sys) and lead.endswith(s_sys) and len(lead) >= len(p_sys) + len(s_sys)):
                raise Untranslatable(f"the template adds {lead!r} before the first message, which is not a system turn")
            default_system = lead[len(p_sys):len(lead) - len(s_sys)]
            if not default_system:
                raise Untranslatable(f"the template writes a system turn ({lead!r}) even when the conversation has no "
                                     "system message, which Ollama's SYSTEM (inserted only when not empty) cannot do")
    elif g0 == p_user and not lead:  # no system turn: folded into the first message (Gemma)
        p_sys, s_sys, fold = "", "", g1
    else:
        raise Untranslatable("its system message is neither a turn of its own nor text at the start of the first "
                             "message")
    shape = ChatShape(prefix={"system": p_sys, "user": p_user, "assistant": p_asst},
                      suffix={"system": s_sys, "user": s_user, "assistant": s_asst}, generation=generation,
                      default_system=default_system, fold=fold)
    check = replace(shape, start="")  # compared with the Jinja rendering less its lone BOS
    if " " + _U1 + " " not in r([m("user", f" {_U1} ")], True):
        notes.append("the Jinja template trims whitespace around message content; the Ollama template keeps it "
                     "(the same for content without leading or trailing whitespace)")
    for conv in check_conversations():
        want, got = r(conv, True), render_shape(check, conv)
        want = want[len(bos):] if lone_bos and want.startswith(bos) else want
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise Untranslatable(f"a {len(conv)}-message conversation renders differently from character {at} "
                                 f"(Jinja {want[at:at + 24]!r}, Ollama {got[at:at + 24]!r})")
    return replace(shape, start=start, notes=tuple(notes))


def _common_prefix(*texts: str) -> str:
    n = 0
    while all(n < len(t) for t in texts) and len({t[n] for t in texts}) == 1:
        n += 1
    return texts[0][:n]


def check_conversations() -> list[list[dict]]:
    """The conversations a translation must render identically (each ends with a user turn)."""
    convs = []
    for i, text in enumerate(_CHECK_TEXTS):
        turns = [{"role": "user", "content": text}, {"role": "assistant", "content": f"Answer {i}.\nSecond line."},
                 {"role": "user", "content": f"Follow-up {i}?"}]
        convs += [turns[:1], turns, [{"role": "system", "content": f"You are terse. {text}"}, *turns],
                  [{"role": "system", "content": "Be kind."}, turns[0]]]
    return convs


def render_shape(shape: ChatShape, messages: list[dict]) -> str:
    """What the TEMPLATE of :func:`go_template` renders for ``messages``, as Ollama calls it.

    Like Ollama, the shape's default system prompt (the Modelfile's SYSTEM) is inserted when the
    conversation has no system message.
    """
    if shape.default_system is not None and not any(x["role"] == "system" for x in messages):
        messages = [{"role": "system", "content": shape.default_system}, *messages]
    out = [shape.start]
    for i, msg in enumerate(messages):
        role = msg["role"]
        if shape.fold is not None and role == "system":
            continue
        folded = ""
        if shape.fold is not None and i == 1 and messages[0]["role"] == "system":
            folded = messages[0]["content"] + shape.fold
        out.append(shape.prefix.get(role, "") + folded + msg["content"] + shape.suffix.get(role, ""))
    if messages and messages[-1]["role"] != "assistant":
        out.append(shape.generation)
    return "".join(out)


def _lit(s: str) -> str:
    """A Go template action printing ``s``: a JSON string is a valid Go interpreted string literal."""
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""


def go_template(shape: ChatShape) -> str:
    """The shape as an Ollama TEMPLATE (Go text/template over .Messages).

    Every literal is a quoted string inside an action and every line starts with a trimming ``{{-``,
    so the template's own line breaks never reach the prompt.
    """
    lines = [_lit(shape.start)] if shape.start else []
    lines.append("{{- range $i, $m := .Messages }}")
    first = True
    for role in ROLES:
        if shape.fold is not None and role == "system":
            continue
        fold = ""
        if shape.fold is not None:
            fold = ('{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}{{ (index $.Messages 0).Content }}'
                    + _lit(shape.fold) + "{{ end }}")
        lines.append(("{{- if" if first else "{{- else if") + f' eq $m.Role "{role}" }}}}'
                     + _lit(shape.prefix[role]) + fold + "{{ $m.Content }}" + _lit(shape.suffix[role]))
        first = False
    lines += ["{{- end }}",
              '{{- if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}' + _lit(shape.generation)
              + "{{ end }}",
              "{{- end }}"]
    return "\n".join(lines)




def modelfile(shape: ChatShape | None, *, model_file: str, stop: list[str], params: dict[str, object],
              header: str = "") -> str:
    """A Modelfile: FROM the GGUF next to it, the TEMPLATE (none without a shape), SYSTEM when the template has a
    default system prompt, then PARAMETERs."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"FROM ./{model_file}", ""]
    if shape is not None:
        template = go_template(shape)
        if '"""' in template or (shape.default_system and '"""' in shape.default_system):
            raise Untranslatable('the template or system prompt holds """, which ends a Modelfile block')
        lines += [f'TEMPLATE """{template}"""', ""]
    if shape is not None and shape.default_system:
        lines += [f'SYSTEM """{shape.default_system}"""', ""]
    for s in dict.fromkeys(x for x in stop if x):
        if '"' in s or "\n" in s:  # a PARAMETER value cannot carry these; llama.cpp still stops at end-of-turn tokens
            lines.append(f"# stop string {json.dumps(s)} left out: a PARAMETER cannot hold a quote or line break")
        else:
            lines.append(f'PARAMETER stop "{s}"')
    for key, value in params.items():
        if value is not None:
            lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
