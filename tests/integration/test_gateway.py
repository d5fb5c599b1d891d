"""The gateway against the real Pub/Sub emulator, through its command line and HTTP routes alone.

Each event must reach its own type's topic, and only it, exactly as the producer would have
published it; bad requests get their status and a one-line reason while the gateway keeps
serving; a crash loses nothing its spill held; and during an outage ``high`` is spilled and
later delivered while ``low`` is shed with 503, and every id answered 200 reaches its topic.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from event_delivery.contract import envelope
from event_delivery.contract.registry import load_registry
from tools.local.gateway_process import Gateway, paused, pubsub_emulator, pull_all, pull_count_reports

pytestmark = [pytest.mark.emulators]
REGISTRY = load_registry()
HIGH, LOW = (next(t for t in REGISTRY.values() if t.tier.name == tier) for tier in ("high", "low"))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with pubsub_emulator(tmp_path_factory.mktemp("gateway-pubsub")) as emulator:
        yield emulator


@pytest.fixture
def gateway(emulator, tmp_path):
    gateway = Gateway(tmp_path / "spill", "--max_body_bytes", "20000", "--max_event_bytes", "2000")
    yield gateway
    gateway.stop()


def metric(gateway: Gateway, name: str, **labels) -> float:
    """The value of one sample of the gateway's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(gateway.metrics()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def expect_as_sent(received: dict[str, list], sent: dict[str, dict]) -> None:
    """Every sent id is in its own type's topic, and only there, with the data and envelope the
    producer would have given it; a copy twice (a timed-out publish, then its spilled copy) is equal."""
    where = {}
    for name, messages in received.items():
        for data, attributes in messages:
            if attributes.get(envelope.EVENT_ID) in sent:
                where.setdefault(attributes[envelope.EVENT_ID], set()).add(name)
                event_type, fields = sent[attributes[envelope.EVENT_ID]]
                assert data == json.dumps(fields, separators=(",", ":")).encode()
                assert set(attributes) == set(envelope.ENVELOPE_ATTRIBUTES)
                assert attributes[envelope.EVENT_TYPE] == event_type
                envelope.parse_received_at(attributes[envelope.RECEIVED_AT])
    assert {event_id: {event_type} for event_id, (event_type, _) in sent.items()} == where


def test_every_type_reaches_its_own_topic_and_only_it(gateway):
    sent = {}
    for number, name in enumerate(REGISTRY):
        one = {"n": number, "event_id": f"{name}-own-id"}
        status, _, body = gateway.post(name, [one])
        assert status == 200 and json.loads(body) == {"ids": [f"{name}-own-id"]}
        sent[f"{name}-own-id"] = (name, {"n": number})
        batch = [{"n": number, "line": line} for line in range(3)]
        status, _, body = gateway.post(name, batch)
        assert status == 200
        ids = json.loads(body)["ids"]
        assert len(set(ids)) == 3
        sent.update({event_id: (name, fields) for event_id, fields in zip(ids, batch, strict=True)})
    expect_as_sent(pull_all(set(sent)), sent)
    for name, event_type in REGISTRY.items():
        assert metric(gateway, "gateway_events_accepted_total", event_type=name, tier=event_type.tier.name) == 4
        assert metric(gateway, "gateway_events_published_total", event_type=name, tier=event_type.tier.name) == 4


def test_what_pub_sub_acknowledged_is_reported_to_the_audit_as_the_producer_reports_it(emulator, tmp_path):
    pull_count_reports()  # what earlier gateways reported
    gateway = Gateway(tmp_path / "spill")
    posted = {HIGH.name: 3, LOW.name: 2}
    for name, count in posted.items():
        assert gateway.post(name, [{"n": n, "event_id": f"{name}-{n}"} for n in range(count)])[0] == 200
    assert gateway.post(HIGH.name, [{"n": 0, "event_id": f"{HIGH.name}-0"}])[0] == 200  # a client's retry
    assert gateway.stop() == 0  # a shutdown sends the last reports
    latest = {}
    for report in pull_count_reports():
        key = (report.event_type, report.producer_id, report.hour_start)
        if key not in latest or latest[key].sequence < report.sequence:
            latest[key] = report
    published = {name: sum(r.published for (t, *_), r in latest.items() if t == name) for name in posted}
    distinct = {name: sum(r.distinct_ids for (t, *_), r in latest.items() if t == name) for name in posted}
    assert published == {HIGH.name: 4, LOW.name: 2}
    assert distinct == posted


BAD_REQUESTS = [
    ("nope", b"{}", {"Content-Type": "application/json"}, 404, "unknown event type"),
    (HIGH.name, b"{not json", {"Content-Type": "application/json"}, 400, "not JSON"),
    (HIGH.name, b"[1]", {"Content-Type": "application/json"}, 400, "not a JSON object"),
    (HIGH.name, b'{"a": 1}\n{"a"', {"Content-Type": "application/x-ndjson"}, 400, "line 2: not JSON"),
    (HIGH.name, b'{"a": "' + b"x" * 3000 + b'"}', {"Content-Type": "application/json"}, 413, "event is larger"),
    (HIGH.name, b'{"a": 1}\n' * 3000, {"Content-Type": "application/x-ndjson"}, 413, "body is larger"),
    (HIGH.name, b"{}", {"Content-Type": "text/plain"}, 415, "content type"),
    (HIGH.name, b"{}", {"Content-Type": "application/json", "X-Big": "a" * 20000}, 431, "headers are larger"),
]


