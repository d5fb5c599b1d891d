"""The count by id fails on each misplaced copy it is there to find."""

from __future__ import annotations

import fastavro
import pytest

from tests.by_id import assert_every_id_in_one_place

SCHEMA = fastavro.parse_schema({"type": "record", "name": "Event", "fields": [{"name": "event_id", "type": "string"}]})


def written(root, folder: str, name: str, ids: list[str]):
    hour = root / folder / "play" / "dt=2027-01-15" / "hr=08"
    hour.mkdir(parents=True, exist_ok=True)
    with open(hour / name, "wb") as out:
        fastavro.writer(out, SCHEMA, [{"event_id": i} for i in ids])


def test_an_id_sent_twice_and_written_once_passes(tmp_path):
    written(tmp_path, "delivered", "part-0.avro", ["a", "b"])
    assert_every_id_in_one_place(str(tmp_path), "play", ["a", "b", "b"])


def test_a_repeat_written_late_after_its_delivery_fails(tmp_path):
    written(tmp_path, "delivered", "part-0.avro", ["a", "b"])
    written(tmp_path, "late", "late-0.avro", ["b"])
    with pytest.raises(AssertionError, match=r"written more than once.*'b': \(1, 1\)"):
        assert_every_id_in_one_place(str(tmp_path), "play", ["a", "b", "b"])


def test_a_repeat_written_late_twice_fails_unless_sent_past_a_documented_bound(tmp_path):
    written(tmp_path, "late", "late-0.avro", ["a", "b"])
    written(tmp_path, "late", "late-1.avro", ["b"])
    with pytest.raises(AssertionError, match=r"written more than once.*'b': \(0, 2\)"):
        assert_every_id_in_one_place(str(tmp_path), "play", ["a", "b", "b"])
    assert_every_id_in_one_place(str(tmp_path), "play", ["a", "b", "b"], may_be_late_again=["b"])
    with pytest.raises(AssertionError, match="more often than sent"):
        assert_every_id_in_one_place(str(tmp_path), "play", ["a", "b"], may_be_late_again=["b"])
