"""The delivery path's steps, one concern per transform.

Elements travel as plain tuples, which Beam encodes without pickling:

- an event is ``(event_id, received_at_millis, fields)``;
- a dead letter is ``(event_id or "", received_at_millis, dead_letter_record)``;
- after ``BucketByHour``, a pane is ``(shard, [events])`` in its hour's window;
- an hour report is ``(kind, records, path, on_time)`` (see ``reports``).
"""
