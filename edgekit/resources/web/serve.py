"""Serve this folder on http://127.0.0.1:8000 with the headers that turn on WebAssembly threads (made by edgekit).

    python serve.py [PORT]

Browsers give a page SharedArrayBuffer (so llama.cpp's WebAssembly build can use several threads) only when
the page is cross-origin isolated: Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy:
require-corp (or credentialless). Any web server that sends these two headers works as well.
"""

import functools
import http.server
import sys
from pathlib import Path


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript", ".gguf": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "credentialless")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    handler = functools.partial(Handler, directory=str(Path(__file__).resolve().parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        print(f"open http://127.0.0.1:{port}/  (Ctrl-C to stop)")
        httpd.serve_forever()


if __name__ == "__main__":
    main()
