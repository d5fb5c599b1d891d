"""Write each pane of an hour's shard as one Avro file in the hour-partitioned layout."""

from __future__ import annotations

import apache_beam as beam
import fastavro
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions
from transforms.hours import bucket_start_seconds
from transforms.reports import report


def event_record(event) -> dict:
    """An ``(event_id, received_at_millis, fields)`` event as a delivered Avro record."""
    event_id, received_at_millis, fields = event
    return {"event_id": event_id, "received_at": received_at_millis, **fields}


def prepared_record(element) -> dict:
    """An ``(id, received_at_millis, record)`` element whose record is ready for Avro
    (a dead letter, an archived message)."""
    return element[2]


class WritePaneFn(beam.DoFn):
    """Writes the one pane of a bounded input's (hour, shard) as its file number 0."""

    def __init__(self, settings, root: str, report_kind: str, schema: dict, to_record):
        self.layout = settings.layout
        self.run_id = settings.run_id
        self.root = root
        self.schema = schema
        self.report_kind = report_kind
        self.to_record = to_record

    def setup(self):
        use_emulator_credentials()
        self.parsed_schema = fastavro.parse_schema(self.schema)

    def process(self, pane_elements, window=beam.DoFn.WindowParam):
        yield from self.write(pane_elements, window, 0)

    def write(self, pane_elements, window, number: int):
        shard, elements = pane_elements
        if not elements:
            return
        folder = self.layout.hour(self.root, bucket_start_seconds(window))
        name = partitions.pane_file_name(self.layout.event_type, self.run_id, number, shard)
        path = partitions.join(folder, name)
        files.write_avro(path, self.parsed_schema, [self.to_record(e) for e in elements])
        yield report(self.report_kind, len(elements), path)


class WriteNumberedPaneFn(WritePaneFn):
    """Writes each pane of a stream's (hour, shard) under the next number that state keeps for it.

    Beam's pane index would name files too, but a runner may reset it: Dataflow's
    Runner v2 does after a reshuffle, and every pane of an (hour, shard) would then
    write over the one before. The number is committed with the pane's output, so a
    retried bundle gets the same number and rewrites the same file.
    """

    NUMBER = ReadModifyWriteStateSpec("next_file_number", VarIntCoder())

    def process(self, pane_elements, window=beam.DoFn.WindowParam, number=beam.DoFn.StateParam(NUMBER)):
        if not pane_elements[1]:
            return
        current = number.read() or 0
        number.write(current + 1)
        yield from self.write(pane_elements, window, current)


class WriteAvroPanes(beam.PTransform):
    """``(shard, [elements])`` panes in; one file per non-empty pane under ``root``; hour reports out.

    The file name is fixed by (run, hour, file number, shard), so a retried bundle
    rewrites the same file instead of adding a second copy. A stream numbers the panes
    of an (hour, shard) in state; a bounded input has one pane each. Records follow the
    type's delivered schema unless ``schema`` says otherwise.
    """

    def __init__(self, settings, root: str, report_kind: str, schema: dict | None = None, to_record=event_record):
        super().__init__()
        schema = schema or settings.event_type.delivered_schema
        fn = WritePaneFn if settings.bounded else WriteNumberedPaneFn
        self.fn = fn(settings, root, report_kind, schema, to_record)

    def expand(self, panes):
        return panes | "WriteFiles" >> beam.ParDo(self.fn)
