"""The figures logged to MLflow read as they should: nothing hides the numbers they print."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.core.results import StepCounts
from clipforge.flows.figures import funnel_figure

step_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=24)
counts = st.tuples(st.integers(0, 10_000_000), st.integers(0, 10_000_000))


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(step_names, counts, min_size=1, max_size=8))
def test_the_funnel_s_legend_never_covers_a_count_and_every_count_fits(funnel):
    fig = funnel_figure({step: StepCounts(seen=k + d, kept=k, dropped=d) for step, (k, d) in funnel.items()})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    labels = [t for t in ax.texts if " kept / " in t.get_text()]
    assert [t.get_text() for t in labels] == [f" {k:,} kept / {d:,} dropped" for k, d in funnel.values()]
    legend = fig.legends[0].get_window_extent(renderer)
    figure = fig.bbox
    axes = ax.get_window_extent(renderer)
    for label in labels:
        box = label.get_window_extent(renderer)
        assert not box.overlaps(legend), label.get_text()
        # inside the axes (and so inside the figure): nothing cut off at the right edge
        assert axes.x0 <= box.x0 and box.x1 <= axes.x1 + 0.5 and box.x1 <= figure.x1, label.get_text()
    assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 and figure.y0 <= legend.y0
