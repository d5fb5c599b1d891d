"""The report's SVG bar charts of a type's hours, and the formatting its charts and tables share."""

from __future__ import annotations

import datetime
import html
import math

from event_delivery.contract import partitions
from tools.ops.report_model import OUTCOMES, TypeReport

LABELS = {"dead_lettered": "dead-lettered", "ok": "on time", "bad": "overdue", "open": "still open"}
CHARTS = {
    "close-delay": "Close delay after the hour's end",
    "volumes": "What became of the messages",
    "dead-letter-kinds": "Dead-letter kinds",
}
COLORS = {
    "delivered": "#3b6fb6",
    "duplicates": "#9dbbe0",
    "late": "#e3a33b",
    "dead_lettered": "#8a5cc2",
    "lost": "#d1242f",
    "ok": "#2da44e",
    "bad": "#d1242f",
}


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def number(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def percent(rate: float) -> str:
    return f"{rate:.2%}" if rate < 0.1 else f"{rate:.1%}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if abs(seconds) >= 2 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    value, unit = (seconds / 60, "min") if abs(seconds) >= 2 * 60 else (seconds, "s")
    return f"{value:.0f} {unit}" if abs(value) >= 10 else f"{value:.1f}".removesuffix(".0") + f" {unit}"


def hour_label(partition: str, window_seconds: int, with_day: bool) -> str:
    millis = partitions.partition_bounds(partition, window_seconds)[0]
    start = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)
    clock = f"{start:%H:%M}" if window_seconds % 60 == 0 else f"{start:%H:%M:%S}"
    return f"{start:%m-%d} {clock}" if with_day else clock


def _ticks(top: float, durations: bool) -> list[float]:
    """About four round steps from 0 to at least ``top``."""
    if durations:
        steps = [s * u for u in (1, 60, 3600) for s in (1, 2, 5, 10, 15, 30)] + [3 * 3600, 6 * 3600, 12 * 3600]
    else:
        magnitude = 10 ** math.floor(math.log10(max(top, 1) / 4))
        steps = [magnitude * s for s in (1, 2, 5, 10)]
    step = next((s for s in sorted(steps) if top / s <= 4), max(steps))
    return [step * i for i in range(math.ceil(top / step) + 1)]


WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 560, 230, 58, 14, 14, 30


def _bars_svg(report: TypeReport, chart: str, y_max: float, durations: bool, draw, overlay=lambda y: []) -> str:
    """An SVG bar chart with one slot per hour: ``draw(hour, x, width, y)`` returns a slot's
    shapes and ``overlay(y)`` those drawn over all, where ``y(value)`` is a value's height."""
    n, plot_w, plot_h = len(report.hours), WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    if not n:
        return _svg(report, chart, 40, ['<text class="empty" x="0" y="24">no hours yet</text>'])
    ticks = _ticks(y_max, durations)
    top = ticks[-1] or 1

    def y(value: float) -> float:
        return TOP + plot_h - plot_h * min(value, top) / top

    parts = []
    for tick in ticks:
        label = "0" if not tick else duration(tick) if durations else number(int(tick))
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    slot = plot_w / n
    bar = min(slot * 0.7, 48)
    with_day = len({hour.partition[:13] for hour in report.hours}) > 1  # dt=YYYY-MM-DD
    every = math.ceil(n / max(1, plot_w // (84 if with_day else 62)))  # labels that do not overlap
    for i, hour in enumerate(report.hours):
        x = LEFT + i * slot
        parts.extend(draw(hour, x + (slot - bar) / 2, bar, y))
        if i % every == 0:
            label = hour_label(hour.partition, report.window_seconds, with_day)
            parts.append(f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(label)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>')
    return _svg(report, chart, HEIGHT, parts + overlay(y))


def _svg(report: TypeReport, chart: str, height: int, parts: list[str]) -> str:
    label = f"{report.event_type}: {CHARTS[chart]}, per hour"
    return f'<svg viewBox="0 0 {WIDTH} {height}" role="img"><title>{escape(label)}</title>{"".join(parts)}</svg>'


def _rect(x, y_top, width, height, fill, tip, css="") -> str:
    return (
        f'<rect class="{css}" x="{x:.1f}" y="{y_top:.1f}" width="{width:.1f}" height="{max(height, 0):.1f}" '
        f'fill="{fill}"><title>{escape(tip)}</title></rect>'
    )


def close_delay_chart(report: TypeReport) -> str:
    budget = report.close_budget_seconds

    def draw(hour, x, width, y):
        if hour.close_delay_so_far is None:
            return []
        state = "bad" if hour.overdue else "ok"
        tip = f"{hour.partition}: {'closed after' if hour.closed else 'open for'} {duration(hour.close_delay_so_far)}"
        top = min(y(hour.close_delay_so_far), y(0) - 2)  # a prompt close still shows
        if hour.closed:
            return [_rect(x, top, width, y(0) - top, COLORS[state], tip)]
        return [_rect(x, top, width, y(0) - top, "#eaeef2", tip, f"open {state}")]

    def deadline(y):
        return [f'<line class="deadline" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(budget):.1f}" y2="{y(budget):.1f}"/>']

    top = max([budget, *(hour.close_delay_so_far or 0 for hour in report.hours)]) * 1.1
    return _bars_svg(report, "close-delay", top, True, draw, deadline)


def volumes_chart(report: TypeReport) -> str:
    def draw(hour, x, width, y):
        shapes, base = [], 0
        for name in (*OUTCOMES, "lost"):
            value = max(getattr(hour, name) or 0, 0)
            if value:
                tip = f"{hour.partition}: {value:,} {LABELS.get(name, name)}"
                shapes.append(_rect(x, y(base + value), width, y(base) - y(base + value), COLORS[name], tip))
                base += value
        if hour.published is not None:
            py, tip = y(hour.published), f"{hour.partition}: {hour.published:,} published"
            shapes.append(f'<line class="published" x1="{x - 3:.1f}" x2="{x + width + 3:.1f}" y1="{py:.1f}" ')
            shapes.append(f'y2="{py:.1f}"><title>{escape(tip)}</title></line>')
        return shapes

    heights = [max(h.total + max(h.lost or 0, 0), h.published or 0) for h in report.hours]
    return _bars_svg(report, "volumes", max(heights, default=0) * 1.1, False, draw)
