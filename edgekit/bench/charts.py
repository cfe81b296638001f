"""Small inline-SVG charts for the benchmark report: a scatter (optionally log-y, with a Pareto step) and
horizontal bars.

Why our own few hundred lines instead of a plotting library: edgekit pins no plotting
dependency (matplotlib or plotly would be a large install for one page), and a report
that is a single self-contained HTML file, with the charts inline as SVG, opens
anywhere -- offline, attached to an issue, on a phone -- with no script or network.

Every text that comes from data is escaped; colours are fixed per registered runtime so a
runtime looks the same in every chart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from edgekit import registry

# Runtimes take these in registration order (llama.cpp blue, onnxruntime amber, onnxruntime-genai green,
# executorch violet, pytorch grey); a runtime descriptor with a ``colour`` attribute keeps its own.
PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#6b7280", "#db2777", "#0891b2", "#65a30d", "#9333ea",
           "#ea580c")
_SPARE = PALETTE[5:]
FONT = "font-family=\"system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif\""


def colour(name: str) -> str:
    """A fixed colour per registered runtime, and per format in the colour of the first runtime that runs it
    (gguf as llama.cpp); any other name gets a stable spare."""
    every = registry.items(registry.RUNTIME)
    opt_in = {n for n, r in every.items() if getattr(r, "opt_in", False)}  # the browser runtimes: after the others
    rts = {**{n: r for n, r in every.items() if n not in opt_in}, **{n: every[n] for n in every if n in opt_in}}
    if name not in rts:
        name = next((rt for rt, d in rts.items() if name in d.formats), name)
    if name in rts:
        own = getattr(rts[name], "colour", None)
        return own or PALETTE[list(rts).index(name) % len(PALETTE)]
    return _SPARE[sum(map(ord, name)) % len(_SPARE)]


@dataclass
class Point:
    x: float
    y: float
    label: str
    group: str  # legend entry (a runtime or format)
    lo: float | None = None  # error bar (min) on y
    hi: float | None = None  # error bar (max) on y
    colour: str | None = None


# --------------------------------------------------------------------------- scales and ticks


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] in about ``n`` steps of 1, 2, 2.5 or 5 x 10^k."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.floor(lo / step + 1e-9) * step
    ticks, i = [], 0
    while True:
        t = round(first + i * step, 12)
        ticks.append(t)
        if t >= hi - 1e-9 * step:
            return ticks
        i += 1


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi] (both > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0**k for k in range(a, max(b, a + 1) + 1)]


def log_ticks_125(lo: float, hi: float) -> list[float]:
    """Ticks 1, 2, 5 x 10^k inside [lo, hi] (both > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [m * 10.0**k for k in range(a, b + 1) for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        k = math.floor(math.log10(abs(v)))
        m = v / 10**k
        return f"1e{k}" if abs(m - 1) < 1e-9 else f"{m:g}e{k}"
    return f"{v:,.6g}"


class _Scale:
    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False):
        self.lo, self.hi, self.a, self.b, self.log = lo, hi, a, b, log

    def __call__(self, v: float) -> float:
        if self.log:
            v, lo, hi = math.log10(max(v, self.lo)), math.log10(self.lo), math.log10(self.hi)
        else:
            lo, hi = self.lo, self.hi
        return self.a + (v - lo) / ((hi - lo) or 1) * (self.b - self.a)


# --------------------------------------------------------------------------- pieces


def _text(x, y, s, size=12, anchor="start", weight="normal", fill="#1f2937", extra="") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}"{extra}>{escape(str(s))}</text>')


def legend_html(groups: list[str], title: str = "") -> str:
    """An HTML legend (wraps nicely, stays readable when the SVG is scaled); nothing when there are no groups."""
    if not groups:
        return ""
    items = "".join(f'<span class="key"><span class="swatch" style="background:{colour(g)}"></span>{escape(g)}</span>'
                    for g in groups)
    head = f'<span class="legend-title">{escape(title)}</span>' if title else ""
    return f'<div class="legend">{head}{items}</div>'


def _overlap(box, boxes) -> float:
    """Total area ``box`` shares with ``boxes``."""
    x0, y0, x1, y1 = box
    return sum(max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3]) - max(y0, b[1])) for b in boxes)


