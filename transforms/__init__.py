"""The delivery path's steps, one concern per transform.

Elements travel as plain tuples, which Beam encodes without pickling:

- an event is ``(event_id, received_at_millis, fields)`` until it is sealed, and from there on
  ``(event_id, received_at_millis, record, forgotten)``, its delivered Avro record encoded
  once (``records``);
- a dead letter is ``(event_id or "", received_at_millis, dead_letter_record)``;
- after ``BucketByHour``, a pane is ``((shard, writer), [events])`` in its hour's window; after
  ``GatherPanes`` (a stream's) or ``Deduplicate`` (a bounded input's), ``((shard, writer, number), [events])``;
- an hour report is ``(kind, records, path)`` (see ``reports``).
"""
