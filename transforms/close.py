"""Close an hour: decide when it is over, then publish its staged files and ``_SUCCESS``, once.

``CloseHour`` is the one authority on whether an hour is closed. Delivered panes
are written to a staging folder; when the watermark passes the hour's end plus its
allowed lateness, the hour's plan is saved and its files are published as parts of
about ``--target_file_mb``, the marker last (``transforms.publish``). A staged pane
that turns up after that (or for an hour an earlier run closed) moves to the late root
instead, less the ids the hour already holds (``transforms.late.move_late_checked``), so
nothing is ever added to a folder that has a marker, nor a repeat to the late root. So
does one a saved plan does not list (staged after a close attempt that failed, or by a new
run for an hour a stopped run had planned): a saved plan is never changed, since parts of
it may be written.

No close is retried forever. A close denied for good (permission denied, no such bucket)
leaves the hour staged, is counted (``closes_failed``) and logged, and tries again on a
timer every ``RETRY_CLOSE_SECONDS``: the hour publishes by itself once the cause is
mended, and is overdue until then. Any other error goes to the runner, which retries.
(The denial shows when the plan is saved, in the bucket the parts and the marker go to.)

A drain moves the watermark to infinity, so every close timer fires at once, also for
hours that are still open by the clock. Such a close publishes nothing: the hour's
files stay staged, and the next run's start-up (``AnnounceLeftoverHours``) hands the
hour back to ``CloseHour``, which closes it when its time comes, with every run's files.
It sets no timer to close the hour later by the clock: a processing-time timer holds the
watermark at its input's timestamp, so it would hold the drain until the hour's end, and
then publish an hour whose messages are still unread in the subscription.
"""

from __future__ import annotations

import logging
import time
import typing

import apache_beam as beam
from apache_beam.coders import BooleanCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from transforms.declared_types import ANY_OUTPUT
from transforms.hours import bucket_start_seconds, hour_windows
from transforms.late import LateMover, Waiting
from transforms.publish import (
    PLANNED,
    buckets_planned,
    finish_hour,
    index_to_read,
    plan_hour,
    plan_path,
    unplanned,
)
from transforms.publish_hours import PublishHours
from transforms.reports import DEAD_LETTERED, DELIVERED, DUPLICATES, LATE, LEFT_OVER, OPENED, report
from transforms.retries import denied  # what no retry of the bundle mends where the close publishes

_LOG = logging.getLogger(__name__)
wall_clock = time.time  # module-level, so that a test can hold the clock while the watermark jumps
INDEX_TASKS = "index_tasks"
RETRY_CLOSE_SECONDS = 600  # between tries of a close denied for good; module-level, so that a test can shorten it


