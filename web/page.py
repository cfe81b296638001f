"""Run a web bundle's page once in headless Chromium (tests and benchmarks): edgekit.runtimes.browser's driver.

    from web.page import open_page
    result = open_page(bundle_folder, prompt="...", max_tokens=32, threads=2)

The bundle is served by its own serve.py on a free 127.0.0.1 port; drive.mjs opens index.html?prompt=... and returns
what the page stored in window.edgekitResult (text, ids, timings, load time, time to first token, threads, SIMD,
cross-origin isolation, browser version), plus the browser's peak RSS.
"""

from __future__ import annotations

from edgekit.runtimes import browser
from edgekit.runtimes.browser import chromium, open_page

__all__ = ["chromium", "missing", "open_page"]


def missing() -> list[str]:
    """What the browser side lacks here (empty when node, web/node_modules and Chromium are all there)."""
    reason = browser.missing()
    return [reason] if reason else []
