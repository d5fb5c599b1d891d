"""Write each pane of an hour's shard as one Avro file in the hour-partitioned layout.

No pane is retried forever. A write that fails for good (permission denied, no such
bucket) gives its events up as dead letters (``WriteAvroPanesOrGiveUp``), and the job
moves on. A record the schema does not take never reaches a delivered pane: sealing
encodes each event's record, and gives that event up alone (``transforms.personal``). A transient error
is retried (``transforms.retries``), then left to the runner, which retries the bundle.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import fastavro
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from transforms import retries
from transforms.declared_types import ANY_OUTPUT
from transforms.hours import bucket_start_seconds
from transforms.records import RecordCoder
from transforms.reports import report
from transforms.results import Result
from transforms.sealed_dead_letters import DeadLetterFailedWrites

_LOG = logging.getLogger(__name__)
WRITE_FAILED = "write_failed"
# Errors that no retry mends: the file's data, or what the job may do where it writes.
PERMANENT = (files.AvroWriteError, *retries.DENIED)
# A staged pane's ids go in its header when its records weigh at least this many times the header (the ids and
# the records' sizes, as JSON): the header adds at most half to the file, and reading it spares decoding the
# records, ~2.5 µs for one of 80 B and ~4 µs for 250 B, against ~0.1 µs an id in the header. Tinier records
# cost more bytes than CPU.
IDS_IN_HEADER_SHARE = 2


def failed_write_reason(report_kind: str, error_name: str) -> str:
    """Why a write's events went to the dead letters, as their ``write_failed`` dead letters say it."""
    return f"writing {report_kind} failed: {error_name}"


def prepared_record(element) -> dict:
    """An ``(id, received_at_millis, record)`` element whose record is ready for Avro
    (a dead letter, an archived message), to be encoded where it is written."""
    return element[2]


@ANY_OUTPUT
class WriteBoundedPaneFn(beam.DoFn):
    """Writes the one pane of a bounded input's (hour, shard) as its file number 0."""

    def __init__(
        self,
        settings,
        root: str,
        report_kind: str,
        schema: dict,
        to_record,
        give_up_failures=False,
        codec=None,
        series=partitions.STAGED_SERIES,
    ):
        self.give_up_failures = give_up_failures
        self.series = series
        self.codec = codec or files.AVRO_CODEC
        self.layout = settings.layout
        self.run_id = settings.run_id
        self.root = root
        self.schema = schema
        self.report_kind = report_kind
        self.to_record = to_record

    def default_label(self):
        return "WritePaneFn"  # the step name from before the rename, as the stream twin's

    def setup(self):
        use_emulator_credentials()
        self.parsed_schema = fastavro.parse_schema(self.schema)
        self.records = RecordCoder(self.parsed_schema)
        self.write_failed = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.dead_lettered(WRITE_FAILED))

    def process(self, pane_elements, window=beam.DoFn.WindowParam):
        yield from self.write(pane_elements, window, 0)

    def write(self, pane_elements, window, number: int):
        (shard, writer), elements = pane_elements
        if not elements:
            return
        path = partitions.join(self._folder(window), self._name(shard, writer, number))
        try:
            encoded = self._encoded(elements)
            self._write_with_retries(path, encoded, self._ids_header(elements, encoded))
        except PERMANENT as error:
            if not self.give_up_failures:
                raise
            reason = type(error).__name__
            self.write_failed.inc(len(elements))
            _LOG.error("%d event(s) for %s go to the dead letters: %s", len(elements), path, reason)
            yield beam.pvalue.TaggedOutput(WRITE_FAILED, (failed_write_reason(self.report_kind, reason), elements))
            return
        yield report(self.report_kind, len(elements), path)

    def _folder(self, window) -> str:
        return self.layout.hour(self.root, bucket_start_seconds(window))

    def _name(self, shard: int, writer: str, number: int) -> str:
        return partitions.pane_file_name(self.layout.event_type, self.run_id, number, shard, writer, self.series)

    def _encoded(self, elements: list) -> list[bytes]:
        """The elements' records as Avro bytes: encoded where they were sealed (``transforms.records``),
        or here by ``to_record``, which fails the pane with ``AvroWriteError`` if one does not fit."""
        if self.to_record is None:
            return [e[2] for e in elements]
        return [self.records.encode(self.to_record(e)) for e in elements]

    def _ids_header(self, elements: list, encoded: list[bytes]) -> dict[str, str] | None:
        """A staged pane's ids and its records' sizes, for its file's header (``files.ids_header``), where the
        close's index and a restart read the ids, and a rewrite cuts the records apart, without decoding a
        record (``files.read_event_ids``, ``files.rewrite_avro_without``). None where decoding costs less than
        the header weighs (records under ``IDS_IN_HEADER_SHARE`` times the header's bytes), for a file outside
        staging (a late file is read by consumers as it is written), and for records encoded here."""
        if self.to_record is not None or self.root != self.layout.staging:
            return None
        header = files.ids_header([e[0] for e in elements], encoded)
        header_bytes = sum(len(k) + len(v) for k, v in header.items())  # JSON as ``json.dumps`` writes it: ASCII
        return header if header_bytes * IDS_IN_HEADER_SHARE <= sum(len(r) for r in encoded) else None

    def _write_with_retries(self, path: str, encoded: list[bytes], header: dict[str, str] | None) -> None:
        write = lambda: files.write_encoded_avro(path, self.parsed_schema, encoded, self.codec, header)  # noqa: E731
        retries.with_retries(write, passing=lambda error: not isinstance(error, PERMANENT))


