"""Render an HTML report to PNG with a headless browser, to look at it the way a reader will.

    python benchmarks/screenshot.py path/to/report.html [--width 1280] [--out report.png]

Writes ``report.png`` next to the HTML (or ``--out``). The browser is the first found of
``$EDGEKIT_BROWSER``, chromium-headless-shell, chromium, google-chrome and firefox. None
installed? On Debian/Ubuntu (as root):

    apt-get install -y --no-install-recommends chromium-headless-shell fonts-dejavu-core

(or ``apt-get install -y chromium`` / ``firefox-esr``). With Chromium the whole page is captured:
a first headless pass reads the page's height (a copy of the page with one line of script that
puts ``scrollHeight`` in the title, read back with ``--dump-dom``), the second takes the shot at
that height. Firefox gets ``--height``. The test suite does not need a browser: this is a tool
for looking, not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUMS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
             "headless_shell")
FIREFOXES = ("firefox", "firefox-esr")
INSTALL = ("no headless browser found. Install one, e.g. on Debian/Ubuntu:\n"
           "    apt-get install -y --no-install-recommends chromium-headless-shell fonts-dejavu-core\n"
           "or point EDGEKIT_BROWSER at a chromium/chrome/firefox binary.")


def find_browser() -> tuple[str, str] | None:
    """(kind, path) of the first browser found: kind is 'chromium' or 'firefox'."""
    env = os.environ.get("EDGEKIT_BROWSER")
    if env:
        path = shutil.which(env) or env
        return ("firefox" if "firefox" in Path(path).name else "chromium", path)
    for name in CHROMIUMS:
        if path := shutil.which(name):
            return "chromium", path
    for name in FIREFOXES:
        if path := shutil.which(name):
            return "firefox", path
    return None


def command(kind: str, browser: str, html: Path, png: Path, width: int, height: int, profile: str) -> list[str]:
    url = html.resolve().as_uri()
    if kind == "firefox":
        return [browser, "--headless", "--profile", profile, "--screenshot", str(png),
                f"--window-size={width},{height}", url]
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox on
    return [browser, *flags, url]


PROBE = "<script>document.title='EDGEKIT_HEIGHT='+Math.ceil(document.documentElement.scrollHeight)</script>\n"


def page_height(browser: str, html: Path, width: int, profile: str) -> int | None:
    """The page's full height at ``width`` CSS pixels, laid out by Chromium itself (None if unreadable)."""
    probe = html.with_name(f".{html.stem}.height-probe.html")  # beside the page, so relative links still resolve
    probe.write_text(html.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
    try:
        cmd = command("chromium", browser, probe, Path(os.devnull), width, 800, profile)
        cmd = [c for c in cmd if not c.startswith("--screenshot")]
        cmd.insert(-1, "--dump-dom")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r"EDGEKIT_HEIGHT=(\d+)", out)
    return int(m.group(1)) if m else None


def screenshot(html: Path, png: Path | None = None, width: int = 1280, height: int | None = None) -> Path:
    """Write a PNG of ``html`` (default: beside it); ``height`` None means the whole page (Chromium)."""
    found = find_browser()
    if found is None:
        raise SystemExit(INSTALL)
    kind, browser = found
    png = Path(png or html.with_suffix(".png")).resolve()
    with tempfile.TemporaryDirectory(prefix="edgekit-shot-") as profile:
        if height is None:
            height = (page_height(browser, html, width, profile) if kind == "chromium" else None) or 4000
        cmd = command(kind, browser, html, png, width, height, profile)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.is_file():
        raise SystemExit(f"{browser} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: next to the HTML)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=None, help="window height (default: the whole page)")
    args = ap.parse_args()
    if not args.html.is_file():
        sys.exit(f"no such file: {args.html}")
    print(screenshot(args.html, args.out, args.width, args.height))


if __name__ == "__main__":
    main()