def test_each_envelope_error_gets_its_status_and_a_one_line_reason_and_the_gateway_keeps_serving(gateway):
    for name, body, headers, status, reason in BAD_REQUESTS:
        answer = gateway.request("POST", f"/v1/events/{name}", body, headers)
        assert answer[0] == status, (name, reason, answer)
        text = answer[2].decode()
        assert reason in text and text.count("\n") == 1
        ok = gateway.post(HIGH.name, [{"after": status}])
        assert ok[0] == 200
    assert metric(gateway, "gateway_requests_rejected_total", event_type="unknown", tier="", reason="unknown_type") == 1
    tier = HIGH.tier.name
    assert metric(gateway, "gateway_requests_rejected_total", event_type=HIGH.name, tier=tier, reason="not_json") == 2
    assert gateway.request("GET", "/__heartbeat__")[0] == 200


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def spill_empty(gateway: Gateway) -> bool:
    return not any(
        sample.value for f in text_string_to_metric_families(gateway.metrics()) for sample in f.samples
        if sample.name == "gateway_spill_events"
    )  # fmt: skip


def test_a_crash_loses_nothing_the_spill_held(emulator, tmp_path):
    first = Gateway(tmp_path / "spill", "--publish_timeout_seconds", "0.3")
    sent, tier = {}, HIGH.tier.name
    try:
        with paused(emulator):  # Pub/Sub hangs: every event goes to the spill
            for number in range(5):
                batch = [{"crash": number, "line": line} for line in range(4)]
                status, _, body = first.post(HIGH.name, batch)
                assert status == 200
                sent.update({i: (HIGH.name, fields) for i, fields in zip(json.loads(body)["ids"], batch, strict=True)})
            assert metric(first, "gateway_events_spilled_total", event_type=HIGH.name, tier=tier) == 20
            first.kill()  # SIGKILL: no drain, no goodbye
    finally:
        first.kill()
    second = Gateway(tmp_path / "spill")
    try:
        assert "spill" in second.log() and "holds 20 events" in second.log()
        expect_as_sent(pull_all(set(sent)), sent)
        wait_for(lambda: metric(second, "gateway_events_flushed_total", event_type=HIGH.name, tier=tier) == 20)
        wait_for(lambda: spill_empty(second))
    finally:
        second.stop()


async def _send_under_outage(gateway: Gateway, emulator, before: float, outage: float, after: float) -> list:
    """Two senders per tier post one event at a time while the emulator is stopped for ``outage``
    seconds in the middle; ``[(type, fields, status, headers, body)]``."""
    answers, stop = [], asyncio.Event()
    url = f"http://127.0.0.1:{gateway.port}/v1/events/"

    async def sender(session, event_type, number):
        count = 0
        while not stop.is_set():
            fields = {"sender": number, "n": count}
            async with session.post(url + event_type.name, json=fields) as response:
                answers.append(
                    (event_type.name, fields, response.status, dict(response.headers), await response.read())
                )
            count += 1
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        senders = [asyncio.create_task(sender(session, t, n)) for t in (HIGH, LOW) for n in range(2)]
        await asyncio.sleep(before)
        with paused(emulator):
            await asyncio.sleep(outage)
        await asyncio.sleep(after)
        stop.set()
        await asyncio.gather(*senders)
    return answers


def test_during_an_outage_high_is_spilled_then_delivered_and_low_is_shed(emulator, tmp_path):
    gateway = Gateway(tmp_path / "spill", "--publish_timeout_seconds", "0.5", "--max_in_flight", "100")
    try:
        answers = asyncio.run(_send_under_outage(gateway, emulator, before=2, outage=6, after=3))
        by_tier = {name: [a for a in answers if a[0] == name] for name in (HIGH.name, LOW.name)}
        assert {status for *_, status, _, _ in by_tier[HIGH.name]} == {200}
        shed = [headers for _, _, status, headers, _ in by_tier[LOW.name] if status == 503]
        assert shed and all(headers.get("Retry-After") for headers in shed)
        assert {status for *_, status, _, _ in by_tier[LOW.name]} == {200, 503}
        high = HIGH.tier.name
        assert metric(gateway, "gateway_events_spilled_total", event_type=HIGH.name, tier=high) > 0
        assert metric(gateway, "gateway_events_shed_total", event_type=LOW.name, tier=LOW.tier.name) == len(shed)
        sent = {}
        for name, fields, status, _, body in answers:
            if status == 200:
                [event_id] = json.loads(body)["ids"]
                sent[event_id] = (name, fields)
        expect_as_sent(pull_all(set(sent)), sent)
        wait_for(lambda: spill_empty(gateway))
        spilled = metric(gateway, "gateway_events_spilled_total", event_type=HIGH.name, tier=high)
        assert metric(gateway, "gateway_events_flushed_total", event_type=HIGH.name, tier=high) == spilled
    finally:
        gateway.stop()


def test_a_project_without_the_topics_stops_the_gateway_with_one_line(emulator, tmp_path):
    with pytest.raises(RuntimeError, match="did not start") as failed:
        Gateway(tmp_path / "spill", "--project", "other-project")
    assert "python -m gateway: error:" in str(failed.value) and "events-" in str(failed.value)
