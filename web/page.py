"""Run a web bundle's page once in headless Chromium: the Python side of web/drive.mjs (tests and benchmarks).

    from web.page import open_page
    result = open_page(bundle_folder, prompt="...", max_tokens=32, threads=2)

The bundle is served by its own serve.py on a free 127.0.0.1 port; drive.mjs opens index.html?prompt=... and returns
what the page stored in window.edgekitResult (text, timings from llama.cpp, load time, time to first token, threads,
SIMD, cross-origin isolation, browser version).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "drive.mjs"


def missing() -> list[str]:
    """What the browser side lacks here (empty when node, web/node_modules and Chromium are all there)."""
    return [what for what, ok in (("node", shutil.which("node")),
                                  ("web/node_modules (make web)", (HERE / "node_modules").is_dir()),
                                  ("chromium (apt install chromium)", chromium())) if not ok]


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_page(bundle: Path, prompt: str, max_tokens: int, *, threads: int | None = None, ignore_eos: bool = False,
              timeout: int = 300) -> dict:
    """Serve ``bundle`` with its serve.py and run its page once on ``prompt``; what the page measured."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(Path(bundle) / "serve.py"), str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        headers = None
        for _ in range(100):
            try:
                headers = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).headers
                break
            except OSError:
                time.sleep(0.1)
        if headers is None or headers["Cross-Origin-Opener-Policy"] != "same-origin":
            raise RuntimeError(f"{bundle}/serve.py did not serve the page with its COOP header on port {port}")
        query = {"prompt": prompt, "max_tokens": max_tokens, **({"threads": threads} if threads else {}),
                 **({"ignore_eos": 1} if ignore_eos else {})}
        url = f"http://127.0.0.1:{port}/index.html?" + urllib.parse.urlencode(query)
        out = subprocess.run(["node", str(DRIVER), url, "--timeout", str(timeout), "--chromium", chromium() or ""],
                             capture_output=True, text=True, timeout=timeout + 60)
        if out.returncode != 0:
            raise RuntimeError(f"the page failed in Chromium: {out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if "error" in result:
            raise RuntimeError(f"the page failed: {result['error']} ({result.get('logs')})")
        return result
    finally:
        server.terminate()
        server.wait(10)
