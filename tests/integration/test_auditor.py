"""The auditor counts what was published, independently of delivery, and ``make audit`` names
any hour whose messages are not all accounted for.

The counting and its windows run on TestStreams; the producers' count reports run against a
fake Pub/Sub client. Then, on the real emulators, one streaming pipeline holds the auditor
of two types (one per source) and their delivery jobs, one of which drops an event in a
test-only step: the audit must name that type and hour as lost = 1, and nothing else.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import threading
import time
import uuid

import apache_beam as beam
import fastavro
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from google.api_core import exceptions

from event_delivery.cloud import clients, files
from event_delivery.contract import counts, envelope, partitions, slo
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import AUDIT_PRODUCER_COUNTS, AUDIT_SUBSCRIPTION
from event_delivery.producer import EventPublisher, PublishedCounts
from pipelines.audit_checks import CheckLostFn, accounted_for
from pipelines.audit_sources import HourCounts, LatestReportsFn
from pipelines.auditor import AuditPublished, AuditType
from pipelines.auditor_settings import AuditorOptions, AuditSettings, auditor_settings
from pipelines.delivery import deliver
from pipelines.flags import HourOptions
from pipelines.options import DeliveryOptions
from tests.emulated import PROJECT, drop_subscriptions_of
from tests.messages import message, valid_fields
from tests.streams import Clock, local_keys, local_settings, streaming_pipeline
from tools.ops import audit, provision
from transforms.read import ReadMessages

HOUR = 3600  # the TestStreams' first bucket: 1970-01-01T01:00:00Z


def settings_for(root, event_type, source, window=60, lateness=30, **more) -> AuditSettings:
    values = dict(check_delay_seconds=3600, trigger_seconds=5, late_horizon_seconds=86400)
    return AuditSettings(
        event_type,
        Layout.under(str(root), event_type.name, window),
        source,
        allowed_lateness_seconds=lateness,
        **{**values, **more},
    )


def read_counts(settings: AuditSettings, hour_start: int) -> dict:
    return files.read_json(settings.layout.audit_counts(hour_start))


# Counting messages (the subscription source).


def test_every_message_counts_in_the_hour_delivery_gives_it_once_at_the_close_and_again_after_late_ones(
    registry, tmp_path
):
    settings = settings_for(tmp_path, registry["service_log"], AUDIT_SUBSCRIPTION)
    ms = HOUR * 1000
    clock = Clock(HOUR)
    clock.arrive(
        message({}, "a", ms + 1),
        message({}, "a", ms + 2),  # a retry: one more message, no more ids
        message({}, None, ms + 3),  # no id: a message, but no id
        message({}, "no-stamp"),  # no received_at: its arrival decides
        message({}, "bad-stamp", received_at="yesterday"),  # so does an unparseable one
        message({}, "next", ms + 60_000),  # the next hour
    )
    clock.advance(50).arrive(message({}, "future", ms + 7_200_000))  # beyond --max_future_seconds: arrival
    clock.advance(41)  # the hour closes at its end + lateness, 90 s after its start
    clock.arrive(message({}, "late", ms + 10))
    clock.advance(10)

    with streaming_pipeline() as pipeline:
        written = pipeline | clock.finish() | AuditPublished(settings)
        assert_that(
            written,
            equal_to([(HOUR, HourCounts(6, 4)), (HOUR, HourCounts(7, 5)), (HOUR + 60, HourCounts(1, 1))]),
        )

    document = read_counts(settings, HOUR)
    assert document == {
        "event_type": "service_log",
        "hour_start": "1970-01-01T01:00:00Z",
        "hour_end": "1970-01-01T01:01:00Z",
        "published": 7,
        "distinct_ids": 5,
        "source": "subscription",
        "written_at": document["written_at"],
    }
    assert read_counts(settings, HOUR + 60)["published"] == 1


def test_an_older_pane_never_overwrites_newer_counts(registry, tmp_path):
    settings = settings_for(tmp_path, registry["service_log"], AUDIT_SUBSCRIPTION)
    newer = counts.counts_document("service_log", HOUR, 60, 9, 9, AUDIT_SUBSCRIPTION, HOUR + 100)
    files.write_json(settings.layout.audit_counts(HOUR), newer)
    clock = Clock(HOUR).arrive(message({}, "a", HOUR * 1000)).advance(100)
    with streaming_pipeline() as pipeline:
        assert_that(pipeline | clock.finish() | AuditPublished(settings), equal_to([]))
    assert read_counts(settings, HOUR) == newer


# Adding up count reports (the producer_counts source).


def report(producer, sequence, hour, published, distinct, event_type="play", window=60):
    return counts.CountReport(event_type, producer, sequence, window, hour, published, distinct)


def as_message(count_report):
    data, attributes = count_report.encode()
    return beam.io.PubsubMessage(data, attributes)


def test_each_producers_latest_report_counts_whatever_pubsub_redelivers_or_reorders(registry, tmp_path):
    settings = settings_for(tmp_path, registry["play"], AUDIT_PRODUCER_COUNTS)
    clock = Clock(HOUR)
    clock.arrive(
        *map(
            as_message,
            [
                report("p1", 1, HOUR, 5, 4),
                report("p1", 3, HOUR, 9, 7),
                report("p1", 2, HOUR, 7, 6),  # older than the one before: ignored
                report("p1", 3, HOUR, 9, 7),  # delivered twice
                report("p2", 1, HOUR, 2, 2),
                report("p2", 1, HOUR + 60, 4, 4),
                report("p3", 1, HOUR, 100, 100, event_type="search"),  # the emulator does not filter
                report("p4", 1, HOUR, 100, 100, window=3600),  # bucketed otherwise: cannot be added
            ],
        ),
        beam.io.PubsubMessage(b"not a report", {}),
    )
    clock.advance(95).arrive(as_message(report("p2", 2, HOUR, 3, 3))).advance(10)

    with streaming_pipeline() as pipeline:
        written = pipeline | clock.finish() | AuditPublished(settings)
        assert_that(
            written,
            equal_to([(HOUR, HourCounts(11, 9)), (HOUR, HourCounts(12, 10)), (HOUR + 60, HourCounts(4, 4))]),
        )
    assert read_counts(settings, HOUR)["source"] == "producer_counts"
    assert read_counts(settings, HOUR)["published"] == 12


def test_latest_reports_merge_in_any_order():
    fn = LatestReportsFn()
    reports = [report("p1", 1, HOUR, 1, 1), report("p1", 2, HOUR, 3, 2), report("p2", 5, HOUR, 4, 4)]
    one = fn.add_input(fn.add_input(fn.create_accumulator(), reports[1]), reports[2])
    other = fn.add_input(fn.create_accumulator(), reports[0])
    for accumulators in ([one, other], [other, one]):
        assert fn.extract_output(fn.merge_accumulators(accumulators)) == HourCounts(7, 6)


def test_a_count_report_reads_back_and_nothing_else_does():
    sent = report("p1", 4, HOUR, 10, 8)
    data, attributes = sent.encode()
    assert counts.CountReport.decode(data) == sent
    assert attributes == {envelope.EVENT_TYPE: "play"}
    for bad in (b"", b"[]", b'{"event_type": "play"}', data.replace(b'"published": 10', b'"published": -1')):
        with pytest.raises(ValueError):
            counts.CountReport.decode(bad)


# The producers' count reports.


class FakeFuture(concurrent.futures.Future):
    def __init__(self, error=None):
        super().__init__()
        if error:
            self.set_exception(error)
        else:
            self.set_result("message-id")


@dataclasses.dataclass
class FakePubsub:
    """A publisher client that records what is published, and can refuse a topic."""

    refused_topic: str | None = None
    published: list = dataclasses.field(default_factory=list)

    def topic_path(self, project, topic):
        return f"projects/{project}/topics/{topic}"

    def publish(self, topic, data, **attributes):
        if topic == self.refused_topic:
            return FakeFuture(exceptions.NotFound("no such topic"))
        self.published.append((topic, data, attributes))
        return FakeFuture()

    def reports(self) -> list[counts.CountReport]:
        return [counts.CountReport.decode(d) for t, d, _ in self.published if t.endswith(counts.COUNTS_TOPIC)]


def test_a_producer_reports_what_it_published_per_hour_and_a_retry_is_no_new_id(registry):
    play, client = registry["play"], FakePubsub()
    publisher = EventPublisher(PROJECT, play, client, window_seconds=60, report_seconds=0)
    hour = int(time.time()) // 60 * 60 - 3600  # an hour ago: stamped, not now
    for i in range(3):
        publisher.publish(valid_fields(play, i), f"e{i}", hour * 1000 + i)
    publisher.publish(valid_fields(play, 0), "e0", hour * 1000)  # a retry
    publisher.publish_raw(b"{not json", {envelope.RECEIVED_AT: str(hour * 1000)})  # no id: counted, no id
    publisher.publish_raw(b"{}", {envelope.EVENT_ID: "x", envelope.RECEIVED_AT: "yesterday"})  # arrival decides
    assert publisher.flush() == 6
    by_hour = {r.hour_start: r for r in client.reports()}
    stamped = by_hour.pop(hour)
    assert (stamped.published, stamped.distinct_ids) == (5, 3)
    [(arrival_hour, now)] = by_hour.items()
    assert (now.published, now.distinct_ids) == (1, 1) and arrival_hour > hour
    assert {r.window_seconds for r in client.reports()} == {60}
    assert all(a == {envelope.EVENT_TYPE: "play"} for t, _, a in client.published if t.endswith("audit-counts"))

    first = len(client.reports())
    publisher.publish(valid_fields(play, 9), "e9", hour * 1000 + 9)
    publisher.flush()
    [again] = client.reports()[first:]  # only the hour that changed, with its totals so far
    assert (again.hour_start, again.published, again.distinct_ids) == (hour, 6, 4)
    assert again.sequence > stamped.sequence


def test_a_refused_report_never_fails_the_events_and_is_sent_again(registry):
    play = registry["play"]
    client = FakePubsub(refused_topic=f"projects/{PROJECT}/topics/{counts.COUNTS_TOPIC}")
    publisher = EventPublisher(PROJECT, play, client, window_seconds=60, report_seconds=0)
    publisher.publish(valid_fields(play), "e1")
    assert publisher.flush() == 1
    assert publisher.report_failures == 1
    client.refused_topic = None
    publisher.flush()  # nothing new was published, but the refused hour goes again
    [sent] = client.reports()
    assert sent.published == 1


def test_an_event_pubsub_refuses_is_not_counted(registry):
    play = registry["play"]
    client = FakePubsub(refused_topic=f"projects/{PROJECT}/topics/{play.topic}")
    publisher = EventPublisher(PROJECT, play, client, window_seconds=60, report_seconds=0)
    publisher.publish(valid_fields(play), "e1")
    with pytest.raises(exceptions.NotFound):
        publisher.flush()
    assert [r.published for r in client.reports()] == [0]


def test_a_producer_keeps_no_sketch_for_an_hour_past_its_lateness(registry):
    tally = PublishedCounts(registry["play"], 60)
    hour = 1_795_946_400
    for i in range(3):
        tally.add(hour, f"e{i}")
    tally.reports(now=hour + 60 + registry["play"].tier.allowed_lateness_seconds + 1)
    assert tally.hours[hour].ids is None
    tally.add(hour, "e3")  # a straggler still counts, on top of what was counted
    [late] = tally.reports(now=hour + 7200)
    assert (late.published, late.distinct_ids) == (4, 4)


# The auditor's own check of what was lost.


@dataclasses.dataclass
class FakeState:
    value: int | None = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value


AVRO = {
    "type": "record",
    "name": "R",
    "fields": [{"name": "event_id", "type": "string"}],
}


def test_the_auditor_counts_each_lost_message_once_against_the_marker_and_the_late_and_dead_letter_roots(
    registry, tmp_path
):
    settings = settings_for(tmp_path, registry["service_log"], AUDIT_SUBSCRIPTION)
    layout, hour = settings.layout, 1_795_946_400
    check = CheckLostFn(settings)
    assert list(check.check_hour(hour, FakeState(5), FakeState())) == [], "no marker yet: overdue, not lost"
    manifest = {"accounting": {"delivered": 5, "duplicates": 2, "dead_lettered": 0}}
    files.write_json(layout.marker(hour), manifest)
    schema = fastavro.parse_schema(AVRO)
    files.write_avro(partitions.join(layout.hour(layout.late, hour), "a.avro"), schema, [{"event_id": "l"}])
    dead = [{"event_id": "d1"}, {"event_id": "d2"}]
    files.write_avro(partitions.join(layout.hour(layout.dead_letter, hour), "b.avro"), schema, dead)
    assert accounted_for(layout, hour) == 10
    late_repeats = partitions.late_duplicates_name("service_log", "run1", 0)  # repeats dropped after the close
    files.write_json(partitions.join(layout.hour(layout.late, hour), late_repeats), {"duplicates": 2})
    assert accounted_for(layout, hour) == 12
    reported = FakeState()
    assert list(check.check_hour(hour, FakeState(12), reported)) == []
    assert list(check.check_hour(hour, FakeState(14), reported)) == [(hour, 2)]
    assert list(check.check_hour(hour, FakeState(14), reported)) == [], "counted once"
    assert list(check.check_hour(hour, FakeState(15), reported)) == [(hour, 1)], "a late count, only what is new"


# The options.


def test_the_auditor_shares_the_delivery_flags_it_takes_and_resolves_tier_defaults(registry):
    argv = [
        "--event_types=service_log,play",
        "--storage_root=gs://b",
        "--window_seconds=10",
        "--late_horizon_seconds=600",
        "--trigger_seconds=2",
    ]
    options = PipelineOptions(argv)  # both options classes are loaded: one parser takes both
    assert options.view_as(DeliveryOptions).target_file_mb == 128, "the delivery family's own flags parse beside"
    assert options.view_as(HourOptions).window_seconds == 10
    assert options.get_all_options()["late_horizon_seconds"] == 600
    by_type = {s.event_type.name: s for s in auditor_settings(options)}
    assert by_type["service_log"].source == AUDIT_SUBSCRIPTION
    assert by_type["play"].source == AUDIT_PRODUCER_COUNTS
    play = registry["play"].tier
    assert (by_type["play"].allowed_lateness_seconds, by_type["play"].check_delay_seconds) == (
        play.allowed_lateness_seconds,
        play.close_margin_seconds,
    )
    assert by_type["play"].subscription("p") == "projects/p/subscriptions/events-audit-counts-play"
    assert by_type["service_log"].subscription("p") == "projects/p/subscriptions/events-service_log-audit"
    every = auditor_settings(PipelineOptions(["--event_types=all", "--storage_root=/x"]).view_as(AuditorOptions))
    assert sorted(s.event_type.name for s in every) == sorted(registry)


# Provisioning.


@pytest.mark.emulators
def test_provisioning_subscribes_each_auditor_to_the_source_of_its_tier(emulators, registry):
    publisher, subscriber = clients.publisher_client(), clients.subscriber_client()
    provision.provision(PROJECT, list(registry.values()), None)
    provision.provision(PROJECT, list(registry.values()), None)  # again: nothing changes
    publisher.get_topic(topic=f"projects/{PROJECT}/topics/events-audit-counts")
    for name, event_type in registry.items():
        if event_type.tier.audit_source == AUDIT_SUBSCRIPTION:
            found = subscriber.get_subscription(subscription=f"projects/{PROJECT}/subscriptions/events-{name}-audit")
            assert (found.topic, found.filter) == (f"projects/{PROJECT}/topics/events-{name}", "")
        else:
            found = subscriber.get_subscription(
                subscription=f"projects/{PROJECT}/subscriptions/events-audit-counts-{name}"
            )
            expected = (f"projects/{PROJECT}/topics/events-audit-counts", f'attributes.event_type = "{name}"')
            assert (found.topic, found.filter) == expected
        assert found.ack_deadline_seconds == provision.ACK_DEADLINE_SECONDS


# On the emulators: the auditor beside a delivery job that loses an event.

WINDOW, LATENESS, TRIGGER = 10, 8, 2
# After its end, an hour's lateness and then slack for two loaded cores, whose Pub/Sub reads may
# each block for up to 30 s: a wait that ends when the hour closes, and a bound on its close.
CLOSE_WITHIN_SECONDS = LATENESS + 240
SUBSCRIBED, REPORTED = "service_log", "play"  # audited from a subscription, and from producer counts
DROPPED = "dropped-by-the-test"


def _not_dropped(msg) -> bool:
    return (msg.attributes or {}).get(envelope.EVENT_ID) != DROPPED


class DeliverDroppingOne(beam.PTransform):
    """The delivery job with one test-only step before parsing: it drops the event ``DROPPED``."""

    def __init__(self, subscription, settings):
        super().__init__()
        self.subscription, self.settings = subscription, settings

    def expand(self, pipeline):
        messages = pipeline | "ReadMessages" >> ReadMessages(self.subscription)
        return deliver(messages | "DropOne" >> beam.Filter(_not_dropped), self.settings)


@dataclasses.dataclass
class Run:
    root: str
    hour: int
    result: object
    published: dict
    distinct: dict

    @property
    def partition(self) -> str:
        return partitions.partition(self.hour, WINDOW)

    def audit(self, name: str) -> audit.TypeAudit:
        return audit.audit_type(Layout.under(self.root, name, WINDOW), allowed_lateness_seconds=LATENESS)

    def counter(self, name: str, event_type: str) -> int:
        query = MetricsFilter().with_namespace(slo.AUDIT_NAMESPACE).with_name(name).with_step(f"Audit {event_type}")
        return sum(result.committed or 0 for result in self.result.metrics().query(query)["counters"])


def fresh_audit_subscriptions(event_types) -> None:
    """The auditors' subscriptions, emptied of what other tests published."""
    subscriber = clients.subscriber_client()
    for event_type in event_types:
        name = provision.audit_subscription(PROJECT, event_type)[0]
        with contextlib.suppress(exceptions.NotFound):
            subscriber.delete_subscription(subscription=name)
    provision.provision(PROJECT, event_types, None)


