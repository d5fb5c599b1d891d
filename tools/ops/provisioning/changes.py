"""What a provisioning run did to each resource: created, updated, or found as planned."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import NamedTuple

from google.api_core import exceptions

CREATED, UPDATED, UNCHANGED = "created", "updated", "unchanged"


class Change(NamedTuple):
    outcome: str  # CREATED, UPDATED or UNCHANGED
    kind: str
    name: str

    def line(self) -> str:
        return f"{self.outcome}: {self.kind} {self.name}"


def created_or_unchanged(created: bool, kind: str, name: str) -> Change:
    return Change(CREATED if created else UNCHANGED, kind, name)


def create_unless_exists(create: Callable[[], object], kind: str, name: str) -> Change:
    """Calls ``create``; a resource that exists already (``AlreadyExists``) is left as it is."""
    try:
        create()
    except exceptions.AlreadyExists:
        return Change(UNCHANGED, kind, name)
    return Change(CREATED, kind, name)


def summary(changes: list[Change]) -> str:
    """``"3 created, 0 updated, 40 unchanged"``; ``"nothing to change"`` when all were as planned."""
    tally = collections.Counter(change.outcome for change in changes)
    if not tally[CREATED] and not tally[UPDATED]:
        return f"nothing to change: {tally[UNCHANGED]} resources as planned"
    return f"{tally[CREATED]} created, {tally[UPDATED]} updated, {tally[UNCHANGED]} unchanged"