class WriteStreamPaneFn(WriteBoundedPaneFn):
    """Writes each pane of a stream's (hour, shard, writer) under the next number that state keeps for it.

    Beam's pane index would name files too, but a runner may reset it: Dataflow's
    Runner v2 does after a reshuffle, and every pane of an (hour, shard) would then
    write over the one before. The number is committed with the pane's output, so a
    retried bundle gets the same number and rewrites the same file.
    """

    NUMBER = ReadModifyWriteStateSpec("next_file_number", VarIntCoder())

    def default_label(self):
        # Running jobs know this stateful step as ``.../ParDo(WriteNumberedPaneFn)``: ``--update``
        # hands its state over by that name, so the class's rename leaves it as it was.
        return "WriteNumberedPaneFn"

    def process(self, pane_elements, window=beam.DoFn.WindowParam, number=beam.DoFn.StateParam(NUMBER)):
        if not pane_elements[1]:
            return
        current = number.read() or 0
        number.write(current + 1)
        yield from self.write(pane_elements, window, current)


class WriteNumberedPaneFn(WriteBoundedPaneFn):
    """Writes each pane under the file number its key carries, ``((shard, writer, number), elements)``:
    panes that a stateful step before it numbered (``GatherPanes``). It keeps no state, so a runner
    fuses it with that step, and a pane crosses no keyed shuffle on its way to its file."""

    def default_label(self):
        return "WritePaneOfItsNumberFn"

    def process(self, pane_elements, window=beam.DoFn.WindowParam):
        (shard, writer, number), elements = pane_elements
        yield from self.write(((shard, writer), elements), window, number)


class WriteAvroPanes(beam.PTransform):
    """``((shard, writer), [elements])`` panes in (or ``numbered`` ones); one file per non-empty pane
    under ``root``; hour reports out.

    The file name is fixed by (run, hour, file number, shard, writer), so a retried
    bundle rewrites the same file instead of adding a second copy. A stream numbers the
    panes of an (hour, shard, writer) in state; a bounded input has one pane each. Records follow the
    type's delivered schema, encoded where they were sealed (``transforms.records``), unless
    ``schema`` says otherwise: then ``to_record`` makes each element's record, encoded here.

    A write that fails for good fails the bundle (``WriteAvroPanesOrGiveUp`` gives the pane
    up instead). They are compressed with the job's codec (``--codec``); without ``compress``,
    uncompressed: staged panes, which the close compresses once, into the hour's parts.
    ``series`` names the files of a writer that shares its root with another (see
    ``partitions.pane_file_name``): the late root's. ``numbered`` panes carry their file number
    in their key, ``((shard, writer, number), elements)`` (``GatherPanes``'s, or ``Deduplicate``'s):
    none is kept here.
    """

    give_up_failures = False

    def __init__(
        self,
        settings,
        root: str,
        report_kind: str,
        schema: dict | None = None,
        to_record=None,
        compress: bool = True,
        series: str = partitions.STAGED_SERIES,
        numbered: bool = False,
    ):
        super().__init__()
        schema = schema or settings.event_type.delivered_schema
        fn = WriteNumberedPaneFn if numbered else WriteBoundedPaneFn if settings.bounded else WriteStreamPaneFn
        codec = settings.codec if compress else files.UNCOMPRESSED
        self.fn = fn(settings, root, report_kind, schema, to_record, self.give_up_failures, codec, series)

    def expand(self, panes):
        return panes | "WriteFiles" >> beam.ParDo(self.fn)


class WriteAvroPanesOrGiveUp(WriteAvroPanes):
    """As ``WriteAvroPanes``, but a pane whose write fails for good (see the module) is given up
    and the job goes on: a ``Result`` out, the hour reports (``output``) and the given-up events as
    ``write_failed`` ``dead_letters``, their personal fields unsealed again with ``key_cache``'s keys."""

    give_up_failures = True

    def __init__(self, settings, root: str, report_kind: str, key_cache, compress: bool = True, numbered=False):
        super().__init__(settings, root, report_kind, compress=compress, numbered=numbered)
        self.event_type, self.key_cache = settings.event_type, key_cache

    def expand(self, panes):
        written = panes | "WriteFiles" >> beam.ParDo(self.fn).with_outputs(WRITE_FAILED, main="reports")
        return given_up_as_dead_letters(written, self.event_type, self.key_cache)


def given_up_as_dead_letters(written, event_type, key_cache) -> Result:
    """A giving-up write's ``reports`` and ``WRITE_FAILED`` outputs as a ``Result``: the reports, and
    the failed writes, ``(reason, [events])``, as the dead letters that every failing step gives."""
    dead_letters = written[WRITE_FAILED] | "DeadLetterFailedWrites" >> DeadLetterFailedWrites(event_type, key_cache)
    return Result(written.reports, dead_letters)
