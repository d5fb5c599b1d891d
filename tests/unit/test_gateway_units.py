"""The gateway's parts without Pub/Sub: envelope checks, tier budgets, the spill, the intake and the flusher.

A fake publisher stands in for Pub/Sub: it acknowledges at once, or never (an outage).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from event_delivery.contract import envelope
from event_delivery.contract.registry import load_registry
from event_delivery.producer import stamp
from gateway import checks, flusher
from gateway.app import heartbeat_failures
from gateway.checks import Refused
from gateway.intake import Intake
from gateway.metrics import GatewayMetrics
from gateway.settings import MIB, GatewaySettings
from gateway.spill import Spill, event_size
from gateway.tiers import IN_FLIGHT_SHARES, SPILL_SHARES, Budget

REGISTRY = load_registry()
HIGH, NORMAL, LOW = (next(t for t in REGISTRY.values() if t.tier.name == tier) for tier in ("high", "normal", "low"))


class FakePublisher:
    """Acknowledges every publish at once, or none of them (Pub/Sub hangs)."""

    def __init__(self, acknowledges: bool = True):
        self.acknowledges = acknowledges
        self.sent = []
        self.hanging = []  # publishes Pub/Sub has not answered yet

    def publish(self, data: bytes, attributes: dict) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.acknowledges:
            self.sent.append((data, attributes))
            future.set_result("message-id")
        else:
            self.hanging.append(future)
        return future


def intake_for(tmp_path, acknowledges=True, **settings) -> Intake:
    settings = GatewaySettings(project="p", spill_dir=tmp_path, **{"publish_timeout_seconds": 0.05, **settings})
    publishers = {name: FakePublisher(acknowledges) for name in REGISTRY}
    return Intake(settings, publishers, Spill(settings.spill_path), GatewayMetrics())


def messages(event_type, count: int, size: int = 200) -> list:
    """``count`` stamped messages of the type, each counting ``size`` bytes against the spill."""
    padding = size - event_size(*stamp(event_type, {"x": ""}))
    return [stamp(event_type, {"x": "a" * padding}) for _ in range(count)]


def spilled_ids(spill: Spill) -> list[str]:
    return [event.attributes[envelope.EVENT_ID] for event in spill.oldest(10_000)]


@pytest.mark.parametrize(
    "content_type, body, status, reason",
    [
        ("application/json", b"{bad", 400, "body: not JSON"),
        ("application/json", b"[1, 2]", 400, "body: not a JSON object"),
        ("application/json", b"  ", 400, "body holds no event"),
        ("application/x-ndjson", b'{"a": 1}\n\n7\n', 400, "line 3: not a JSON object"),
        ("application/x-ndjson", b'{"a": 1}\n\xff\n', 400, "line 2: not UTF-8"),
        ("application/json", b'{"event_id": ""}', 400, "event_id must be a non-empty string"),
        ("application/json", b'{"a": "' + b"x" * 100 + b'"}', 413, "event is larger than 64 bytes"),
        ("text/plain", b"{}", 415, "content type 'text/plain' is not one of"),
        ("", b"{}", 415, "content type 'none'"),
    ],
)
def test_each_envelope_error_has_its_status_and_a_one_line_reason(content_type, body, status, reason):
    with pytest.raises(Refused) as refused:
        checks.events_from_body(content_type, body, max_event_bytes=64)
    assert refused.value.status == status
    assert reason in refused.value.reason and "\n" not in refused.value.reason


def test_ndjson_gives_one_event_per_line_and_a_client_event_id_leaves_the_fields():
    body = b'{"a": 1, "event_id": "mine"}\n{"b": 2}\n'
    events = checks.events_from_body("application/x-ndjson", body, max_event_bytes=1000)
    assert [checks.split_event_id(event) for event in events] == [({"a": 1}, "mine"), ({"b": 2}, None)]


def test_headers_and_bodies_past_their_limits_are_refused():
    with pytest.raises(Refused) as refused:
        checks.check_header_bytes([(b"X-Big", b"a" * 100)], limit=100)
    assert refused.value.status == 431
    checks.check_header_bytes([(b"X-Big", b"a" * 95)], limit=100)
    with pytest.raises(Refused) as refused:
        checks.check_content_length(101, limit=100)
    assert refused.value.status == 413


def test_as_a_pool_fills_low_is_refused_first_then_normal_and_high_uses_all_of_it():
    budget = Budget(100, IN_FLIGHT_SHARES)
    budget.take("high", 29)
    assert budget.try_take("low", 1) and not budget.try_take("low", 1)  # low: 30% of the pool
    assert budget.try_take("normal", 30) and not budget.try_take("normal", 1)  # normal: 60%
    assert budget.try_take("high", 40) and not budget.try_take("high", 1)
    assert budget.used_by == {"high": 69, "normal": 30, "low": 1}
    budget.give_back("normal", 30)
    assert budget.try_take("high", 30) and not budget.try_take("normal", 1)


def test_low_has_no_share_of_the_spill():
    budget = Budget(1000, SPILL_SHARES)
    assert not budget.try_take("low", 1)
    assert budget.try_take("normal", 250) and not budget.try_take("normal", 1)
    assert budget.try_take("high", 750) and not budget.try_take("high", 1)


def test_the_spill_survives_a_reopen_and_hands_back_high_first_then_oldest(tmp_path):
    spill = Spill(tmp_path / "spill.sqlite")
    low, high, normal = messages(LOW, 2), messages(HIGH, 2), messages(NORMAL, 1)
    spill.add("low", [(LOW.name, *m) for m in low])
    spill.add("high", [(HIGH.name, *m) for m in high])
    spill.add("normal", [(NORMAL.name, *m) for m in normal])
    spill.close()
    reopened = Spill(tmp_path / "spill.sqlite")
    order = [(m[1][envelope.EVENT_ID]) for m in high + normal + low]
    assert spilled_ids(reopened) == order
    [first] = reopened.oldest(1)
    assert (first.data, first.attributes) == high[0]
    reopened.remove([first.seq])
    assert spilled_ids(reopened) == order[1:]
    usage = {held.tier: (held.events, held.size) for held in reopened.usage()}
    assert usage["high"] == (1, event_size(*high[1]))
    assert usage["low"] == (2, sum(event_size(*m) for m in low))


def test_an_acknowledged_event_is_published_and_not_spilled(tmp_path):
    intake = intake_for(tmp_path)
    sent = messages(HIGH, 3)
    asyncio.run(intake.accept(HIGH, sent))
    assert intake.publishers[HIGH.name].sent == sent
    assert spilled_ids(intake.spill) == []


def test_during_an_outage_high_and_normal_are_spilled_and_low_is_shed_with_retry_after(tmp_path):
    intake = intake_for(tmp_path, acknowledges=False)
    high, normal, low = messages(HIGH, 2), messages(NORMAL, 2), messages(LOW, 2)
    asyncio.run(intake.accept(HIGH, high))
    asyncio.run(intake.accept(NORMAL, normal))
    with pytest.raises(Refused) as refused:
        asyncio.run(intake.accept(LOW, low))
    assert refused.value.status == 503 and "Retry-After" in refused.value.headers
    assert spilled_ids(intake.spill) == [m[1][envelope.EVENT_ID] for m in high + normal]


def test_under_pressure_low_then_normal_are_shed_while_high_is_spilled_at_once(tmp_path):
    size = 200
    intake = intake_for(
        tmp_path, acknowledges=False, max_in_flight=10, publish_timeout_seconds=30, spill_max_bytes=8 * size
    )
    intake.in_flight.take("high", 10)  # publishes Pub/Sub has not answered: no tier may publish now

    async def status(event_type, count: int) -> int:
        try:  # nothing waits for the 30 s publish timeout: a tier out of in-flight budget skips Pub/Sub
            await asyncio.wait_for(intake.accept(event_type, messages(event_type, count)), timeout=5)
        except Refused as refused:
            return refused.status
        return 200

    async def scenario():
        return [
            await status(LOW, 1),  # low has no share of the spill
            await status(NORMAL, 2),  # normal may fill a quarter of it
            await status(NORMAL, 1),
            await status(HIGH, 6),  # high may fill it all
            await status(HIGH, 1),
        ]

    assert asyncio.run(scenario()) == [503, 200, 503, 200, 507]
    assert len(spilled_ids(intake.spill)) == 8


def test_a_timed_out_publish_holds_its_budget_until_pub_sub_answers(tmp_path):
    intake = intake_for(tmp_path, acknowledges=False, max_in_flight=10)

    async def scenario():
        await intake.accept(HIGH, messages(HIGH, 8))  # timed out, spilled, still in flight
        assert intake.in_flight.used == 8
        with pytest.raises(Refused):
            await intake.accept(LOW, messages(LOW, 1))
        assert intake.publishers[LOW.name].hanging == []  # shed without waiting for a timeout
        for future in intake.publishers[HIGH.name].hanging:
            future.set_result("message-id")
        await asyncio.sleep(0)
        assert intake.in_flight.used == 0

    asyncio.run(scenario())


def test_a_full_spill_answers_507_and_keeps_what_it_holds(tmp_path):
    one = messages(HIGH, 1)
    intake = intake_for(tmp_path, acknowledges=False, spill_max_bytes=3 * event_size(*one[0]))
    asyncio.run(intake.accept(HIGH, messages(HIGH, 3)))
    with pytest.raises(Refused) as refused:
        asyncio.run(intake.accept(HIGH, one))
    assert refused.value.status == 507
    assert len(spilled_ids(intake.spill)) == 3


def test_a_restarted_intake_counts_what_the_spill_already_holds(tmp_path):
    first = intake_for(tmp_path, acknowledges=False, spill_max_bytes=MIB)
    asyncio.run(first.accept(HIGH, messages(HIGH, 4)))
    first.close()
    again = intake_for(tmp_path, spill_max_bytes=MIB)
    assert again.spill_budget.used == first.spill_budget.used > 0


def test_the_flusher_sends_high_first_and_forgets_only_what_was_acknowledged(tmp_path, monkeypatch):
    intake = intake_for(tmp_path, acknowledges=False)
    low, high = messages(NORMAL, 2), messages(HIGH, 2)
    asyncio.run(intake.accept(NORMAL, low))
    asyncio.run(intake.accept(HIGH, high))
    monkeypatch.setattr(flusher, "PUBLISH_TIMEOUT_SECONDS", 0.05)
    assert asyncio.run(flusher.flush_once(intake)) == (0, 4)  # Pub/Sub still down: all stay
    for publisher in intake.publishers.values():
        publisher.acknowledges = True
    monkeypatch.setattr(flusher, "BATCH", 2)
    assert asyncio.run(flusher.flush_once(intake)) == (2, 2)
    assert intake.publishers[HIGH.name].sent == high
    assert spilled_ids(intake.spill) == [m[1][envelope.EVENT_ID] for m in low]
    assert asyncio.run(flusher.drain(intake, seconds=5)) == 0
    assert intake.publishers[NORMAL.name].sent == low
    assert intake.spill_budget.used == 0


def test_the_heartbeat_fails_on_a_nearly_full_spill_or_a_low_disk(tmp_path):
    settings = GatewaySettings(project="p", spill_dir=tmp_path)
    plenty = 10 * settings.min_free_disk_bytes
    assert heartbeat_failures(settings, 0.5, plenty) == []
    assert heartbeat_failures(settings, settings.heartbeat_spill_fraction, plenty) == ["spill is 90% full"]
    assert heartbeat_failures(settings, 0.0, settings.min_free_disk_bytes - 1)


def test_the_gateway_message_is_the_producers():
    """Same stamp function, so the same data and attribute names whichever door an event took."""
    fields = {"b": 1, "a": "é"}
    data, attributes = stamp(HIGH, fields, "id-1", 1_700_000_000_000)
    assert json.loads(data) == fields and data == json.dumps(fields, separators=(",", ":")).encode()
    assert attributes == {
        envelope.EVENT_ID: "id-1",
        envelope.RECEIVED_AT: envelope.format_received_at(1_700_000_000_000),
        envelope.EVENT_TYPE: HIGH.name,
    }


def run_gateway(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *flags], capture_output=True, text=True, timeout=60)


def test_help_documents_the_command_line():
    result = run_gateway("--help")
    assert result.returncode == 0
    for flag in (
        "--project",
        "--port",
        "--spill_dir",
        "--spill_max_mb",
        "--publish_timeout_seconds",
        "--max_in_flight",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (["--port", "1"], "the following arguments are required: --project, --spill_dir"),
        (["--project", "p", "--spill_dir", "d", "--max_in_flight", "0"], "--max_in_flight: 0 is not above 0"),
        (["--project", "p", "--spill_dir", "d", "--window_seconds", "7"], "must divide 3600"),
        (["--project", "p", "--spill_dir", "d", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_code_2(flags, complaint):
    result = run_gateway(*flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert complaint in error


def test_the_image_holds_every_package_the_gateway_imports():
    """The Dockerfile copies packages by hand: a new import from another room must be copied too."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    imported = {"gateway", "avro_schemas"}  # the registry reads its schemas as package data
    for module in (root / "gateway").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
    local = {name for name in imported if (root / name).is_dir()}
    copied = {
        line.split()[1]
        for line in (root / "gateway" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    }
    assert "event_delivery" in local and local <= copied
