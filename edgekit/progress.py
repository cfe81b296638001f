"""Progress bars for long work, on stderr, silenced by the CLI's --quiet (or EDGEKIT_QUIET=1).

The library calls :func:`bar`; whether anything is drawn is decided here once,
so library code never prints. With stderr not a terminal, tqdm stays quiet.
"""

from __future__ import annotations

import contextlib
import logging
import os

_enabled = os.environ.get("EDGEKIT_QUIET", "") in ("", "0")


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on
    if not on:
        # transformers draws its own bars (e.g. while dequantizing a GGUF); silence them too.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def bar(total: float | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar (a context manager with ``.update(n)``), disabled when progress is off or stderr is not a TTY."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
        disable=None if _enabled else True, leave=False, dynamic_ncols=True,
    )


class _NoBar:
    def update(self, n: float = 1) -> None:
        pass


@contextlib.contextmanager
def steps(progress: bool, total: int, desc: str):
    """A bar counting the ``total`` steps of one job (``.update(1)`` per step); a no-op bar when ``progress`` is off."""
    if not progress:
        yield _NoBar()
        return
    with bar(total=total, desc=desc, unit="step") as b:
        yield b


@contextlib.contextmanager
def quiet(*names: str):
    """Raise the named loggers ("root" for the root logger) to ERROR for the duration: third-party INFO/WARNING
    chatter that would bury edgekit's own progress."""
    loggers = [logging.getLogger() if n == "root" else logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
