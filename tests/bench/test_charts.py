"""Inline SVG charts: ticks cover the data, the Pareto frontier is right, text is escaped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgekit.bench import charts


@given(st.floats(0, 1e6), st.floats(1e-3, 1e6))
def test_nice_ticks_cover_the_range_in_even_steps(lo, span):
    ticks = charts.nice_ticks(lo, lo + span)
    assert ticks[0] <= lo + 1e-9 * span and ticks[-1] >= lo + span - 1e-9 * span
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:])}
    assert len(ticks) >= 2 and max(steps) - min(steps) <= 1e-6 * max(steps) + 1e-9


def test_log_ticks():
    assert charts.log_ticks(3e-6, 0.4) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert charts.log_ticks_125(70, 700) == [100, 200, 500]


def test_pareto_frontier_keeps_only_points_nothing_beats_on_both_axes():
    pts = [charts.Point(x, y, name, "g") for x, y, name in
           [(92, 0.4, "a"), (98, 0.003, "b"), (102, 0.39, "c"), (145, 0.005, "d"), (271, 6e-6, "e"), (538, 0.0, "f")]]
    assert [p.label for p in charts.pareto_frontier(pts)] == ["a", "b", "e", "f"]


def test_scatter_escapes_labels_and_draws_every_point():
    pts = [charts.Point(1, 2, "<b>&", "llama.cpp"), charts.Point(3, 4, "plain", "onnxruntime")]
    svg = charts.scatter(pts, "size (MB)", "speed (tok/s)")
    assert svg.count("<circle") == 2 and "&lt;b&gt;&amp;" in svg and "<b>" not in svg


def test_faded_bars_are_hatched_and_noted():
    svg = charts.hbars([charts.Bar("fits", 10, "llama.cpp"), charts.Bar("big", 5, "llama.cpp", "does not fit", True)],
                       "tok/s", uid="t")
    assert 'fill="url(#t-hatch)"' in svg and "does not fit" in svg


def test_every_runtime_keeps_one_colour():
    assert charts.colour("llama.cpp") == charts.colour("gguf") != charts.colour("onnxruntime")
    assert charts.colour("some-new-runtime") == charts.colour("some-new-runtime")


def test_scatter_copes_with_one_point_and_with_none():
    one = charts.scatter([charts.Point(3.0, 1.0, "only", "llama.cpp")], "x", "y", log_x=True, log_y=True)
    assert one.count("<circle") == 1 and "nan" not in one
    assert "nothing here" in charts.scatter([], "x", "y", empty="nothing here")
