"""The auditor: an independent count of what was published to a type, per hour.

Delivery counts what it did; the auditor counts what went in, so that a delivery bug
cannot hide itself. It shares no code with the delivery job (nothing from
``transforms/``): only the contract (the registry, the envelope, the layout) and the
cloud helpers. Per hour of ``received_at`` (buckets of ``--window_seconds``) it counts the
messages and their distinct event ids, and when the hour closes (its end plus the
allowed lateness, as delivery closes it) it writes
``<storage_root>/audit/<type>/dt=…/hr=…/counts.json``. A message that arrives after that
(a late event) rewrites the file ``--trigger_seconds`` later, with the new totals.
Then, ``--check_delay_seconds`` later (default: the tier's close margin, by which
delivery must have closed the hour), it compares the count with what delivery wrote
for the hour and counts what is in no output as ``audit/lost``. ``make audit`` does the
same comparison from the files, with the hours' close delays.

Where the counts come from is chosen per tier (``Tier.audit_source``, or ``--audit_source``):

- ``subscription``: its own subscription of the type's topic, ``events-<type>-audit``.
  Every message counts, invalid ones too, in the hour delivery puts it in: its
  ``received_at``, or its publish time where that is missing, unparseable or out of
  bounds (``event_delivery.contract.counts.bucket_millis``). Only attributes are read,
  never the payload.
- ``producer_counts``: the count reports every ``EventPublisher`` sends about once a minute
  and on flush (cumulative per producer and hour) to the ``events-audit-counts`` topic,
  read through ``events-audit-counts-<type>``, a subscription filtered to the type
  (the emulator ignores filters, so the job checks the type too). Per hour the auditor
  adds up each producer's latest report: a report delivered twice or out of order
  changes nothing. Distinct ids are then each producer's own count, summed (an id that
  two producers both publish counts twice).

What each source costs per TB published (Pub/Sub list prices, check the current ones):

- ``subscription``: about $40 per TiB, because Pub/Sub bills the second subscription's
  delivery of every byte as it bills the first, plus the auditor's workers, which pull
  every byte and keep ~50 bytes of it per message. At the seed's 350 TB/day that is
  about $13,000 a day, hence only for low-volume tiers and local runs.
- ``producer_counts``: about nothing per TB. It costs one ~300-byte report per producer,
  type and hour per minute, whatever the volume: 2,500 producers publishing 10 types
  each send about 11 GB a day, about $1 a day, read by one tiny job per type.

Distinct ids: Beam's ``ApproximateUnique`` sketch (K minimum values of the ids' 64-bit
hashes, ``DISTINCT_ID_SAMPLE_SIZE`` of them), combined per hour. Its cost per message is
one hash and at most one heap push, and its memory per hour is bounded whatever the
volume, where exact counting needs a state cell per id for the whole hour (delivery's
``MarkRepeats``), as costly as delivery itself. It is exact up to 10,000 distinct ids an
hour and within about 2% above; ``lost`` is computed from messages, which are exact.
On Dataflow's streaming engine a combine is not always lifted before the shuffle, so the
hour's grouping may hold its messages' ids until the close: one more reason the
subscription source is for low-volume tiers.

Run it locally for every type in one process, a pipeline per type (a process per type
would add seven interpreters to the seven delivery jobs on a machine of two cores; on
Dataflow each type is its own job, so that types stay isolated there)::

    python -m pipelines.auditor --event_types all --project local-project \\
        --storage_root gs://event-delivery-local --window_seconds 10 --allowed_lateness_seconds 5

and on Dataflow, one job per type::

    python -m pipelines.auditor --event_type play --project my-project --storage_root gs://my-bucket \\
        --runner DataflowRunner --region europe-west1 --temp_location gs://my-bucket/tmp --setup_file ./setup.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import signal
import sys
import threading
import typing

import apache_beam as beam
from apache_beam.coders import StrUtf8Coder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.transforms import trigger, window
from apache_beam.transforms.stats import ApproximateUniqueCombineFn
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from event_delivery.cloud import files, preflight
from event_delivery.cloud.clients import lift_emulator_pull_limit, use_emulator_credentials
from event_delivery.contract import counts, envelope, partitions, slo
from event_delivery.contract.hours import into_hours
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import AUDIT_SUBSCRIPTION, TIERS, EventType, get_event_type, load_registry
from pipelines.flags import HourOptions, add_hour_arguments, add_trigger_argument, exit_on_help
from pipelines.runtime import LOCAL_RUNNER, pipeline_options, start_logging

PROG = "python -m pipelines.auditor"
READY_LINE = "auditing "
ALL_TYPES = "all"
_LOG = logging.getLogger(__name__)


class AuditorOptions(PipelineOptions):
    """The auditor's own flags; those it shares with the delivery family are ``HourOptions``,
    so that the two jobs of a type are configured alike."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_auditor_arguments(parser)


