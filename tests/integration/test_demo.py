"""The demo (and the end-to-end and soak tests built on it) waits on the outcome, and says what never came."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import types

import pytest

from gateway.metrics import GatewayMetrics
from tests.by_id import assert_every_id_in_one_place, ledger_ids
from tests.emulated import drop_subscriptions_of
from tools.local import demo, gateway_door
from tools.local.loadgen import (
    DEAD_LETTER,
    DELIVERED,
    DUPLICATE,
    LATE,
    PRODUCER_ATTRIBUTE,
    Ledger,
    TrafficMix,
    traffic,
)
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


def test_the_gateways_counts_are_read_from_its_metrics_per_type_tiers_and_reasons_summed():
    metrics = GatewayMetrics()
    metrics.accepted.labels("play", "high").inc(7)
    metrics.published.labels("play", "high").inc(5)
    metrics.spilled.labels("play", "high").inc(2)
    metrics.shed.labels("search", "normal").inc(3)
    metrics.rejected.labels("search", "normal", "not_json").inc()
    metrics.rejected.labels("search", "normal", "content_type").inc(2)

    counts = gateway_door.gateway_counts(metrics.exposition().decode())

    assert counts == {
        "play": gateway_door.GatewayCounts(accepted=7, published=5, spilled=2),
        "search": gateway_door.GatewayCounts(shed=3, rejected=3),
    }


def test_the_table_shows_the_gateways_counts_and_a_type_balances_only_if_the_gateway_accepted_all_it_was_sent():
    audit = TypeAudit("play")
    audit.hour("dt=2026-11-29/hr=10-00-00").delivered = 5
    accepted_all = gateway_door.GatewayCounts(sent=4, accepted=4, published=3, spilled=1)
    outcomes = {
        "play": demo.Outcome(Ledger(published=5), audit, accepted_all),
        "search": demo.Outcome(Ledger(published=5), audit, dataclasses.replace(accepted_all, accepted=3, shed=1)),
    }

    header, _, play, search = demo.format_table(outcomes).splitlines()

    columns = ["gw sent", "gw accepted", "gw published", "gw spilled", "gw shed", "gw rejected", "balanced"]
    assert re.split(r"\s{2,}", header.strip())[-7:] == columns
    assert play.split()[-7:] == ["4", "4", "3", "1", "0", "0", "yes"]
    assert search.split()[-7:] == ["4", "3", "3", "1", "1", "0", "NO"]


class FakeGateway:
    """Answers like the gateway: 200 with the ids, after ``refusals`` 503s."""

    def __init__(self, refusals: int = 0):
        self.posts, self.refusals = [], refusals

    def post(self, event_type, events):
        if self.refusals:
            self.refusals -= 1
            return 503, {"Retry-After": "0"}, b"shed\n"
        self.posts.append((event_type, events))
        return 200, {}, json.dumps({"ids": [event["event_id"] for event in events]}).encode()


class FakePublisher:
    def __init__(self, event_type):
        self.event_type, self.published = event_type, []

    def publish_raw(self, data, attributes):
        self.published.append((data, attributes))

    def flush(self):
        pass


def test_only_what_a_gateway_cannot_produce_bypasses_it_and_every_message_is_in_the_ledger_once(registry):
    mix = TrafficMix(duplicates=0.2, malformed=0.1, late=0.1, late_by_seconds=0, producer_attributes=0.1)
    messages = list(traffic(registry["play"], 300, mix, random.Random(3)))
    gateway, publisher = FakeGateway(refusals=2), FakePublisher(registry["play"])
    doors = gateway_door.TwoDoors(gateway, publisher, window_seconds=10)

    gateway_door.send_traffic(doors, messages, rate=1e6)

    posted = [event for _, events in gateway.posts for event in events]
    assert all(len(events) <= gateway_door.BATCH_EVENTS for _, events in gateway.posts)
    assert (
        doors.sent_to_gateway
        == len(posted)
        == sum(m.expected == DELIVERED for m in messages)
        - sum(PRODUCER_ATTRIBUTE in m.attributes for m in messages if m.expected == DELIVERED)
    )
    direct = [m for m in messages if not gateway_door.client_can_send(m)]
    assert len(publisher.published) == len(direct) and {DUPLICATE, DEAD_LETTER, LATE} <= {m.expected for m in direct}
    # The ledger: every message once, with its id, whichever door it took.
    assert doors.ledger.published == len(messages)
    assert sorted(i for ids in doors.ledger.ids.values() for i in ids) == sorted(
        m.attributes["event_id"] for m in messages if "event_id" in m.attributes
    )
    # A retry repeats its original's stamp as recorded, so that it lands in the same hour.
    posted_ids = {event["event_id"] for event in posted}
    retries = [attributes for _, attributes in publisher.published if attributes.get("event_id") in posted_ids]
    assert retries and all(attributes == doors.stamped[attributes["event_id"]] for attributes in retries)


@pytest.mark.emulators
@pytest.mark.slow
def test_the_demo_sends_well_formed_events_through_the_gateway_and_its_counts_balance(emulators, registry, tmp_path):
    scenario = demo.Scenario(types=["play", "playlist_edit"], bucket="event-delivery-demo-test", through_gateway=True)
    drop_subscriptions_of(scenario.project, registry.values())  # only this test's traffic
    outcomes = demo.run_scenario(scenario, tmp_path, say=print)

    table = demo.format_table(outcomes)
    print("\n" + table)
    assert "gw accepted" in table.splitlines()[0]
    for name, outcome in outcomes.items():
        gateway, ledger = outcome.gateway, outcome.ledger
        assert outcome.balanced, name
        assert gateway.sent == gateway.accepted == gateway.published + gateway.spilled > 0, name
        assert gateway.shed == gateway.rejected == 0, name
        assert gateway.sent < ledger.published, f"{name}: trouble goes straight to Pub/Sub"
        assert_every_id_in_one_place(scenario.storage_root, name, *ledger_ids(ledger))