def _place_labels(points: list[tuple[float, float, str]], bounds: tuple[float, float, float, float],
                  obstacles: list[tuple[float, float, float, float]] = (), size: int = 11) -> list[str]:
    """Greedy label placement: for each point, of the spots around it (right, left, above, below, diagonals,
    at four distances) take the one inside ``bounds`` that covers least of the points, the ``obstacles``
    (boxes x0, y0, x1, y1) and the labels placed so far, nearer spots winning ties; far ones get a leader line."""
    char_w, h = size * 0.6, size + 2
    taken = [(px - 6, py - 6, px + 6, py + 6) for px, py, _ in points] + list(obstacles)
    out = []
    for px, py, label in sorted(points, key=lambda p: (p[1], p[0])):
        w = char_w * len(label)
        best = None
        for d in (8, 16, 28, 42):
            for tx, ty, anchor in ((px + d, py + 4, "start"), (px - d, py + 4, "end"), (px, py - d + 2, "middle"),
                                   (px, py + d + 8, "middle"), (px + d - 2, py - d + 4, "start"),
                                   (px + d - 2, py + d + 4, "start"), (px - d + 2, py - d + 4, "end"),
                                   (px - d + 2, py + d + 4, "end")):
                x0 = tx if anchor == "start" else tx - w if anchor == "end" else tx - w / 2
                box = (x0, ty - h + 3, x0 + w, ty + 3)
                outside = not (bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1]
                               and box[3] <= bounds[3])
                cost = 1e6 * outside + 4 * _overlap(box, taken) + 3 * (d - 8)  # covering costs more than distance
                if best is None or cost < best[0]:
                    best = (cost, tx, ty, anchor, box)
        _, tx, ty, anchor, box = best
        taken.append(box)
        cx, cy = min(max(px, box[0]), box[2]), min(max(py, box[1]), box[3])
        if math.hypot(cx - px, cy - py) > 12:  # a label pushed away gets a leader line to its point
            out.append(f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{cx:.1f}" y2="{cy:.1f}" stroke="#6b7280" '
                       'stroke-width="0.9"/>')
        out.append(_text(tx, ty, label, size, anchor, fill="#374151"))
    return out


# --------------------------------------------------------------------------- charts


def pareto_frontier(points: list[Point]) -> list[Point]:
    """Points no other point beats on both axes (smaller x and smaller y), ordered by x."""
    best, front = math.inf, []
    for p in sorted(points, key=lambda p: (p.x, p.y)):
        if p.y < best:
            front.append(p)
            best = p.y
    return front


def scatter(points: list[Point], x_label: str, y_label: str, *, log_x: bool = False, log_y: bool = False,
            frontier: bool = False, zero_label: str = "0", empty: str = "no data", width: int = 560,
            height: int = 400) -> str:
    """An SVG scatter. ``log_x`` spaces x by ratio (ticks 1-2-5); ``log_y`` puts y on powers of ten (values
    <= 0 sit on the floor, marked ``zero_label``); ``frontier`` draws the lower-left Pareto step line and
    fades the points off it. Linear axes start at zero; with no points the chart says ``empty``."""
    left, right, top, bottom = 64, 18, 16, 52
    pw, ph = width - left - right, height - top - bottom
    if not points:
        return (f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" {FONT}>'
                + _text(width / 2, height / 2, empty, 14, "middle", fill="#6b7280") + "</svg>")
    xs = [p.x for p in points]
    ys = [v for p in points for v in (p.y, p.lo, p.hi) if v is not None]
    log_x = log_x and min(xs) > 0
    if log_x:  # pad by 30 % either side and tick inside, so the points use the width
        x_lo, x_hi = min(xs) / 1.3, max(xs) * 1.3
        xt = log_ticks_125(x_lo, x_hi)
        if len(xt) < 2:  # a narrow range may hold no 1-2-5 value
            xt = [t for t in nice_ticks(x_lo, x_hi, 3) if x_lo <= t <= x_hi]
    else:
        xt = nice_ticks(0, max(xs))
        x_lo, x_hi = xt[0], xt[-1]
    if log_y:
        pos = [v for v in ys if v > 0] or [1.0]
        yt = log_ticks(min(pos), max(pos))
        floor = yt[0]
    else:
        yt = nice_ticks(0, max(ys))
        floor = None
    pad = 14  # data sit this far inside the frame, so edge points keep room for their labels
    sx = _Scale(x_lo, x_hi, left + pad, left + pw - pad, log=log_x)
    sy = _Scale(yt[0], yt[-1], top + ph - pad, top + pad, log=log_y)
    out = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" {FONT}>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#e5e7eb"/>']
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e5e7eb"/>')
        out.append(_text(x, top + ph + 17, fmt_tick(t), 11, "middle", fill="#4b5563"))
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        tick = zero_label if (log_y and t == floor and any(p.y <= 0 for p in points)) else fmt_tick(t)
        out.append(_text(left - 7, y + 4, tick, 11, "end", fill="#4b5563"))
    out.append(_text(left + pw / 2, height - 10, x_label, 12, "middle", "600"))
    out.append(_text(15, top + ph / 2, y_label, 12, "middle", "600",
                     extra=f' transform="rotate(-90 15 {top + ph / 2:.1f})"'))
    front = pareto_frontier(points) if frontier else []
    lines = []  # boxes around the step line, kept clear of labels
    if len(front) > 1:
        steps = "".join(f" H{sx(p.x):.1f} V{sy(p.y):.1f}" for p in front[1:])
        for a, b in zip(front, front[1:]):
            lines.append((sx(a.x), sy(a.y) - 2, sx(b.x), sy(a.y) + 2))
            lines.append((sx(b.x) - 2, sy(a.y), sx(b.x) + 2, sy(b.y)))
        out.append(f'<path d="M{sx(front[0].x):.1f} {sy(front[0].y):.1f}{steps}" fill="none" stroke="#111827" '
                   'stroke-width="1.6" stroke-dasharray="5 3" opacity="0.7"/>')
    on_front = {id(p) for p in front}
    for p in points:
        x, y = sx(p.x), sy(p.y)
        c = p.colour or colour(p.group)
        if p.lo is not None and p.hi is not None:
            out.append(f'<line x1="{x:.1f}" y1="{sy(p.lo):.1f}" x2="{x:.1f}" y2="{sy(p.hi):.1f}" stroke="{c}" '
                       'stroke-width="1.5"/>')
        faded = frontier and id(p) not in on_front
        ring = ' stroke="#111827" stroke-width="2"' if frontier and not faded else ' stroke="#fff" stroke-width="1"'
        opacity = ' opacity="0.45"' if faded else ""
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if faded else 6}" fill="{c}"{ring}{opacity}>'
                   f'<title>{escape(p.label)}</title></circle>')
    out += _place_labels([(sx(p.x), sy(p.y), p.label) for p in points],
                         (left + 2, top + 2, left + pw - 2, top + ph - 2), lines)
    out.append("</svg>")
    return "".join(out)


