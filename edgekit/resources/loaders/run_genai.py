#!/usr/bin/env python3
"""Chat with this bundle's ONNX model through onnxruntime-genai. Needs only: pip install "onnxruntime-genai>=0.16"

    python run_genai.py "Why is the sky blue?"
    python run_genai.py --max-tokens 64 "Hello"

The reply goes to stdout; a one-line summary (tokens, seconds) goes to stderr. Decoding is greedy;
max_new_tokens defaults to generation.json's, and the chat template is chat_template.jinja if the
bundle has one, else the tokenizer's own. onnxruntime-genai reads genai_config.json (model file,
KV-cache layout, eos ids) and the tokenizer files from this folder.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def context_length() -> int | None:
    try:
        return int(json.loads((HERE / "genai_config.json").read_text(encoding="utf-8"))["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fail(message: str) -> int:
    """One line on stderr, exit code 2."""
    print(f"{Path(__file__).name}: error: {message}", file=sys.stderr)
    return 2


def main() -> int:
    gen_path = HERE / "generation.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="+", help="what to say to the model")
    ap.add_argument("--max-tokens", type=int, default=gen.get("max_new_tokens", 256))
    args = ap.parse_args()

    import onnxruntime_genai as og

    model = og.Model(str(HERE))
    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": " ".join(args.prompt)}])
    template = HERE / "chat_template.jinja"
    try:  # onnxruntime-genai renders templates with its own Jinja subset (no Python objects to reach)
        if template.is_file():
            text = tokenizer.apply_chat_template(messages, template_str=template.read_text(encoding="utf-8"),
                                                 add_generation_prompt=True)
        else:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - genai raises RuntimeError (or others) for a template it cannot render
        where = "chat_template.jinja" if template.is_file() else "the tokenizer's chat template"
        return fail(f"{where} could not be rendered ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                    "fix or replace it")
    ids = tokenizer.encode(text)
    limit = context_length()
    if limit and len(ids) >= limit:
        return fail(f"the prompt is {len(ids)} tokens but the model holds {limit} positions (context_length in "
                    "genai_config.json); shorten the prompt")

    params = og.GeneratorParams(model)
    max_length = len(ids) + args.max_tokens
    params.set_search_options(max_length=min(max_length, limit) if limit else max_length, do_sample=False,
                              num_beams=1)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    eos = {int(i) for i in getattr(tokenizer, "eos_token_ids", ())}  # older versions: genai stops at eos itself
    stream, pieces, n, t = tokenizer.create_stream(), [], 0, time.perf_counter()
    while not generator.is_done() and n < args.max_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        n += 1
        if token in eos:
            break
        pieces.append(stream.decode(token))
    print("".join(pieces))
    print(f"[{n} tokens in {time.perf_counter() - t:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