@ANY_OUTPUT
class CloseHourFn(beam.DoFn):
    REPORTS = BagStateSpec("reports", beam.coders.FastPrimitivesCoder())
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    LATE_COUNTS = ReadModifyWriteStateSpec("late_count_files", VarIntCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)
    CLOSE_AGAIN = TimerSpec("close_again", TimeDomain.REAL_TIME)
    WAITING = BagStateSpec("waiting_to_move_late", beam.coders.FastPrimitivesCoder())
    WAITING_SINCE = ReadModifyWriteStateSpec("waiting_since", VarIntCoder())
    MOVE_LATE = TimerSpec("move_late", TimeDomain.REAL_TIME)

    def __init__(self, settings, publish: bool = True):
        self.settings = settings
        self.layout = settings.layout
        self.run_id = settings.run_id
        self.target_file_mb = settings.target_file_mb
        self.codec = settings.codec
        self.num_shards = settings.num_shards
        self.publish = publish
        self.streaming = not settings.bounded

    def setup(self):
        use_emulator_credentials()
        self.late = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.LATE)
        self.late_files = LateMover(self.settings)
        self.left_open = beam.metrics.Metrics.counter(slo.NAMESPACE, "hours_left_open_by_drain")
        self.dead_lettered_after_close = beam.metrics.Metrics.counter(slo.NAMESPACE, "dead_lettered_after_close")
        self.closes_failed = beam.metrics.Metrics.counter(slo.NAMESPACE, "closes_failed")

    def _folder(self, root, window) -> str:
        return self.layout.hour(root, bucket_start_seconds(window))

    def _is_closed(self, closed, window) -> bool:
        """Closed in this run, or by an earlier run that left its marker."""
        state = closed.read()
        if state is None:
            state = files.exists(self.layout.marker(bucket_start_seconds(window)))
            closed.write(state)
        return state

    def process(
        self,
        keyed_report,
        window=beam.DoFn.WindowParam,
        reports=beam.DoFn.StateParam(REPORTS),
        closed=beam.DoFn.StateParam(CLOSED),
        close=beam.DoFn.TimerParam(CLOSE),
        late_counts=beam.DoFn.StateParam(LATE_COUNTS),
        waiting=beam.DoFn.StateParam(WAITING),
        since=beam.DoFn.StateParam(WAITING_SINCE),
        move_late=beam.DoFn.TimerParam(MOVE_LATE),
    ):
        _, hour_report = keyed_report
        kind, records, _ = hour_report
        if kind == LATE:
            self.late.inc(records)
        elif not self._is_closed(closed, window):
            if self.publish:
                reports.add(hour_report)
                close.set(window.end)
        elif kind == LEFT_OVER:
            self._clear_up_after_the_marker(window)
        else:
            self._after_the_close(hour_report, window, late_counts, Waiting(waiting, since, move_late))

    def _after_the_close(self, hour_report, window, late_counts, waiting) -> None:
        """A report the hour's manifest does not hold: its file goes to the late root less the ids the hour
        holds (counted as duplicates beside it), its count beside it. While the hour has no marker, its index
        is not complete: the file ``waiting`` for it moves once it is written (``move_late_once_published``)."""
        kind, records, path = hour_report
        hour_start = bucket_start_seconds(window)
        if kind == DELIVERED and waiting and not files.exists(self.layout.marker(hour_start)):
            waiting.add(path, wall_clock())
        elif kind == DELIVERED:
            self.late_files.move(path, hour_start)
        elif kind == DUPLICATES:
            self._count_late_duplicates(window, records, late_counts)
        elif kind == DEAD_LETTERED:  # its file is in the hour's dead-letter folder, which the audit counts
            self.dead_lettered_after_close.inc(records)

    def _clear_up_after_the_marker(self, window) -> None:
        """What runs stopped after the hour's marker left staged: the files of a plan they had not
        deleted yet (published), then files staged after the close, whose reports were lost."""
        hour_start = bucket_start_seconds(window)
        if not files.exists(self.layout.marker(hour_start)):
            return  # closed by this run, which is publishing it: what other runs left is in its plan
        if files.exists(plan_path(self.layout, hour_start)):
            finish_hour(self.layout, hour_start)
        staging = self._folder(self.layout.staging, window)
        for path in partitions.shard_files_of_other_runs(staging, self.layout.event_type, self.run_id):
            self._after_the_close(report(DELIVERED, files.count_avro_records(path), path), window, None, None)

    def _count_late_duplicates(self, window, records: int, late_counts) -> None:
        """Repeats dropped after the close are counted beside the hour's late files, since
        its manifest is written; the file's number, kept in state, makes a retry rewrite it."""
        number = late_counts.read() or 0
        name = partitions.late_duplicates_name(self.layout.event_type, self.run_id, number)
        files.write_json(partitions.join(self._folder(self.layout.late, window), name), {DUPLICATES: records})
        late_counts.write(number + 1)

    @on_timer(CLOSE)
    def close_when_due(
        self,
        window=beam.DoFn.WindowParam,
        reports=beam.DoFn.StateParam(REPORTS),
        closed=beam.DoFn.StateParam(CLOSED),
        close_again=beam.DoFn.TimerParam(CLOSE_AGAIN),
        late_counts=beam.DoFn.StateParam(LATE_COUNTS),
        waiting=beam.DoFn.StateParam(WAITING),
        since=beam.DoFn.StateParam(WAITING_SINCE),
        move_late=beam.DoFn.TimerParam(MOVE_LATE),
    ):
        yield from self._close(window, reports, closed, close_again, late_counts, Waiting(waiting, since, move_late))

    @on_timer(CLOSE_AGAIN)
    def close_after_a_denial(
        self,
        window=beam.DoFn.WindowParam,
        reports=beam.DoFn.StateParam(REPORTS),
        closed=beam.DoFn.StateParam(CLOSED),
        close_again=beam.DoFn.TimerParam(CLOSE_AGAIN),
        late_counts=beam.DoFn.StateParam(LATE_COUNTS),
        waiting=beam.DoFn.StateParam(WAITING),
        since=beam.DoFn.StateParam(WAITING_SINCE),
        move_late=beam.DoFn.TimerParam(MOVE_LATE),
    ):
        yield from self._close(window, reports, closed, close_again, late_counts, Waiting(waiting, since, move_late))

    def _close(self, window, reports, closed, close_again, late_counts, waiting):
        if closed.read():
            return  # the marker is written once, even if the runner fires the timer again
        closes_at = window.end.micros / 1e6
        if self.streaming and wall_clock() < closes_at:
            # A drain: the hour is not over, so it is not published (see the module's docstring).
            self.left_open.inc()
            return
        hour_start = bucket_start_seconds(window)
        collected = list(reports.read()) + self._left_by_earlier_runs(window)
        try:
            plan = plan_hour(
                self.layout,
                hour_start,
                closes_at,
                collected,
                replayed=not self.streaming,
                target_file_mb=self.target_file_mb,
                num_shards=self.num_shards,
                codec=self.codec,
            )
        except Exception as error:
            if not (self.streaming and denied(error)):
                raise
            self.closes_failed.inc()
            _LOG.error(
                "closing %s %s was denied (%s); trying again in %d s",
                self.layout.event_type,
                partitions.iso_utc(hour_start),
                type(error).__name__,
                RETRY_CLOSE_SECONDS,
            )
            close_again.set(wall_clock() + RETRY_CLOSE_SECONDS)
            return
        for hour_report in unplanned(plan, collected):  # arrived after an earlier attempt saved the plan
            self._after_the_close(hour_report, window, late_counts, waiting)
        closed.write(True)
        reports.clear()
        if plan is None:
            return  # published by an earlier run
        for task in index_to_read(plan):
            yield beam.pvalue.TaggedOutput(INDEX_TASKS, (hour_start, task))
        yield hour_start, (PLANNED, buckets_planned(plan))

    @on_timer(MOVE_LATE)
    def move_late_once_published(
        self,
        window=beam.DoFn.WindowParam,
        waiting=beam.DoFn.StateParam(WAITING),
        since=beam.DoFn.StateParam(WAITING_SINCE),
        move_late=beam.DoFn.TimerParam(MOVE_LATE),
    ):
        """Moves the files waiting for the hour's marker late, once it is written or they waited long enough."""
        hour_start = bucket_start_seconds(window)
        published = files.exists(self.layout.marker(hour_start))
        for path in Waiting(waiting, since, move_late).due(published, wall_clock()):
            self.late_files.move(path, hour_start)

    def _left_by_earlier_runs(self, window) -> list[tuple]:
        """Reports of the files that runs stopped before the hour closed left for it."""
        left = []
        for kind, root in ((DELIVERED, self.layout.staging), (DEAD_LETTERED, self.layout.dead_letter)):
            folder = self._folder(root, window)
            for path in partitions.shard_files_of_other_runs(folder, self.layout.event_type, self.run_id):
                left.append(report(kind, files.count_avro_records(path), path))
        return left


