#!/usr/bin/env python3
"""Chat with this bundle's GGUF model through llama.cpp. Needs only: pip install "llama-cpp-python>=0.3.0"

    python run_llamacpp.py "Why is the sky blue?"
    python run_llamacpp.py --max-tokens 64 --threads 4 "Hello"

The reply goes to stdout; a one-line summary (tokens, seconds) goes to stderr.
Generation defaults (temperature, top_p, max_new_tokens, stop strings) come from generation.json
next to this file; the chat template is chat_template.jinja if the bundle has one, else the one the
GGUF embeds.

Intel AMX CPUs (recent Xeons): llama-cpp-python 0.3.36 can crash with a segfault in the first decode
after llama.cpp repacks the weights into its AMX "extra" buffer type. Turning the extra buffer types
off avoids it and does not change the output. This script does that by itself when /proc/cpuinfo
lists AMX; force it with --no-extra-buffers or NO_EXTRA_BUFFERS=1 (NO_EXTRA_BUFFERS=0 forces them on).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_json(name: str) -> dict:
    path = HERE / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def cpu_has_amx() -> bool:
    try:
        return "amx" in Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False


def disable_extra_buffer_types() -> None:
    """Make every model loaded from now on start from default params with use_extra_bufts=False."""
    import llama_cpp.llama as high_level

    low_level = high_level.llama_cpp
    defaults = low_level.llama_model_default_params

    def params_without_extra_buffers():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):  # older llama-cpp-python builds have no such field
            params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = params_without_extra_buffers


def chat_handler(tokenizer_config: dict):
    """A handler for the bundle's chat_template.jinja (rendered in llama-cpp-python's sandboxed Jinja), or None."""
    path = HERE / "chat_template.jinja"
    if not path.is_file():
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token(key: str) -> str:
        value = tokenizer_config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    return Jinja2ChatFormatter(path.read_text(encoding="utf-8"), eos_token=token("eos_token"),
                               bos_token=token("bos_token")).to_chat_handler()


def fail(message: str) -> int:
    """One line on stderr, exit code 2."""
    print(f"{Path(__file__).name}: error: {message}", file=sys.stderr)
    return 2


def main() -> int:
    gen = read_json("generation.json")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="+", help="what to say to the model")
    ap.add_argument("--max-tokens", type=int, default=gen.get("max_new_tokens", 256))
    ap.add_argument("--temperature", type=float, default=gen.get("temperature", 0.0) if gen.get("do_sample") else 0.0,
                    help="0 = greedy (the default unless generation.json asks for sampling)")
    ap.add_argument("--top-p", type=float, default=gen.get("top_p", 1.0))
    ap.add_argument("--context", type=int, default=int(read_json("manifest.json").get("context", 2048)))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-extra-buffers", action="store_true",
                    help="turn off llama.cpp's extra (AMX repack) buffer types; see the note at the top")
    args = ap.parse_args()

    import llama_cpp

    env = os.environ.get("NO_EXTRA_BUFFERS")
    if args.no_extra_buffers or env == "1" or (env is None and cpu_has_amx()):
        disable_extra_buffer_types()
    from jinja2.exceptions import SecurityError, TemplateError

    template = "chat_template.jinja" if (HERE / "chat_template.jinja").is_file() else "the chat template in model.gguf"
    try:
        llm = llama_cpp.Llama(model_path=str(HERE / "model.gguf"), n_ctx=args.context, n_threads=args.threads,
                              chat_handler=chat_handler(read_json("tokenizer_config.json")), verbose=False)
        t = time.perf_counter()
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": " ".join(args.prompt)}], max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, stop=gen.get("stop") or None)
    except SecurityError as e:  # the template is rendered in Jinja's sandbox: nothing it asked for ran
        return fail(f"{template} tried something the Jinja sandbox forbids ({e}) and was refused; "
                    "do not trust this bundle's template: replace it with a known one")
    except TemplateError as e:
        return fail(f"{template} failed to render ({type(e).__name__}: {e}); fix or replace it")
    except ValueError as e:
        if "context window" not in str(e):
            raise
        return fail(f"the prompt does not fit ({e}); shorten it, or pass a larger --context "
                    f"(at most {llama_cpp.llama_model_n_ctx_train(llm.model)}, what the model was trained for)")
    print(reply["choices"][0]["message"]["content"])
    print(f"[{reply['usage']['completion_tokens']} tokens in {time.perf_counter() - t:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
