"""How the commands print: aligned tables, parameter counts, JSON on stdout."""

from __future__ import annotations

import json
import sys


def table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in
                         enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=lambda o: o.as_dict() if hasattr(o, "as_dict") else str(o))
    sys.stdout.write("\n")
