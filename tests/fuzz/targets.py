"""The parsers edgekit exposes to what users and downloaded files hand it, as fuzz targets (see harness.py)."""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

from tests.fuzz.harness import (
    ONNX_DATA,
    ONNX_DATA_FILE,
    ROOT,
    Target,
    gguf_seeds,
    onnx_seeds,
    pte_seeds,
    read,
    safetensors_seeds,
    tar_seeds,
)

RECIPES = ROOT / "recipes"
DEVICES = ROOT / "devices"
RESOURCES = ROOT / "edgekit" / "resources"
CORPUS = ROOT / "tests" / "robust" / "corpus" / "recipes"


def _recipe(path: Path) -> None:
    from edgekit.errors import RecipeError
    from edgekit.validate import validate_recipe

    problems = validate_recipe(path)
    if problems:  # what `edgekit validate` prints, one line each, before exit 2
        raise RecipeError("; ".join(problems))


def _device(path: Path) -> None:
    from edgekit.devices import load_profile_file

    load_profile_file(path)


def _data(path: Path) -> None:
    from edgekit.sources import load_examples

    load_examples([path])


@functools.cache
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]


def _template(path: Path) -> None:
    from edgekit.chat import render

    tok = _tokenizer()
    tok.chat_template = path.read_bytes().decode("utf-8", errors="replace")
    render(tok, CONVERSATION, True)


def _check(name: str):
    def run(path: Path) -> None:
        from edgekit import integrity

        getattr(integrity, name)(path)
    return run


def _verify(path: Path) -> None:
    from edgekit.package import verify

    verify(path if path.name != "manifest.json" else path.parent, strict=True)


PARSERS = ("parse_bytes", "parse_bandwidth", "parse_frequency", "parse_flops", "parse_duration")


def _units(path: Path) -> None:
    from edgekit import units
    from edgekit.errors import EdgekitError
    from edgekit.quantize.auto import parse_target

    text = path.read_bytes().decode("utf-8", errors="replace")
    refused = None
    for parse in [*(getattr(units, n) for n in PARSERS), parse_target]:
        try:
            parse(text)
            refused = False
        except EdgekitError as e:
            refused = e if refused is None else refused
    if refused:  # no parser took it
        raise refused


# Commands that only read their arguments and files (not `devices`/`doctor`, which measure the host for seconds, nor
# the commands that convert, train or export)
CLI_COMMANDS = ("plan", "validate", "verify", "show")


def _cli(path: Path) -> None:
    """``edgekit ARGS`` in-process, for the cheap commands; exit 2 (argparse or edgekit's error) is a refusal."""
    from edgekit.cli import main
    from edgekit.errors import ConfigError

    # a process's arguments are C strings: no NUL can reach argv, so the case drops them as a shell would
    args = path.read_bytes().decode("utf-8", errors="replace").replace("\0", "").split()
    if not args or args[0] not in CLI_COMMANDS:
        args = ["plan", *args[1:]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: usage and one error line, exit 2
            code = e.code
    if code not in (0, None, 2):
        raise AssertionError(f"exit {code}: {out.getvalue()[-300:]}")
    if code == 2:
        lines = [x for x in out.getvalue().splitlines() if "error" in x.lower()]
        if "Traceback" in out.getvalue():
            raise AssertionError(f"traceback printed: {out.getvalue()[-500:]}")
        raise ConfigError(lines[-1] if lines else "refused")


def _text_seeds() -> list[bytes]:
    out = []
    for name in ("heldout.jsonl", "calibration.jsonl"):
        lines = (RESOURCES / name).read_bytes().splitlines()[:6]
        out.append(b"\n".join(lines) + b"\n")
    out += [b'{"text": "hello world"}\n{"prompt": "Say hi"}\n',
            b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n']
    return out


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("recipe", lambda: read([*sorted(RECIPES.glob("*.yaml")), *sorted(CORPUS.glob("*.yaml"))[:20]]), _recipe,
           ".yaml", extra={"base.yaml": (RECIPES / "base.yaml").read_bytes()}),
    Target("device", lambda: _device_seeds(), _device, filename="fuzz-device.yaml"),
    Target("data-jsonl", _text_seeds, _data, ".jsonl"),
    Target("data-text", lambda: [b"Plain text.\n\nA second paragraph.\n", b"one line"], _data, ".txt"),
    Target("chat-template", lambda: read(sorted((RESOURCES / "chat_templates").glob("*.jinja"))), _template,
           ".jinja"),
    Target("gguf", gguf_seeds, _check("check_gguf"), ".gguf", text=False),
    Target("safetensors", safetensors_seeds, _check("check_safetensors"), ".safetensors", text=False),
    Target("onnx", onnx_seeds, _check("check_onnx"), ".onnx", text=False, extra={ONNX_DATA_FILE: ONNX_DATA}),
    Target("pte", pte_seeds, _check("check_pte"), ".pte", text=False),
    Target("bundle-tar", lambda: tar_seeds({"model.gguf": b"GGUF" + b"\0" * 60, "README.md": b"# m\n"}), _verify,
           ".tar.gz", text=False),
    Target("bundle-manifest", lambda: tar_manifest_seed(), _verify, filename="manifest.json",
           extra={"model.gguf": b"GGUF" + b"\0" * 60, "README.md": b"# m\n"}),
    Target("units", lambda: [b"64GiB", b"1.5GB/s", b"2.4GHz", b"105.6GFLOPS", b"30m", b"4.8bpw", b"90MB", b"1h30m"],
           _units),
    Target("cli", lambda: [b"plan --device pi-5-8gb --context 2048", b"plan --device ~/devices/x.yaml --json",
                           b"plan --json", b"validate recipes/quick.yaml",
                           b"plan --teacher default --device web --json",
                           b"verify missing.tar.gz --max-size 1GB"], _cli),
]}


def tar_manifest_seed() -> list[bytes]:
    import hashlib
    import json

    files = {"model.gguf": b"GGUF" + b"\0" * 60, "README.md": b"# m\n"}
    return [json.dumps({"schema": "edgekit.bundle/1", "files": {
        n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in files.items()}}).encode()]


def _device_seeds() -> list[bytes]:
    """The device profiles, renamed to the file they are written to (a profile's name must equal its file's)."""
    import re

    return [re.sub(rb"(?m)^name: .*$", b"name: fuzz-device", p.read_bytes()) for p in sorted(DEVICES.glob("*.yaml"))]
