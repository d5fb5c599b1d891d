"""The demo (and the end-to-end and soak tests built on it) waits on the outcome, and says what never came."""

from __future__ import annotations

import types

import pytest

from tools.local import demo
from tools.local.loadgen import Ledger
from tools.ops.audit import TypeAudit


def test_the_demo_fails_at_its_deadline_naming_what_never_happened(monkeypatch):
    scenario = demo.Scenario(types=["play"], window_seconds=1, allowed_lateness_seconds=0, close_timeout_seconds=0)
    unsettled = TypeAudit("play")
    hour = unsettled.hour("dt=2026-11-29/hr=10-00-00")
    hour.delivered, hour.staged = 3, 2
    monkeypatch.setattr(demo, "_all_hours_closed", lambda _: False)
    monkeypatch.setattr(demo.Scenario, "audit", lambda self, name: unsettled)
    running = types.SimpleNamespace(event_type="play", process=types.SimpleNamespace(poll=lambda: None))

    with pytest.raises(demo.NotAccounted) as failure:
        demo._wait_until_accounted(scenario, [running], {"play": Ledger(published=5)}, say=lambda line: None)
    assert "play: 3 of 5 published messages accounted for; hours with data still open, 2 records staged" in str(
        failure.value
    )
