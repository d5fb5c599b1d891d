"""Hour reports: what each step tells ``CloseHour`` about an hour it touched.

A report is a plain tuple ``(kind, records, path)``, so it travels with Beam's
fastest coder. ``path`` is the written file, or empty for duplicate counts.
"""

from __future__ import annotations

DELIVERED = "delivered"  # a pane staged for the hour's folder
DUPLICATES = "duplicates"
LATE = "late"  # a pane written to the late root
DEAD_LETTERED = "dead_lettered"
FORGOTTEN = "forgotten"  # delivered events of forgotten subjects, their personal fields null
ARCHIVED = "archived"  # a pane of raw messages written to the raw archive
LEFT_OVER = "left_over"  # an hour that earlier runs left staged files for, found at start
OPENED = "opened"  # an hour the job's clock reached: it closes even if nothing arrives
KINDS = (DELIVERED, DUPLICATES, LATE, DEAD_LETTERED, FORGOTTEN, ARCHIVED, LEFT_OVER, OPENED)


def report(kind: str, records: int, path: str = "") -> tuple:
    assert kind in KINDS, kind
    return (kind, records, path)