@dataclass
class Bar:
    label: str
    value: float
    group: str
    note: str = ""  # printed after the value (e.g. "does not fit")
    faded: bool = False


def hbars(bars: list[Bar], unit: str, width: int = 560, label_width: int = 170, uid: str = "bars") -> str:
    """Horizontal bars with the value printed at the end of each; faded bars are drawn hatched and pale."""
    row, top, bottom, right = 24, 8, 34, 110
    height = top + row * max(len(bars), 1) + bottom
    pw = width - label_width - right
    vmax = max((b.value for b in bars), default=1.0) or 1.0
    ticks = nice_ticks(0, vmax, 4)
    sx = _Scale(0, ticks[-1], label_width, label_width + pw)
    out = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" {FONT}>',
           f'<defs><pattern id="{uid}-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#fff" stroke-width="3"/>'
           '</pattern></defs>']
    base = top + row * len(bars)
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{base}" stroke="#e5e7eb"/>')
        out.append(_text(x, base + 15, fmt_tick(t), 11, "middle", fill="#4b5563"))
    out.append(_text(label_width + pw / 2, base + 30, unit, 11, "middle", "600", fill="#374151"))
    for i, b in enumerate(bars):
        y = top + i * row
        w = max(sx(b.value) - label_width, 1.5)
        c = colour(b.group)
        label = b.label if len(b.label) <= 26 else b.label[:25] + "…"
        out.append(_text(label_width - 8, y + row / 2 + 4, label, 12, "end"))
        opacity = ' opacity="0.4"' if b.faded else ""
        out.append(f'<rect x="{label_width}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" rx="2" fill="{c}"'
                   f'{opacity}><title>{escape(b.label)}: {b.value:.3g} {escape(unit)}</title></rect>')
        if b.faded:
            out.append(f'<rect x="{label_width}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" '
                       f'fill="url(#{uid}-hatch)" opacity="0.6"/>')
        value = f"{b.value:,.0f}" if b.value >= 100 else f"{b.value:.3g}"
        note = f" · {b.note}" if b.note else ""
        out.append(_text(label_width + w + 6, y + row / 2 + 4, value + note, 11,
                         fill="#b91c1c" if b.faded else "#111827", weight="600" if not b.faded else "normal"))
    out.append("</svg>")
    return "".join(out)
