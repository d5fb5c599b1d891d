"""The report: one static HTML page of every type's hours against its tier's service levels.

Per type, with hours on the x-axis: how long each hour took to close against the tier's
budget, what became of its messages (delivered, duplicates, late, dead-lettered, and lost
against the auditor's count of what was published), its dead-letter kinds, and a summary
row, green where the SLOs hold and red where they do not. It is built from the
``_SUCCESS`` manifests and files (``audit_type``) and the auditor's ``counts.json``. The
page is one file with inline CSS and SVG, so it needs no network to view, and every number
a chart shows is also in a table cell (``data-type``, ``data-hour``, ``data-metric``)::

    python -m event_delivery.ops.report --storage_root gs://event-delivery-local --window_seconds 10 \\
        --output .demo/report.html
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import html
import math
import sys

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import Tier, load_registry
from event_delivery.ops.audit import HourAudit, audit_type

OUTCOMES = ("delivered", "duplicates", "late", "dead_lettered")
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


# The model: what the page shows, with no I/O.


@dataclasses.dataclass(frozen=True)
class TypeReport:
    event_type: str
    tier: Tier
    window_seconds: int
    hours: tuple[HourAudit, ...]  # judged overdue or not by the audit (``slo.is_overdue``)
    dead_letter_kinds: dict[str, int]
    problems: tuple[str, ...] = ()

    @property
    def close_budget_seconds(self) -> int:
        """How long after its end an hour may take to close."""
        return slo.close_delay_budget_seconds(self.tier)

    def total(self, name: str) -> int | None:
        """Over the hours that know it (the auditor's counts, lost once closed); None if none does."""
        values = [getattr(hour, name) for hour in self.hours if getattr(hour, name) is not None]
        return sum(values) if values else None

    @property
    def on_time(self) -> int:
        return sum(hour.closed and not hour.overdue for hour in self.hours)

    @property
    def worst_dead_letter_rate(self) -> float:
        return max((hour.dead_letter_rate for hour in self.hours), default=0.0)

    def slo(self, metric: str, hour: HourAudit | None = None) -> str:
        """``ok``, ``bad`` or ``unknown`` (no hours, or no counts of a closed hour): the cell's
        colour, for the type or for one hour."""
        hours = self.hours if hour is None else (hour,)
        if not hours:
            return "unknown"
        if metric == "close_delay":
            return "bad" if any(h.overdue for h in hours) else "ok"
        if metric == "lost":
            lost = [h.lost for h in hours if h.lost is not None]
            return "bad" if any(lost) else "ok" if lost else "unknown"
        if metric == "dead_letter_rate":
            worst = max((h.dead_letter_rate for h in hours), default=0.0)
            return "bad" if worst > self.tier.max_dead_letter_rate else "ok"
        raise ValueError(metric)


# Reading the storage root.


def collect(storage_root: str, event_type: str, window_seconds: int, now: float | None = None) -> TypeReport:
    """A type's report from its files, manifests and auditor counts under ``storage_root``
    (as ``audit_type`` joins and judges them at ``now``)."""
    audit = audit_type(Layout.under(storage_root, event_type, window_seconds), now=now)
    hours = tuple(hour for _, hour in sorted(audit.hours.items()))
    kinds = sum((hour.dead_letter_kinds for hour in hours), collections.Counter())
    tier = load_registry()[event_type].tier
    return TypeReport(event_type, tier, window_seconds, hours, dict(kinds), tuple(audit.problems))


def write_report(storage_root: str, window_seconds: int, event_types, output: str) -> str:
    """Writes the report of ``event_types`` to ``output`` (a local path or gs://); returns ``output``."""
    storage_root = storage_root.rstrip("/")
    reports = [collect(storage_root, name, window_seconds) for name in event_types]
    page = render(reports, storage_root, datetime.datetime.now(datetime.timezone.utc))
    files.write_bytes(output, page.encode("utf-8"))
    return output


# The page: pure HTML and SVG from the model.


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _percent(rate: float) -> str:
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
        label = "0" if not tick else duration(tick) if durations else _count(int(tick))
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{_e(label)}</text>')
    slot = plot_w / n
    bar = min(slot * 0.7, 48)
    with_day = len({hour.partition[:13] for hour in report.hours}) > 1  # dt=YYYY-MM-DD
    every = math.ceil(n / max(1, plot_w // (84 if with_day else 62)))  # labels that do not overlap
    for i, hour in enumerate(report.hours):
        x = LEFT + i * slot
        parts.extend(draw(hour, x + (slot - bar) / 2, bar, y))
        if i % every == 0:
            label = hour_label(hour.partition, report.window_seconds, with_day)
            parts.append(f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{_e(label)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>')
    return _svg(report, chart, HEIGHT, parts + overlay(y))


def _svg(report: TypeReport, chart: str, height: int, parts: list[str]) -> str:
    label = f"{report.event_type}: {CHARTS[chart]}, per hour"
    return f'<svg viewBox="0 0 {WIDTH} {height}" role="img"><title>{_e(label)}</title>{"".join(parts)}</svg>'


def _rect(x, y_top, width, height, fill, tip, css="") -> str:
    return (
        f'<rect class="{css}" x="{x:.1f}" y="{y_top:.1f}" width="{width:.1f}" height="{max(height, 0):.1f}" '
        f'fill="{fill}"><title>{_e(tip)}</title></rect>'
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
            shapes.append(f'y2="{py:.1f}"><title>{_e(tip)}</title></line>')
        return shapes

    heights = [max(h.total + max(h.lost or 0, 0), h.published or 0) for h in report.hours]
    return _bars_svg(report, "volumes", max(heights, default=0) * 1.1, False, draw)


def _data(**attributes) -> str:
    return "".join(f' data-{name}="{_e(value)}"' for name, value in attributes.items() if value is not None)


def _td(text: str, slo: str | None = None, **data) -> str:
    css = f' class="{slo}"' if slo else ""
    return f"<td{css}{_data(**data, slo=slo)}>{_e(text)}</td>"


def _table(columns, rows, table_id: str, caption: str = "") -> str:
    head = "".join(f'<th scope="col">{_e(c)}</th>' for c in columns)
    caption = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<table id="{_e(table_id)}">{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def dead_letter_kinds(report: TypeReport) -> str:
    """A table whose last column draws each kind's share as a bar."""
    kinds = sorted(report.dead_letter_kinds.items(), key=lambda item: (-item[1], item[0]))
    if not kinds:
        return '<p class="empty">no dead letters</p>'
    most, rows = max(n for _, n in kinds), []
    for kind, n in kinds:
        bar = f'<td class="bar"><i style="width: {100 * n / most:.1f}%"></i></td>'
        cell = _td(f"{n:,}", type=report.event_type, metric="dead_letter_kind", kind=kind)
        rows.append(f'<tr><th scope="row">{_e(kind)}</th>{cell}{bar}</tr>')
    return _table(("kind", "dead letters", ""), rows, f"kinds-{report.event_type}")


OUTCOME_LABELS = tuple(LABELS.get(name, name) for name in OUTCOMES)
SUMMARY_COLUMNS = ("type", "tier", "hours", "closed on time", "published", *OUTCOME_LABELS, "lost", "dead-letter rate")


def summary_row(report: TypeReport) -> str:
    name, worst, limit = report.event_type, report.worst_dead_letter_rate, report.tier.max_dead_letter_rate

    def td(metric, text, slo=None, value=None):
        return _td(text, slo, type=name, metric=metric, value=value)

    cells = [
        f'<th scope="row"><a href="#type-{_e(name)}">{_e(name)}</a></th>',
        td("tier", report.tier.name),
        td("hours", _count(len(report.hours))),
        td("on_time", f"{report.on_time} of {len(report.hours)}", report.slo("close_delay"), report.on_time),
        *(td(metric, _count(report.total(metric))) for metric in ("published", *OUTCOMES)),
        td("lost", _count(report.total("lost")), report.slo("lost")),
        td("dead_letter_rate", f"{_percent(worst)} (max {_percent(limit)})", report.slo("dead_letter_rate"), worst),
    ]
    return f"<tr{_data(type=name)}>{''.join(cells)}</tr>"


HOUR_COLUMNS = (
    "hour (UTC)",
    "published",
    "distinct ids",
    *OUTCOME_LABELS,
    "lost",
    "dead-letter rate",
    "close delay",
    "state",
)


def hour_row(report: TypeReport, hour: HourAudit) -> str:
    def td(metric, text, slo=None, value=None):
        return _td(text, slo, type=report.event_type, hour=hour.partition, metric=metric, value=value)

    delay = hour.close_delay_so_far
    state = "closed" if hour.closed else f"open, {hour.staged:,} staged" if hour.staged else "open"
    cells = [
        f'<th scope="row">{_e(hour.partition)}</th>',
        *(td(metric, _count(getattr(hour, metric))) for metric in ("published", "distinct_ids", *OUTCOMES)),
        td("lost", _count(hour.lost), report.slo("lost", hour)),
        td(
            "dead_letter_rate",
            _percent(hour.dead_letter_rate),
            report.slo("dead_letter_rate", hour),
            hour.dead_letter_rate,
        ),
        td("close_delay", duration(delay), report.slo("close_delay", hour), None if delay is None else round(delay, 3)),
        td("state", state),
    ]
    return f"<tr{_data(type=report.event_type, hour=hour.partition)}>{''.join(cells)}</tr>"


def _figure(report: TypeReport, chart: str, body: str, legend: str = "") -> str:
    return (
        f"<figure{_data(type=report.event_type, chart=chart)}><figcaption>{_e(CHARTS[chart])}</figcaption>"
        f"{legend}{body}</figure>"
    )


def _legend(*names: str, **labels: str) -> str:
    items = (f'<li><i class="swatch {_e(n)}"></i>{_e(labels.get(n) or LABELS.get(n, n))}</li>' for n in names)
    return f'<ul class="legend">{"".join(items)}</ul>'


def type_section(report: TypeReport) -> str:
    name, tier, budget = report.event_type, report.tier, duration(report.close_budget_seconds)
    facts = (
        f"tier {tier.name} · an hour closes within {budget} of its end · at most "
        f"{_percent(tier.max_dead_letter_rate)} dead-lettered · published counted from {tier.audit_source}"
    )
    problems = "".join(f"<li>{_e(problem)}</li>" for problem in report.problems)
    hours = [hour_row(report, hour) for hour in report.hours]
    close_legend = _legend("ok", "bad", "open", "deadline", deadline=f"deadline: {budget}") if hours else ""
    volumes_legend = _legend(*OUTCOMES, "lost", "published") if hours else ""
    return (
        f'<section id="type-{_e(name)}"{_data(type=name)}><h2>{_e(name)}</h2><p class="facts">{_e(facts)}</p>'
        + (f'<ul class="problems">{problems}</ul>' if problems else "")
        + '<div class="charts">'
        + _figure(report, "close-delay", close_delay_chart(report), close_legend)
        + _figure(report, "volumes", volumes_chart(report), volumes_legend)
        + _figure(report, "dead-letter-kinds", dead_letter_kinds(report))
        + "</div>"
        + (_table(HOUR_COLUMNS, hours, f"hours-{name}", f"{name} per hour") if hours else "")
        + "</section>"
    )


STYLE = """
:root { --ok: #dafbe1; --ok-ink: #116329; --bad: #ffebe9; --bad-ink: #a40e26; --muted: #59636e; }
body { font: 14px/1.45 system-ui, "DejaVu Sans", sans-serif; color: #1f2328; margin: 0; background: #f6f8fa; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 0 0 2px; }
.meta, .facts, .key, .empty { color: var(--muted); margin: 0 0 12px; }
section { background: #fff; border: 1px solid #d1d9e0; border-radius: 8px; padding: 16px 20px; margin: 20px 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; margin-top: 8px; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e6eaef; text-align: right; white-space: nowrap; }
th[scope=row], thead th:first-child { text-align: left; } thead th { font-size: 12px; color: var(--muted); }
tbody th { font-weight: 400; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
td.ok { background: var(--ok); color: var(--ok-ink); } td.unknown { background: #eff2f5; color: var(--muted); }
td.bad { background: var(--bad); color: var(--bad-ink); font-weight: 600; }
td.bar { width: 60%; } td.bar i { display: block; height: 12px; border-radius: 2px; background: #8a5cc2; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 8px 32px; }
figure { margin: 8px 0; } figcaption { font-weight: 600; } svg { width: 100%; height: auto; display: block; }
.legend { list-style: none; padding: 0; margin: 2px 0 8px; display: flex; flex-wrap: wrap; gap: 4px 14px;
  font-size: 12px; color: var(--muted); }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
  vertical-align: -1px; }
.swatch.published { height: 3px; vertical-align: 3px; background: #1f2328; }
.swatch.open { border: 1.5px dashed #8c959f; width: 8px; height: 8px; background: #eaeef2; }
.swatch.deadline { width: 16px; height: 0; border-top: 2px dashed var(--bad-ink); vertical-align: 3px; }
.problems { color: var(--bad-ink); }
svg text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: var(--muted); } svg .empty { font-size: 13px; }
svg .grid { stroke: #eaeef2; } svg .axis { stroke: #8c959f; }
svg .published { stroke: #1f2328; stroke-width: 2.5; }
svg .deadline { stroke: var(--bad-ink); stroke-width: 1.5; stroke-dasharray: 6 4; }
svg rect.open { stroke-width: 1.5; stroke-dasharray: 4 3; stroke: #8c959f; } svg rect.open.bad { stroke: #d1242f; }
"""


def render(reports: list[TypeReport], storage_root: str, generated_at: datetime.datetime) -> str:
    """The whole page: a summary row per type, then each type's charts and hours."""
    swatches = "".join(f".swatch.{name} {{ background: {color}; }}\n" for name, color in COLORS.items())
    window = reports[0].window_seconds if reports else partitions.HOUR_SECONDS
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Event delivery report</title><style>{STYLE}{swatches}</style></head><body><main>"
        "<h1>Event delivery report</h1>"
        f'<p class="meta">{_e(storage_root)} · hours of {_e(duration(window))} · generated '
        f"{_e(generated_at.strftime('%Y-%m-%d %H:%M:%S UTC'))}</p>"
        '<p class="key">Green: the tier\'s service level holds. Red: it does not (an hour closed late or is '
        "still open past its deadline, lost ≠ 0, or too many dead letters). Grey: not known yet (no hours, or "
        "no auditor counts of a closed hour).</p>"
        + _table(SUMMARY_COLUMNS, map(summary_row, reports), "summary", "Summary per type")
        + "".join(type_section(report) for report in reports)
        + "</main></body></html>\n"
    )


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m event_delivery.ops.report", description=__doc__.split("\n")[0])
    parser.add_argument("--storage_root", required=True, help="The jobs' --storage_root.")
    parser.add_argument("--window_seconds", type=int, default=partitions.HOUR_SECONDS)
    parser.add_argument("--event_type", action="append", choices=sorted(registry), help="Default: every type.")
    parser.add_argument("--output", default="report.html", help="The HTML file to write (local or gs://).")
    args = parser.parse_args(argv)
    from event_delivery.cloud import preflight
    from event_delivery.cloud.clients import use_emulator_credentials

    root = args.storage_root.rstrip("/")
    with preflight.exit_on_failure(parser.prog):
        preflight.check_root(root, create=False)
    use_emulator_credentials()
    print(write_report(root, args.window_seconds, args.event_type or sorted(registry), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
