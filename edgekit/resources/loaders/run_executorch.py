#!/usr/bin/env python3
"""Chat with this bundle's ExecuTorch program. Needs only: pip install "executorch>=1.5.1" tokenizers jinja2

    python run_executorch.py "Why is the sky blue?"
    python run_executorch.py --max-tokens 64 "Hello"

The reply goes to stdout; a one-line summary (tokens, seconds) goes to stderr. Decoding is greedy;
max_new_tokens defaults to generation.json's. model.pte takes (tokens [1, S], start position [1])
and returns the last position's logits; it keeps its K/V cache inside, for executorch_config.json's
``context`` positions. The chat template (chat_template.jinja, else tokenizer_config.json's) is
rendered in Jinja's sandbox; the tokenizer is tokenizer.json. On a phone, the same program runs
under ExecuTorch's C++ LLM runner (it carries the runner's metadata: eos ids, max length).
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _template() -> str | None:
    path = HERE / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    cfg = HERE / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    return None


def _prompt(text: str) -> str:
    template = _template()
    if not template:
        return text
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": text}],
                                            add_generation_prompt=True, bos_token="", eos_token="")


def _template_name() -> str:
    return "chat_template.jinja" if (HERE / "chat_template.jinja").is_file() else "tokenizer_config.json"


def fail(message: str) -> int:
    """One line on stderr, exit code 2."""
    print(f"{Path(__file__).name}: error: {message}", file=sys.stderr)
    return 2


def main() -> int:
    gen_path = HERE / "generation.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    cfg = json.loads((HERE / "executorch_config.json").read_text(encoding="utf-8"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="+", help="what to say to the model")
    ap.add_argument("--max-tokens", type=int, default=gen.get("max_new_tokens", 256))
    args = ap.parse_args()

    import torch
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama::custom_sdpa / update_cache
    import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed::embedding_byte
    from executorch.runtime import Runtime, Verification
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    program = Runtime.get().load_program(HERE / "model.pte", verification=Verification.InternalConsistency)
    forward = program.load_method("forward")
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        text = _prompt(" ".join(args.prompt))
    except SecurityError as e:  # rendered in Jinja's sandbox: nothing the template asked for ran
        return fail(f"the chat template ({_template_name()}) tried something the Jinja sandbox forbids ({e}) and "
                    "was refused; do not trust this bundle's template: replace it with a known one")
    except TemplateError as e:
        return fail(f"the chat template ({_template_name()}) failed to render ({type(e).__name__}: {e}); "
                    "fix or replace it")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    room = cfg["context"] - len(ids)
    if room <= 0:
        return fail(f"the prompt is {len(ids)} tokens but this program holds {cfg['context']} positions (context in "
                    "executorch_config.json); shorten the prompt, or re-export with a larger "
                    "`edgekit export --format executorch --context N`")
    eos = set(gen.get("eos_token_ids") or []) | set(cfg.get("eos_token_id") or [])
    t = time.perf_counter()
    logits = forward.execute([torch.tensor([ids]), torch.tensor([0])])[0]
    out, pos = [], len(ids)
    for _ in range(min(args.max_tokens, room)):
        token = int(logits.reshape(-1).argmax())
        if token in eos:
            break
        out.append(token)
        logits = forward.execute([torch.tensor([[token]]), torch.tensor([pos])])[0]
        pos += 1
    print(tokenizer.decode(out))
    print(f"[{len(out)} tokens in {time.perf_counter() - t:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