class CloseHour(beam.PTransform):
    """Hour reports in; the paths of written ``_SUCCESS`` markers out.

    ``settings`` are the job's ``DeliverySettings``: its layout and its run. Without
    ``publish`` (a redrive, which never owns an hour) nothing is published: staged
    files of hours that have their marker move to the late root, and the rest wait
    in staging for the close of the job that owns the hour.
    """

    def __init__(self, settings, publish: bool = True):
        super().__init__()
        self.settings = settings
        self.fn = CloseHourFn(settings, publish)

    def expand(self, reports):
        # Keyed by hour, so that closes of different hours run side by side: a runner
        # processes one key's work one item at a time.
        planned = (
            reports
            | "KeyByHour" >> beam.ParDo(KeyByHourFn()).with_output_types(tuple[int, typing.Any])
            | "CloseWhenDue" >> beam.ParDo(self.fn).with_outputs(INDEX_TASKS, main="planned")
        )
        hours = {"planned": planned.planned, INDEX_TASKS: planned[INDEX_TASKS]}
        return hours | "PublishHours" >> PublishHours(self.settings)


class KeyByHourFn(beam.DoFn):
    def process(self, hour_report, window=beam.DoFn.WindowParam):
        yield bucket_start_seconds(window), hour_report


class AnnounceEveryHourFn(beam.DoFn):
    """One ``opened`` report per hour, from the hour the job was built in onward, stamped in
    the hour as the watermark reaches it: so that an hour in which nothing arrived closes
    too, with a marker that counts zero, and a consumer waiting on it does not wait forever.

    One timer walks the hours. It stops one hour ahead of the clock, so a watermark
    that jumps to infinity (a drain) announces no more than that.
    """

    NEXT_HOUR = TimerSpec("next_hour", TimeDomain.WATERMARK)

    def __init__(self, window_seconds: int, started_at: float):
        self.window_seconds = window_seconds
        self.started_at = started_at

    def process(self, _, next_hour=beam.DoFn.TimerParam(NEXT_HOUR)):
        started = int(self.started_at)
        next_hour.set(Timestamp(started - started % self.window_seconds))

    @on_timer(NEXT_HOUR)
    def announce(self, hour_start=beam.DoFn.TimestampParam, next_hour=beam.DoFn.TimerParam(NEXT_HOUR)):
        yield TimestampedValue(report(OPENED, 0), hour_start)
        if hour_start.micros / 1e6 <= wall_clock():
            next_hour.set(hour_start + Duration(seconds=self.window_seconds))


class AnnounceEveryHour(beam.PTransform):
    """``opened`` reports for every hour from the job's start on (see ``AnnounceEveryHourFn``).

    Its clock is the watermark of ``messages``, the job's input, which a Pub/Sub source
    advances also while nothing arrives; none of the messages goes through it.
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        start = messages.pipeline | "Start" >> beam.Impulse()
        watermark = messages | "FollowTheInputWatermark" >> beam.Filter(lambda _: False)
        return (
            (start, watermark)
            | "Merge" >> beam.Flatten()
            | "OneClock" >> beam.Map(lambda _: ("clock", None))
            | "WalkTheHours" >> beam.ParDo(AnnounceEveryHourFn(self.settings.window_seconds, wall_clock()))
            | "IntoHours" >> hour_windows(self.settings)
        )
