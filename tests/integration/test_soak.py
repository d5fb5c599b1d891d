"""The soak: every type under sustained load at once, and not one message lost.

Not part of ``make test``: run it with ``make soak`` (about 6 minutes; SOAK_SECONDS and
SOAK_RATE scale it). It prints the figures of the run.
"""

from __future__ import annotations

import os

import pytest

from tests.by_id import assert_every_id_in_one_place, ledger_ids
from tools.local.demo import Scenario, format_table, run_scenario
from tools.local.loadgen import TrafficMix

pytestmark = [pytest.mark.emulators, pytest.mark.slow, pytest.mark.soak]


def test_nothing_is_lost_under_sustained_load_on_every_type(emulators, registry, tmp_path):
    scenario = Scenario(
        types=sorted(registry),
        bucket="event-delivery-soak",
        publish_seconds=float(os.environ.get("SOAK_SECONDS", 180)),
        rate=float(os.environ.get("SOAK_RATE", 4)),
        mix=TrafficMix(duplicates=0.05, malformed=0.02, late=0.02, late_by_seconds=20),
    )
    outcomes = run_scenario(scenario, tmp_path, say=print)

    print("\n" + format_table(outcomes))
    totals = {
        kind: sum(o.audit.total(kind) for o in outcomes.values())
        for kind in ("delivered", "duplicates", "late", "dead_lettered")
    }
    published = sum(o.ledger.published for o in outcomes.values())
    lost = published - sum(totals.values())
    print(f"soak: {published} messages over {len(outcomes)} types: {totals}; lost {lost}")
    for name, outcome in outcomes.items():
        assert not outcome.audit.problems, name
        assert outcome.audit.settled, f"{name}: an hour with data did not close"
        assert outcome.balanced, f"{name}: published {outcome.ledger.published} is not accounted for"
        assert_every_id_in_one_place(scenario.storage_root, name, *ledger_ids(outcome.ledger))  # not only in total
    assert lost == 0
