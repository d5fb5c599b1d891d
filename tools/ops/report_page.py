"""The report's HTML page: a summary row per type, then each type's charts and its hours,
every number a chart shows also in a table cell (``data-type``, ``data-hour``, ``data-metric``).
The page's CSS is ``report.css`` beside this module, inlined so the page needs no network."""

from __future__ import annotations

import datetime
from importlib import resources

from event_delivery.contract import partitions
from tools.ops.audit_model import HourAudit
from tools.ops.report_charts import (
    CHARTS,
    COLORS,
    LABELS,
    close_delay_chart,
    duration,
    escape,
    number,
    percent,
    volumes_chart,
)
from tools.ops.report_model import OUTCOMES, TypeReport

STYLE = resources.files(__package__).joinpath("report.css").read_text(encoding="utf-8")


def _data(**attributes) -> str:
    return "".join(f' data-{name}="{escape(value)}"' for name, value in attributes.items() if value is not None)


def _td(text: str, slo: str | None = None, **data) -> str:
    css = f' class="{slo}"' if slo else ""
    return f"<td{css}{_data(**data, slo=slo)}>{escape(text)}</td>"


def _table(columns, rows, table_id: str, caption: str = "") -> str:
    head = "".join(f'<th scope="col">{escape(c)}</th>' for c in columns)
    caption = f"<caption>{escape(caption)}</caption>" if caption else ""
    return (
        f'<table id="{escape(table_id)}">{caption}<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def dead_letter_kinds(report: TypeReport) -> str:
    """A table whose last column draws each kind's share as a bar."""
    kinds = sorted(report.dead_letter_kinds.items(), key=lambda item: (-item[1], item[0]))
    if not kinds:
        return '<p class="empty">no dead letters</p>'
    most, rows = max(n for _, n in kinds), []
    for kind, n in kinds:
        bar = f'<td class="bar"><i style="width: {100 * n / most:.1f}%"></i></td>'
        cell = _td(f"{n:,}", type=report.event_type, metric="dead_letter_kind", kind=kind)
        rows.append(f'<tr><th scope="row">{escape(kind)}</th>{cell}{bar}</tr>')
    return _table(("kind", "dead letters", ""), rows, f"kinds-{report.event_type}")


OUTCOME_LABELS = tuple(LABELS.get(name, name) for name in OUTCOMES)
SUMMARY_COLUMNS = ("type", "tier", "hours", "closed on time", "published", *OUTCOME_LABELS, "lost", "dead-letter rate")


def summary_row(report: TypeReport) -> str:
    name, worst, limit = report.event_type, report.worst_dead_letter_rate, report.tier.max_dead_letter_rate

    def td(metric, text, slo=None, value=None):
        return _td(text, slo, type=name, metric=metric, value=value)

    cells = [
        f'<th scope="row"><a href="#type-{escape(name)}">{escape(name)}</a></th>',
        td("tier", report.tier.name),
        td("hours", number(len(report.hours))),
        td("on_time", f"{report.on_time} of {len(report.hours)}", report.slo("close_delay"), report.on_time),
        *(td(metric, number(report.total(metric))) for metric in ("published", *OUTCOMES)),
        td("lost", number(report.total("lost")), report.slo("lost")),
        td("dead_letter_rate", f"{percent(worst)} (max {percent(limit)})", report.slo("dead_letter_rate"), worst),
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
        f'<th scope="row">{escape(hour.partition)}</th>',
        *(td(metric, number(getattr(hour, metric))) for metric in ("published", "distinct_ids", *OUTCOMES)),
        td("lost", number(hour.lost), report.slo("lost", hour)),
        td(
            "dead_letter_rate",
            percent(hour.dead_letter_rate),
            report.slo("dead_letter_rate", hour),
            hour.dead_letter_rate,
        ),
        td("close_delay", duration(delay), report.slo("close_delay", hour), None if delay is None else round(delay, 3)),
        td("state", state),
    ]
    return f"<tr{_data(type=report.event_type, hour=hour.partition)}>{''.join(cells)}</tr>"


def _figure(report: TypeReport, chart: str, body: str, legend: str = "") -> str:
    return (
        f"<figure{_data(type=report.event_type, chart=chart)}><figcaption>{escape(CHARTS[chart])}</figcaption>"
        f"{legend}{body}</figure>"
    )


def _legend(*names: str, **labels: str) -> str:
    items = (f'<li><i class="swatch {escape(n)}"></i>{escape(labels.get(n) or LABELS.get(n, n))}</li>' for n in names)
    return f'<ul class="legend">{"".join(items)}</ul>'


def type_section(report: TypeReport) -> str:
    name, tier, budget = report.event_type, report.tier, duration(report.close_budget_seconds)
    facts = (
        f"tier {tier.name} · an hour closes within {budget} of its end · at most "
        f"{percent(tier.max_dead_letter_rate)} dead-lettered · published counted from {tier.audit_source}"
    )
    problems = "".join(f"<li>{escape(problem)}</li>" for problem in report.problems)
    hours = [hour_row(report, hour) for hour in report.hours]
    close_legend = _legend("ok", "bad", "open", "deadline", deadline=f"deadline: {budget}") if hours else ""
    volumes_legend = _legend(*OUTCOMES, "lost", "published") if hours else ""
    return (
        f'<section id="type-{escape(name)}"{_data(type=name)}><h2>{escape(name)}</h2>'
        + f'<p class="facts">{escape(facts)}</p>'
        + (f'<ul class="problems">{problems}</ul>' if problems else "")
        + '<div class="charts">'
        + _figure(report, "close-delay", close_delay_chart(report), close_legend)
        + _figure(report, "volumes", volumes_chart(report), volumes_legend)
        + _figure(report, "dead-letter-kinds", dead_letter_kinds(report))
        + "</div>"
        + (_table(HOUR_COLUMNS, hours, f"hours-{name}", f"{name} per hour") if hours else "")
        + "</section>"
    )


def render(reports: list[TypeReport], storage_root: str, generated_at: datetime.datetime) -> str:
    """The whole page: a summary row per type, then each type's charts and hours."""
    swatches = "".join(f".swatch.{name} {{ background: {color}; }}\n" for name, color in COLORS.items())
    window = reports[0].window_seconds if reports else partitions.HOUR_SECONDS
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Event delivery report</title><style>{STYLE}{swatches}</style></head><body><main>"
        "<h1>Event delivery report</h1>"
        f'<p class="meta">{escape(storage_root)} · hours of {escape(duration(window))} · generated '
        f"{escape(generated_at.strftime('%Y-%m-%d %H:%M:%S UTC'))}</p>"
        '<p class="key">Green: the tier\'s service level holds. Red: it does not (an hour closed late or is '
        "still open past its deadline, lost ≠ 0, or too many dead letters). Grey: not known yet (no hours, or "
        "no auditor counts of a closed hour).</p>"
        + _table(SUMMARY_COLUMNS, map(summary_row, reports), "summary", "Summary per type")
        + "".join(type_section(report) for report in reports)
        + "</main></body></html>\n"
    )
