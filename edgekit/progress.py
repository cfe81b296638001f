"""Progress bars for long work, on stderr, silenced by the CLI's --quiet (or EDGEKIT_QUIET=1).

The library calls :func:`bar`; whether anything is drawn is decided here once,
so library code never prints. With stderr not a terminal, tqdm stays quiet.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

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
    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
        disable=None if _enabled else True, leave=False, dynamic_ncols=True,
    )
