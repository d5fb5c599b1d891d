"""Close an hour: publish its staged files and write ``_SUCCESS``, exactly once.

``CloseHour`` is the one authority on whether an hour is closed. Delivered panes
are written to a staging folder; when the watermark passes the hour's end plus its
allowed lateness, they move into the hour's folder and the marker is written last.
A staged pane that turns up after that (or for an hour an earlier run closed) moves
to the late root instead, so nothing is ever added to a folder that has a marker.
"""

from __future__ import annotations

import datetime
import logging
import posixpath
import typing

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions
from transforms.hours import bucket_start_seconds
from transforms.reports import DEAD_LETTERED, DELIVERED, DUPLICATES, FORGOTTEN, LATE, report

_LOG = logging.getLogger(__name__)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def build_manifest(event_type_name, hour_start, window_seconds, closes_at, delivered_files, reports) -> dict:
    """The ``_SUCCESS`` document: the hour's files and its accounting at close.

    ``delivered_files`` maps each published file to its record count; ``reports``
    supply the duplicates and dead letters counted while the hour was open, and how
    many delivered events belonged to forgotten subjects (a part of ``delivered``).
    """
    duplicates = sum(records for kind, records, _ in reports if kind == DUPLICATES)
    forgotten = sum(records for kind, records, _ in reports if kind == FORGOTTEN)
    dead_letter_files = {path: records for kind, records, path in reports if kind == DEAD_LETTERED}
    delivered = sum(delivered_files.values())
    dead_lettered = sum(dead_letter_files.values())
    return {
        "event_type": event_type_name,
        "hour_start": _iso(hour_start),
        "hour_end": _iso(hour_start + window_seconds),
        "closed_at_watermark": _iso(closes_at),
        "files": [{"path": path, "records": n} for path, n in sorted(delivered_files.items())],
        "dead_letter_files": [{"path": path, "records": n} for path, n in sorted(dead_letter_files.items())],
        "accounting": {
            "in": delivered + duplicates + dead_lettered,
            "delivered": delivered,
            "duplicates": duplicates,
            "dead_lettered": dead_lettered,
            "forgotten": forgotten,
        },
    }


class CloseHourFn(beam.DoFn):
    REPORTS = BagStateSpec("reports", beam.coders.FastPrimitivesCoder())
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, settings, publish: bool = True):
        self.layout = settings.layout
        self.run_id = settings.run_id
        self.publish = publish

    def setup(self):
        use_emulator_credentials()
        self.delivered = beam.metrics.Metrics.counter("delivery", "delivered")
        self.late = beam.metrics.Metrics.counter("delivery", "late")
        self.closed_hours = beam.metrics.Metrics.counter("delivery", "closed_hours")

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
    ):
        _, hour_report = keyed_report
        kind, records, path = hour_report
        if kind == LATE:
            self.late.inc(records)
        elif not self._is_closed(closed, window):
            if self.publish:
                reports.add(hour_report)
                close.set(window.end)
        elif kind == DELIVERED:
            files.move(path, partitions.join(self._folder(self.layout.late, window), posixpath.basename(path)))
            self.late.inc(records)

    @on_timer(CLOSE)
    def write_marker(
        self,
        window=beam.DoFn.WindowParam,
        reports=beam.DoFn.StateParam(REPORTS),
        closed=beam.DoFn.StateParam(CLOSED),
    ):
        if closed.read():
            return  # the marker is written once, even if the runner fires the timer again
        collected = list(reports.read())
        collected += self._left_by_earlier_runs(window)
        staged = {path: records for kind, records, path in collected if kind == DELIVERED}
        folder = self._folder(self.layout.delivered, window)
        published = {}
        for path, records in staged.items():
            destination = partitions.join(folder, posixpath.basename(path))
            files.move(path, destination)
            published[destination] = records
        hour_start = bucket_start_seconds(window)
        manifest = build_manifest(
            self.layout.event_type,
            hour_start,
            self.layout.window_seconds,
            window.end.micros / 1e6,
            published,
            collected,
        )
        marker = self.layout.marker(hour_start)
        files.write_json(marker, manifest)
        closed.write(True)
        reports.clear()
        self.delivered.inc(manifest["accounting"]["delivered"])
        self.closed_hours.inc()
        _LOG.info(
            "closed %s %s: %d records in %d files",
            self.layout.event_type,
            _iso(hour_start),
            manifest["accounting"]["delivered"],
            len(published),
        )
        yield marker

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
        self.fn = CloseHourFn(settings, publish)
        self.event_type_name = settings.event_type.name

    def expand(self, reports):
        return (
            reports
            | "KeyByType"
            >> beam.Map(lambda hour_report, name: (name, hour_report), self.event_type_name).with_output_types(
                tuple[str, typing.Any]
            )
            | "PublishHour" >> beam.ParDo(self.fn)
        )
