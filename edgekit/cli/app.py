"""Parse argv, set up logging and progress, run one command, and turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from pathlib import Path

from edgekit import __version__, artifact, progress
from edgekit.cli import bench, distill, doctor, export, package, plan, run
from edgekit.errors import EdgekitError

COMMAND_GROUPS = (plan, distill, export, bench, run, package, doctor)  # in the order `edgekit --help` lists them


@functools.lru_cache(maxsize=1)  # once per process: parsing leaves it unchanged (tests and fuzzing call main often)
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")

    p = argparse.ArgumentParser(prog="edgekit", parents=[common],
                                description="Distil, quantize, export, benchmark and package LLMs for small devices.")
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for group in COMMAND_GROUPS:
        group.add_commands(sub, common)
    return p


# Commands that write into the artifact store (converting the teacher counts); they take the store lock.
WRITERS = {"teacher", "distill", "eval", "export", "quantize", "fidelity", "bench", "run", "package"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read by transformers at import
        for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock", "gguf", "onnxruntime",
                      "torchao", "executorch", "torch", "torch.utils._pytree"):  # torch resets its root logger
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    progress.set_enabled(not args.quiet)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command in WRITERS:  # one writer per artifact store; the second waits and says for whom
            with artifact.locked(artifact.STORE_LOCK):
                return args.func(args)
        return args.func(args)
    except EdgekitError as e:
        if args.debug:
            raise
        print(f"edgekit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk inside a library's own writer (safetensors, onnx, llama.cpp ...)
        if args.debug or e.errno not in artifact.DISK_FULL:
            raise
        print(f"edgekit: error: {artifact.disk_error(e, Path(e.filename or artifact.home()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgekit: interrupted; finished artifacts are kept, re-run to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `edgekit plan | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
