"""Fake bench runtimes, registered the way a third-party plugin would register a runner.

The benchmark worker imports this module (a runner's ``open.__module__``) in its own process,
so these must register at import. They all claim the ``gguf`` format and ignore the file.
"""

from __future__ import annotations

import os
import sys
import time

from edgekit.runtimes import Runtime as Runner, register_runtime as register_runner


class FakeSession:
    context = 4096

    def __init__(self, path, threads, *, gpu=False, context=None, short=False):
        self.short = short

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def prefill(self, ids: list[int]) -> int:
        return len(ids) % 7

    def decode(self, n: int) -> list[int]:
        return [1] * (n - 1 if self.short else n)

    def close(self) -> None:
        pass


def open_ok(path, threads, **kw):
    return FakeSession(path, threads, **kw)


def open_short(path, threads, **kw):
    return FakeSession(path, threads, short=True, **kw)


def open_crash(path, threads, **kw):
    sys.stderr.write("fake runtime: illegal instruction in kernel_q8\n")
    sys.stderr.flush()
    os.abort()


def open_hang(path, threads, **kw):
    time.sleep(120)


RUNNERS = [
    Runner("fake-ok", ("gguf",), "json", "json", open_ok, lambda: "not available on this host: fake has no GPU",
           gpu_variant=True),
    Runner("fake-gpu", ("gguf",), "json", "json", open_ok, lambda: None, gpu_variant=True),
    Runner("fake-short", ("gguf",), "json", "json", open_short),
    Runner("fake-crash", ("gguf",), "json", "json", open_crash),
    Runner("fake-hang", ("gguf",), "json", "json", open_hang),
    Runner("fake-missing", ("gguf",), "edgekit_fake_runtime_not_installed", "edgekit-fake-runtime", open_ok),
]

for _runner in RUNNERS:
    register_runner(_runner)