def add_auditor_arguments(parser) -> None:
    group = parser.add_argument_group("auditor")
    group.add_argument(
        "--event_types",
        help="Several types in one job, comma-separated, or 'all': a local run audits every type in one process.",
    )
    group.add_argument(
        "--audit_source",
        choices=counts.SOURCES,
        help="Where the counts come from. Default: the type's tier ("
        + ", ".join(f"{t.name} {t.audit_source}" for t in TIERS.values())
        + ").",
    )
    group.add_argument(
        "--check_delay_seconds",
        type=int,
        help="How long after writing an hour's counts they are checked against delivery's output "
        "(the audit/lost counter). Default: the tier's close margin.",
    )


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """Everything one type's branch of the auditor needs, resolved and checked once."""

    event_type: EventType
    layout: Layout
    source: str
    allowed_lateness_seconds: int
    check_delay_seconds: int
    trigger_seconds: int = 60
    late_horizon_seconds: int = counts.LATE_HORIZON_SECONDS
    max_future_seconds: int = counts.MAX_FUTURE_SECONDS

    def __post_init__(self):
        partitions.check_window_seconds(self.window_seconds)
        if self.layout.audit is None:
            raise ValueError("the auditor needs a layout with an audit root (Layout.under a storage root)")
        if self.source not in counts.SOURCES:
            raise ValueError(f"audit source must be one of {', '.join(counts.SOURCES)}")
        for name in ("allowed_lateness_seconds", "check_delay_seconds", "late_horizon_seconds", "max_future_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.trigger_seconds <= 0:
            raise ValueError("trigger_seconds must be positive")

    @property
    def window_seconds(self) -> int:
        return self.layout.window_seconds

    def subscription(self, project: str) -> str:
        return f"projects/{project}/subscriptions/{counts.auditor_subscription(self.event_type, self.source)}"


def auditor_settings(options: PipelineOptions) -> list[AuditSettings]:
    """One ``AuditSettings`` per type named by the options (any view); raises ``ValueError`` or ``KeyError``."""
    shared, own = options.view_as(HourOptions), options.view_as(AuditorOptions)
    names = [shared.event_type] if shared.event_type else []
    if own.event_types:
        listed = [name.strip() for name in own.event_types.split(",") if name.strip()]
        names += sorted(load_registry()) if listed == [ALL_TYPES] else listed
    if not names:
        raise ValueError("--event_type or --event_types is required")
    if not shared.storage_root:
        raise ValueError("--storage_root is required")
    settings = []
    for name in dict.fromkeys(names):
        event_type = get_event_type(name)
        tier, lateness, delay = event_type.tier, shared.allowed_lateness_seconds, own.check_delay_seconds
        settings.append(
            AuditSettings(
                event_type,
                Layout.under(shared.storage_root, name, shared.window_seconds),
                source=own.audit_source or tier.audit_source,
                allowed_lateness_seconds=tier.allowed_lateness_seconds if lateness is None else lateness,
                check_delay_seconds=tier.close_margin_seconds if delay is None else delay,
                trigger_seconds=shared.trigger_seconds,
                late_horizon_seconds=shared.late_horizon_seconds,
                max_future_seconds=shared.max_future_seconds,
            )
        )
    return settings


class HourCounts(typing.NamedTuple):
    published: int
    distinct_ids: int


# Hours that close as delivery closes them (the contract's hour windows).


def counted_at_close(settings: AuditSettings) -> beam.WindowInto:
    """Into the hours; one pane when the hour closes, and one with the new totals
    ``trigger_seconds`` after a late message."""
    late = trigger.AfterProcessingTime(settings.trigger_seconds)
    return into_hours(settings, trigger.AfterWatermark(late=late), accumulating=True)


# The subscription source: every message counted.


class HourOfMessageFn(beam.DoFn):
    """A message as ``(hour_start, event_id or "")``, stamped with the time that decides its hour."""

    def __init__(self, settings: AuditSettings):
        self.window_seconds = settings.window_seconds
        self.late_horizon_seconds = settings.late_horizon_seconds
        self.max_future_seconds = settings.max_future_seconds

    def process(self, message, timestamp=beam.DoFn.TimestampParam):
        attributes = message.attributes or {}
        published = message.publish_time
        # A Pub/Sub read stamps each element with its publish time, where a reader leaves it unset.
        arrival = timestamp.micros // 1000 if published is None else int(published.timestamp() * 1000)
        millis = counts.bucket_millis(attributes, arrival, self.late_horizon_seconds, self.max_future_seconds)
        hour = counts.hour_start_seconds(millis, self.window_seconds)
        yield window.TimestampedValue((hour, attributes.get(envelope.EVENT_ID) or ""), millis / 1000)


class PublishedCountsFn(beam.CombineFn):
    """Event ids in; ``HourCounts``: every message, and the distinct non-empty ids (a sketch)."""

    def __init__(self, sample_size: int = counts.DISTINCT_ID_SAMPLE_SIZE):
        self.ids = ApproximateUniqueCombineFn(sample_size, StrUtf8Coder())

    def create_accumulator(self):
        return [0, self.ids.create_accumulator()]

    def add_input(self, accumulator, event_id):
        accumulator[0] += 1
        if event_id:
            self.ids.add_input(accumulator[1], event_id)
        return accumulator

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = self.ids.merge_accumulators([ids for _, ids in accumulators])
        return [sum(messages for messages, _ in accumulators), merged]

    def extract_output(self, accumulator):
        return HourCounts(accumulator[0], self.ids.extract_output(accumulator[1]))


class CountMessages(beam.PTransform):
    """Pub/Sub messages in; ``(hour_start, HourCounts)`` out when each hour closes, and again after late ones."""

    def __init__(self, settings: AuditSettings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        return (
            messages
            | "HourOfMessage" >> beam.ParDo(HourOfMessageFn(self.settings))
            | "IntoHours" >> counted_at_close(self.settings)
            | "CountPerHour" >> beam.CombinePerKey(PublishedCountsFn())
        )


# The producer_counts source: the producers' reports added up.


class ParseReportFn(beam.DoFn):
    """A count report as ``(hour_start, report)``, stamped with its hour; others are counted and dropped."""

    def __init__(self, settings: AuditSettings):
        self.event_type = settings.event_type.name
        self.window_seconds = settings.window_seconds

    def setup(self):
        self.malformed = Metrics.counter(slo.AUDIT_NAMESPACE, "malformed_count_reports")
        self.other_windows = Metrics.counter(slo.AUDIT_NAMESPACE, "count_reports_of_other_window_seconds")

    def process(self, message):
        try:
            report = counts.CountReport.decode(message.data)
        except ValueError:
            report = None
            self.malformed.inc()
        if report is None or report.event_type != self.event_type:
            pass  # not a report, or another type's: the emulator does not apply the subscription's filter
        elif report.window_seconds != self.window_seconds:
            # A producer that buckets otherwise cannot be added up: its counts are missing,
            # so the hour shows fewer published than delivered, and the audit fails.
            self.other_windows.inc()
        else:
            yield window.TimestampedValue((report.hour_start, report), report.hour_start)


class LatestReportsFn(beam.CombineFn):
    """Count reports of one hour in; ``HourCounts``: each producer's latest report, added up."""

    def create_accumulator(self):
        return {}

    def add_input(self, latest, report):
        known = latest.get(report.producer_id)
        if known is None or report.sequence > known[0]:
            latest[report.producer_id] = (report.sequence, report.published, report.distinct_ids)
        return latest

    def merge_accumulators(self, accumulators):
        merged = {}
        for latest in accumulators:
            for producer, entry in latest.items():
                if producer not in merged or entry[0] > merged[producer][0]:
                    merged[producer] = entry
        return merged

    def extract_output(self, latest):
        return HourCounts(sum(e[1] for e in latest.values()), sum(e[2] for e in latest.values()))


class SumCountReports(beam.PTransform):
    """Count-report messages in; ``(hour_start, HourCounts)`` out when each hour closes, and again after late ones."""

    def __init__(self, settings: AuditSettings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        return (
            messages
            | "ParseReports" >> beam.ParDo(ParseReportFn(self.settings))
            | "IntoHours" >> counted_at_close(self.settings)
            | "AddUpProducers" >> beam.CombinePerKey(LatestReportsFn())
        )


# Writing and checking the counts.


class WriteCountsFn(beam.DoFn):
    """Writes an hour's ``counts.json``; passes on the counts it wrote.

    Panes carry running totals, so a pane with fewer messages than the file already holds
    is an older one, come late: it is not written.
    """

    def __init__(self, settings: AuditSettings):
        self.layout = settings.layout
        self.source = settings.source

    def setup(self):
        use_emulator_credentials()
        self.published = Metrics.counter(slo.AUDIT_NAMESPACE, slo.PUBLISHED)

    def process(self, hour_counts):
        hour_start, counted = hour_counts
        path = self.layout.audit_counts(hour_start)
        before = files.read_json(path)["published"] if files.exists(path) else 0
        if counted.published < before:
            return
        document = counts.counts_document(
            self.layout.event_type,
            hour_start,
            self.layout.window_seconds,
            counted.published,
            counted.distinct_ids,
            self.source,
            Timestamp.now().micros / 1e6,
        )
        files.write_json(path, document)
        self.published.inc(counted.published - before)
        yield hour_counts


def accounted_for(layout: Layout, hour_start: int) -> int | None:
    """Messages of the hour that delivery accounted for: delivered and duplicates (its
    ``_SUCCESS``), the records under the late and dead-letter roots, and the repeats dropped
    after the close. None before the marker."""
    marker = layout.marker(hour_start)
    if not files.exists(marker):
        return None
    accounting = files.read_json(marker)["accounting"]
    written = 0
    for root in (layout.late, layout.dead_letter):
        written += sum(
            files.count_avro_records(p) for p in files.glob(partitions.join(layout.hour(root, hour_start), "*.avro"))
        )
    return accounting["delivered"] + accounting["duplicates"] + written + partitions.late_duplicates(layout, hour_start)


class CheckLostFn(beam.DoFn):
    """``check_delay_seconds`` after an hour's counts are written, compares them with what
    delivery accounted for; yields ``(hour_start, messages)`` newly found lost, each once.

    An hour without its marker by then is not checked here: it is overdue, which the
    delivery job's metrics and ``make audit`` report.
    """

    PUBLISHED = ReadModifyWriteStateSpec("published", VarIntCoder())
    REPORTED = ReadModifyWriteStateSpec("reported_lost", VarIntCoder())
    CHECK = TimerSpec("check", TimeDomain.REAL_TIME)

    def __init__(self, settings: AuditSettings):
        self.layout = settings.layout
        self.delay_seconds = settings.check_delay_seconds

    def setup(self):
        use_emulator_credentials()

    def process(
        self,
        hour_counts,
        published=beam.DoFn.StateParam(PUBLISHED),
        check=beam.DoFn.TimerParam(CHECK),
    ):
        published.write(hour_counts[1].published)
        check.set(Timestamp.now() + Duration(seconds=self.delay_seconds))

    @on_timer(CHECK)
    def check_hour(
        self,
        hour_start=beam.DoFn.KeyParam,
        published=beam.DoFn.StateParam(PUBLISHED),
        reported=beam.DoFn.StateParam(REPORTED),
    ):
        accounted = accounted_for(self.layout, hour_start)
        name, hour = self.layout.event_type, counts.iso(hour_start)
        if accounted is None:
            _LOG.warning("%s %s: no _SUCCESS marker %ss after the hour closed", name, hour, self.delay_seconds)
            return
        lost = published.read() - accounted
        if lost:
            _LOG.warning("%s %s: published %d, accounted for %d", name, hour, published.read(), accounted)
        already = reported.read() or 0
        if lost > already:
            reported.write(lost)
            yield hour_start, lost - already


class CountLostFn(beam.DoFn):
    """The ``audit/lost`` counter. A step of its own: the local runner drops what a timer counts."""

    def setup(self):
        self.lost = Metrics.counter(slo.AUDIT_NAMESPACE, slo.LOST)

    def process(self, newly_lost):
        self.lost.inc(newly_lost[1])


class AuditPublished(beam.PTransform):
    """One type's messages (or count reports) in; the counts written, per hour, out."""

    def __init__(self, settings: AuditSettings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        s = self.settings
        if s.source == AUDIT_SUBSCRIPTION:
            counted = messages | "CountMessages" >> CountMessages(s)
        else:
            counted = messages | "SumCountReports" >> SumCountReports(s)
        written = counted | "WriteCounts" >> beam.ParDo(WriteCountsFn(s)).with_output_types(tuple[int, typing.Any])
        written | "CheckLost" >> beam.ParDo(CheckLostFn(s)) | "CountLost" >> beam.ParDo(CountLostFn())
        return written


class AuditType(beam.PTransform):
    """One type's auditor, from its subscription: a branch of the job, labelled by the type."""

    def __init__(self, settings: AuditSettings, project: str):
        super().__init__()
        self.settings = settings
        self.project = project

    def expand(self, pipeline):
        subscription = self.settings.subscription(self.project)
        return (
            pipeline
            | "ReadFromPubSub" >> beam.io.ReadFromPubSub(subscription=subscription, with_attributes=True)
            | "AuditPublished" >> AuditPublished(self.settings)
        )


def start(argv: list[str]):
    """Builds and starts the job, one pipeline per type; returns their results and the runner.
    Flag errors exit with code 2."""
    exit_on_help(argv, PROG, __doc__, add_hour_arguments, add_trigger_argument, add_auditor_arguments)
    options = pipeline_options(argv)
    project = options.view_as(GoogleCloudOptions).project
    standard = options.view_as(StandardOptions)
    try:
        settings = auditor_settings(options)
        if not project:
            raise ValueError("--project is required")
        if standard.runner != LOCAL_RUNNER and len(settings) > 1:
            raise ValueError("on a remote runner each type is a job of its own: use --event_type")
    except (KeyError, ValueError) as error:
        preflight.fail(PROG, str(error).strip("'\""))
    use_emulator_credentials()
    standard.streaming = True
    if standard.runner == LOCAL_RUNNER:
        with preflight.exit_on_failure(PROG):
            for s in settings:
                preflight.check_subscription(s.subscription(project))
            preflight.check_root(settings[0].layout.audit, project)
        lift_emulator_pull_limit()
    results = []
    for s in settings:
        # A pipeline per type, also when one process runs them all: the local runner works
        # a pipeline on one thread, which an idle Pub/Sub read blocks for up to 30 s, so
        # types sharing a pipeline would wait on each other's empty pulls.
        pipeline = beam.Pipeline(options=options)
        pipeline | f"Audit {s.event_type.name}" >> AuditType(s, project)
        results.append(pipeline.run())
    logging.info("%s%s to %s", READY_LINE, ", ".join(s.event_type.name for s in settings), settings[0].layout.audit)
    return results, standard.runner


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _wait(result, ended: queue.Queue) -> None:
    try:
        result.wait_until_finish()
        ended.put(None)
    except Exception as error:  # the main thread logs it and stops the other types
        ended.put(error)


def main(argv=None) -> int:
    start_logging()
    argv = sys.argv[1:] if argv is None else argv
    results, runner = start(argv)
    if runner != LOCAL_RUNNER:
        return 0  # the remote service runs the job from here on
    signal.signal(signal.SIGTERM, _interrupt)
    ended = queue.Queue()
    for result in results:
        threading.Thread(target=_wait, args=(result, ended), daemon=True).start()
    failed = None
    try:
        while True:
            with contextlib.suppress(queue.Empty):
                failed = ended.get(timeout=1)
                break
    except KeyboardInterrupt:
        logging.info("stopping the auditor")
    for result in results:
        result.cancel()
    if failed is not None:
        logging.error("an auditor pipeline failed: %s", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