def fresh_delivery_subscription(event_type) -> str:
    subscriber = clients.subscriber_client()
    path = subscriber.subscription_path(PROJECT, f"auditor-test-{event_type.name}-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(name=path, topic=clients.publisher_client().topic_path(PROJECT, event_type.topic))
    return path


def publish_by_arrival(publisher: EventPublisher) -> int:
    """The messages whose arrival decides their hour (no stamp, or one that does not parse):
    they must be published while the hour is the current one. Returns how many."""
    fields = json.dumps(valid_fields(publisher.event_type)).encode()
    name = publisher.event_type.name
    publisher.publish_raw(fields, {envelope.EVENT_ID: f"{name}-unstamped"})
    publisher.publish_raw(fields, {envelope.EVENT_ID: f"{name}-bad-stamp", envelope.RECEIVED_AT: "yesterday"})
    return publisher.flush()


def publish_stamped(publisher: EventPublisher, hour: int, drop: bool) -> tuple[int, int]:
    """Every other kind of message, stamped into ``hour``: they may arrive any time before it
    closes. Returns (messages, distinct ids) as the auditor must count them, with those of
    ``publish_by_arrival``."""
    event_type, stamp = publisher.event_type, hour * 1000
    name = event_type.name
    ids = [publisher.publish(valid_fields(event_type, i), f"{name}-{i}", stamp + i) for i in range(6)]
    for event_id in ids[:2]:  # producer retries: duplicates
        publisher.publish(valid_fields(event_type, int(event_id.rsplit("-", 1)[1])), event_id, stamp + 0)
    fields = json.dumps(valid_fields(event_type)).encode()
    publisher.publish_raw(b"{not json", {envelope.EVENT_ID: f"{name}-bad", envelope.RECEIVED_AT: str(stamp)})
    publisher.publish_raw(fields, {envelope.RECEIVED_AT: str(stamp)})  # no id: dead-lettered, no id to count
    distinct = len(ids) + 1 + 2  # and the two published by arrival
    if drop:
        publisher.publish(valid_fields(event_type), DROPPED, stamp + 50)
        distinct += 1
    return publisher.flush(), distinct


def keep_pulls_short(publishers, hour: int, stop: threading.Event) -> None:
    """An event a second into an hour far ahead, which stays open: the local runner's Pub/Sub read
    blocks up to 30 s on an empty pull before its watermark moves on, so live traffic keeps
    the closes on time."""
    ahead = (hour + 20 * WINDOW) * 1000
    while not stop.wait(1):
        for publisher in publishers:
            publisher.publish(valid_fields(publisher.event_type), f"tick-{uuid.uuid4().hex[:8]}", ahead)
            publisher.flush()


def wait_for(condition, timeout_seconds: float, what: str) -> None:
    deadline = time.time() + timeout_seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def run(emulators, registry, tmp_path_factory):
    state = tmp_path_factory.mktemp("auditor")
    bucket = f"auditor-{uuid.uuid4().hex[:8]}"
    clients.storage_client(PROJECT).create_bucket(bucket)
    root = f"gs://{bucket}"
    keys = local_keys(state)
    keys.provision()
    types = [registry[SUBSCRIBED], registry[REPORTED]]
    fresh_audit_subscriptions(types)
    flags = [
        f"--event_types={SUBSCRIBED},{REPORTED}",
        f"--storage_root={root}",
        f"--window_seconds={WINDOW}",
        f"--allowed_lateness_seconds={LATENESS}",
        f"--trigger_seconds={TRIGGER}",
        "--late_horizon_seconds=86400",
    ]
    pipeline = streaming_pipeline()
    for settings in auditor_settings(PipelineOptions(flags).view_as(AuditorOptions)):
        pipeline | f"Audit {settings.event_type.name}" >> AuditType(settings, PROJECT)
    for event_type in types:
        delivery = local_settings(
            root, event_type, keys, window_seconds=WINDOW, allowed_lateness_seconds=LATENESS, trigger_seconds=TRIGGER
        )
        pipeline | f"Deliver {event_type.name}" >> DeliverDroppingOne(fresh_delivery_subscription(event_type), delivery)
    publishers = {t.name: EventPublisher(PROJECT, t, window_seconds=WINDOW, report_seconds=0) for t in types}
    result = pipeline.run()
    stop = threading.Event()
    try:
        now = time.time()
        hour = int(now - now % WINDOW) + WINDOW
        time.sleep(hour + 0.3 - time.time())
        by_arrival = {name: publish_by_arrival(publisher) for name, publisher in publishers.items()}
        assert time.time() < hour + WINDOW, "the messages that arrival puts in the hour were sent after it"
        published, distinct = {}, {}
        for name, publisher in publishers.items():
            stamped, distinct[name] = publish_stamped(publisher, hour, drop=name == SUBSCRIBED)
            published[name] = by_arrival[name] + stamped
        assert time.time() < hour + WINDOW + LATENESS, "the hour's messages were still being sent at its close"
        ticker = threading.Thread(target=keep_pulls_short, args=(list(publishers.values()), hour, stop), daemon=True)
        ticker.start()
        run = Run(root, hour, result, published, distinct)

        def counted_and_closed():
            folders = [Layout.under(root, name, WINDOW) for name in publishers]
            return all(files.exists(f.audit_counts(hour)) and files.exists(f.marker(hour)) for f in folders)

        wait_for(counted_and_closed, WINDOW + CLOSE_WITHIN_SECONDS, "the hour's counts and markers")
        yield run
    finally:
        result.cancel()  # while the ticks keep the reads' pulls short
        stop.set()
        drop_subscriptions_of(PROJECT, types)  # what this test published is no other test's input


@pytest.mark.emulators
@pytest.mark.slow
def test_the_auditor_counts_every_published_message_from_either_source(run):
    for name, source in ((SUBSCRIBED, AUDIT_SUBSCRIPTION), (REPORTED, AUDIT_PRODUCER_COUNTS)):
        document = files.read_json(Layout.under(run.root, name, WINDOW).audit_counts(run.hour))
        assert (document["published"], document["distinct_ids"]) == (run.published[name], run.distinct[name]), name
        assert document["source"] == source
        assert document["hour_start"] == counts.iso(run.hour)
        written_at = datetime.datetime.fromisoformat(document["written_at"].replace("Z", "+00:00")).timestamp()
        assert written_at >= run.hour + WINDOW + LATENESS, "counted at the close, not before"


@pytest.mark.emulators
@pytest.mark.slow
def test_the_audit_names_the_type_and_hour_that_lost_an_event(run, capsys):
    lossy = run.audit(SUBSCRIBED)
    hour = lossy.hours[run.partition]
    assert hour.published == run.published[SUBSCRIBED]
    assert (hour.lost, hour.failures) == (1, ["lost 1"])
    assert lossy.failed_hours == {run.partition: ["lost 1"]}

    argv = ["--storage_root", run.root, "--window_seconds", str(WINDOW), "--allowed_lateness_seconds", str(LATENESS)]
    assert audit.main([*argv, "--event_type", SUBSCRIBED]) == 1
    printed = capsys.readouterr().out
    assert f"{SUBSCRIBED} {run.partition}: lost 1" in printed
    assert audit.main([*argv, "--event_type", SUBSCRIBED, "--json"]) == 1
    document = json.loads(capsys.readouterr().out)[SUBSCRIBED]
    assert document["hours"][run.partition]["lost"] == 1


@pytest.mark.emulators
@pytest.mark.slow
def test_a_clean_run_loses_nothing_and_closes_on_time(run, capsys):
    clean = run.audit(REPORTED)
    hour = clean.hours[run.partition]
    assert hour.published == run.published[REPORTED] and hour.lost == 0
    assert 0 <= hour.close_delay_seconds < CLOSE_WITHIN_SECONDS and not hour.overdue
    assert not clean.failed_hours and not clean.problems
    assert all(h.lost in (0, None) for h in clean.hours.values())
    written = files.glob(partitions.join(run.root, "audit", REPORTED, "dt=*", "hr=*", partitions.AUDIT_COUNTS))
    counted = sum(files.read_json(path)["published"] for path in written)
    assert run.counter(slo.PUBLISHED, REPORTED) == counted, "the metric counts what the auditor wrote, no more"
    argv = ["--storage_root", run.root, "--window_seconds", str(WINDOW), "--allowed_lateness_seconds", str(LATENESS)]
    assert audit.main([*argv, "--event_type", REPORTED]) == 0
    printed = capsys.readouterr().out
    assert run.partition in printed and "LOST" not in printed and "OVERDUE" not in printed
