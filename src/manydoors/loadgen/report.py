"""Render a load report (the JSON ``manydoors load`` writes) as a three-panel PNG.

matplotlib is an optional extra (``manydoors[plot]``) and costs ~0.5 s and ~60 MiB to
import, so it is imported inside :func:`write_plot`: a load run without ``--plot``
never loads it. The Figure API with the Agg canvas is used rather than pyplot, so no
global figure state or GUI backend is involved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CONNECT_BUCKET_MS = 0.1  # histograms["connect_0.1ms"]: bucket k is [k, k+1) * 0.1 ms
DELIVERY_BUCKET_MS = 1.0  # histograms["delivery_ms"][n]: bucket k is [k, k+1) ms
MAX_DELIVERY_LINES = 10  # beyond this the legend hides the plot; the rest are summarised


def write_plot(report: dict[str, Any], path: str) -> None:
    """Write ``report`` as a PNG to ``path``: connections over time and both latencies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 12), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    timeline_ax, connect_ax, delivery_ax = fig.subplots(3, 1)
    _plot_timeline(timeline_ax, report)
    _plot_connect(connect_ax, report)
    _plot_deliveries(delivery_ax, report)
    fig.suptitle(_title(report), fontsize=14)
    fig.savefig(path, format="png")


def _title(report: dict[str, Any]) -> str:
    conns = report.get("connections", {})
    rate = report.get("rate_achieved")
    rate_text = f"{rate:,}/s" if rate is not None else "rate n/a"
    return (
        f"manydoors load: {conns.get('peak', 0):,} of {conns.get('target', 0):,} "
        f"connections, {rate_text}"
    )


def _plot_timeline(ax: Axes, report: dict[str, Any]) -> None:
    timeline: list[dict[str, Any]] = report.get("timeline") or []
    target = report.get("connections", {}).get("target")
    ax.set_title("connections over time")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("connections")
    if target:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:,}")
    if not timeline:
        _say(ax, "no samples")
        return
    t = [s["t"] for s in timeline]
    ax.plot(t, [s["open"] for s in timeline], label="open")
    ax.plot(t, [s["ready"] for s in timeline], label="ready")
    # Thousands separators: a million is unreadable as 1e6 offset notation.
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.set_ylim(0, max(target or 0, *(s["open"] for s in timeline), 1) * 1.05)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    errors = [s.get("errors", 0) for s in timeline]
    if any(errors):
        # A few hundred errors against a million connections is a flat line on the
        # connections axis, so errors get their own axis on the right.
        err_ax = ax.twinx()
        (line,) = err_ax.plot(t, errors, color="tab:red", label="errors (right axis)")
        err_ax.set_ylabel("errors", color="tab:red")
        err_ax.tick_params(axis="y", colors="tab:red")
        err_ax.yaxis.set_major_formatter("{x:,.0f}")
        err_ax.set_ylim(bottom=0)
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, loc="lower right")


def _plot_connect(ax: Axes, report: dict[str, Any]) -> None:
    hist = report.get("histograms", {}).get("connect_0.1ms") or {}
    ax.set_title("connect latency (CDF)")
    ax.set_xlabel("ms (log scale)")
    ax.set_ylabel("% of connects")
    pct = report.get("connect_ms") or {}
    label = f"{sum(hist.values()):,} connects"
    if pct.get("max") is not None:
        # The slow tail (SYN retransmits at 1 s, 3 s) is invisible at the top of a CDF.
        label += f", max {pct['max']:g} ms"
    if not _cdf(ax, hist, CONNECT_BUCKET_MS, label=label):
        _say(ax, "no connects")
        return
    for name, color in (("p50", "tab:green"), ("p99", "tab:red")):
        _mark(ax, name, pct.get(name), CONNECT_BUCKET_MS, color)
    ax.legend(loc="lower right")


def _plot_deliveries(ax: Axes, report: dict[str, Any]) -> None:
    deliveries: list[dict[str, Any]] = report.get("deliveries") or []
    hists = report.get("histograms", {}).get("delivery_ms") or {}
    ax.set_title("delivery latency per broadcast (CDF)")
    ax.set_xlabel("ms from publish to receipt (log scale)")
    ax.set_ylabel("% of received")
    if not deliveries:
        _say(ax, "no broadcasts")
        return
    drawn = 0
    for d in deliveries[:MAX_DELIVERY_LINES]:
        label = f"message {d['n']}: {d['received']:,}/{d['expected']:,}"
        if d.get("error"):
            label += ", publish failed"
        if d.get("p99_ms") is not None:
            label += f", p99 {d['p99_ms']:g} ms"
        drawn += _cdf(ax, hists.get(str(d["n"])) or {}, DELIVERY_BUCKET_MS, label=label)
    if not drawn:
        _say(ax, "broadcasts sent, none received")
        return
    if len(deliveries) > MAX_DELIVERY_LINES:
        ax.plot([], [], " ", label=f"(+{len(deliveries) - MAX_DELIVERY_LINES} more not shown)")
    ax.legend(loc="lower right")


def _cdf(ax: Axes, hist: dict[str, int], bucket_ms: float, label: str) -> bool:
    """Plot the cumulative % of a bucket histogram; False (nothing drawn) if it is empty."""
    counts = sorted((int(k), v) for k, v in hist.items() if v)
    total = sum(v for _, v in counts)
    if not total:
        return False
    # A bucket's samples are all below its upper edge, so that is where the CDF reaches
    # them; it also keeps bucket 0 off x=0, which a log axis cannot show.
    xs = [counts[0][0] * bucket_ms or bucket_ms / 2]
    ys = [0.0]
    seen = 0
    for k, v in counts:
        seen += v
        xs.append((k + 1) * bucket_ms)
        ys.append(100 * seen / total)
    ax.plot(xs, ys, label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 101)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.grid(True, which="both", alpha=0.3)
    return True


def _mark(ax: Axes, name: str, ms: float | None, bucket_ms: float, color: str) -> None:
    if ms is None:
        return
    # The report gives a bucket's lower edge; for bucket 0 that is 0, not on a log axis.
    x, text = (ms, f"{ms:g} ms") if ms > 0 else (bucket_ms / 2, f"< {bucket_ms:g} ms")
    ax.axvline(x, linestyle=":", color=color, label=f"{name} {text}")


def _say(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=14)
    ax.set_xticks([])
    ax.set_yticks([])
