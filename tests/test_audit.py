"""The audit reads a storage root that jobs may be writing at the same moment."""

from __future__ import annotations

import datetime

import fastavro

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.ops import audit

HOUR = 1_795_946_400  # 2026-11-29T10:00:00Z
SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Event",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "received_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        ],
    }
)


def test_a_file_that_a_close_moves_while_the_audit_reads_is_counted_where_it_went(tmp_path, monkeypatch):
    layout = partitions.Layout.under(str(tmp_path), "play", 3600)
    name = partitions.pane_file_name("play", "run1", 0, 0)
    staged = partitions.join(layout.hour(layout.staging, HOUR), name)
    published = partitions.join(layout.hour(layout.delivered, HOUR), name)
    received_at = datetime.datetime.fromtimestamp(HOUR + 5, tz=datetime.timezone.utc)
    files.write_avro(staged, SCHEMA, [{"event_id": f"e{i}", "received_at": received_at} for i in range(3)])

    count = files.count_avro_records
    moves = []

    def close_meanwhile(path):  # the hour closes between the audit's listing and its read
        if not moves:
            moves.append(path)
            files.move(staged, published)
        return count(path)

    monkeypatch.setattr(files, "count_avro_records", close_meanwhile)
    result = audit.audit_type(layout)
    assert moves == [staged]
    assert (result.total("staged"), result.total("delivered")) == (0, 3)
    assert sorted(result.hours[partitions.partition(HOUR)].delivered_ids) == ["e0", "e1", "e2"]
