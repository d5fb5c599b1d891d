"""The benchmark compares like with like: the plain loop, the floor, the backfill pipeline and
the streaming path deliver the same events; and its cost ledger counts what the streaming path does."""

from __future__ import annotations

import fastavro
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks import floor, keyed_steps, plain_loop, runs, workload
from event_delivery.cloud import files
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from event_delivery.keys.fields import decrypt_value
from tools.ops.audit import audit_type


def _workload_hour(root, name: str):
    """The audit of the workload's one hour (a streaming run also closes the empty hours of its clock)."""
    audit = audit_type(Layout.under(root, name, 3600))
    assert not audit.problems
    [hour] = [hour for hour in audit.hours.values() if hour.total]
    return hour


@pytest.mark.parametrize("streaming", [False, True], ids=["bounded", "streaming"])
def test_the_floor_and_the_pipeline_do_the_same_work(tmp_path, streaming):
    work = workload.build(tmp_path / "workload", 3000)
    assert sum(n for name, n in work.counts.items() if name in workload.MIX) == 3000

    assert floor.run_floor(work, tmp_path / "floor") == 3000
    runs.run_pipeline(work, tmp_path / "pipeline", workers=1, streaming=streaming)

    for name in workload.MIX:
        by_floor = [r["event_id"] for r in files.read_avro(str(tmp_path / "floor" / f"{name}.avro"))]
        dead_by_floor = files.count_avro_records(str(tmp_path / "floor" / f"{name}-dead-letters.avro"))
        hour = _workload_hour(tmp_path / "pipeline", name)
        assert sorted(hour.delivered_ids) == sorted(by_floor), name
        assert len(by_floor) == len(set(by_floor)), f"{name}: the floor deduplicates too"
        assert hour.dead_lettered == dead_by_floor, name
        assert hour.total == work.counts[name], f"{name}: every archived message is accounted for"


def test_the_keyed_step_alone_does_its_work_on_every_event(tmp_path):
    """The run that measures Beam's work on the keyed step does that work on every event: each copy
    kept in its pane or counted as a second copy within it (across panes, repeats are the close's)."""
    work = workload.build(tmp_path / "workload", 3000)
    ids = [event[0] for events in keyed_steps.load_events(work).values() for event in events]
    assert len(ids) == 3000 and len(set(ids)) < len(ids), "the workload repeats ids"

    counted = runs.run_keyed_steps(work, tmp_path / "out")

    assert counted["kept"] + counted["duplicates"] == len(ids) and counted["kept"] >= len(set(ids))


def test_the_plain_loop_delivers_what_the_floor_delivers_sealed_alike(tmp_path):
    """The lower bound skips work around the essential (validation, dead letters, the key
    store), never the essential itself: the same ids, each once, their personal fields
    sealed under the subject's key as the floor seals them."""
    work = workload.build(tmp_path / "workload", 3000)
    floor.run_floor(work, tmp_path / "floor")
    assert plain_loop.run_plain_loop(plain_loop.prepare(work), tmp_path / "loop") == 3000
    keys = work.keys.open()
    for name in workload.MIX:
        by_floor = {r["event_id"]: r for r in files.read_avro(str(tmp_path / "floor" / f"{name}.avro"))}
        by_loop = files.read_avro(str(tmp_path / "loop" / f"{name}.avro"))
        assert sorted(r["event_id"] for r in by_loop) == sorted(by_floor), name
        event_type = load_registry()[name]
        for record in by_loop[:50]:
            same = by_floor[record["event_id"]]
            assert record.get("key_id") == same.get("key_id"), name
            for field in [f for f in event_type.personal_fields if record[f] is not None]:
                aead = AESGCM(keys.data_keys([record["key_id"]])[record["key_id"]])
                opened = [
                    decrypt_value(aead, r[field], name, field, r["key_id"], r["event_id"]) for r in (record, same)
                ]
                assert opened[0] == opened[1] and record[field] != same[field], f"{name}.{field}: sealed, fresh nonce"


def test_the_ledger_counts_what_the_streaming_path_does(tmp_path):
    work = workload.build(tmp_path / "workload", 2000)
    ledgers = runs.run_ledger(work, tmp_path / "out")

    for name in workload.MIX:
        hour = _workload_hour(tmp_path / "out", name)
        costs = ledgers[name]
        on_the_way = {step["step"].split("/")[0]: step for step in costs["steps"] if step["carries_events"]}
        assert set(on_the_way) == {"GatherPanes"}, name
        # Every valid message crosses the panes' shuffle once (repeats too: the close drops those across
        # panes); each reads and writes its pane's cell and adds itself to the bag.
        panes = on_the_way["GatherPanes"]
        assert panes["elements"] == hour.delivered + hour.duplicates, name
        assert panes["state_reads"] >= panes["elements"] and panes["state_writes"] >= 2 * panes["elements"], name
        assert panes["bytes"] > panes["elements"] * 36, f"{name}: an id alone is 36 bytes"
        # The close's index carries each staged id once more, as (entry, part, place), grouped by bucket.
        [index] = [step for step in costs["steps"] if step["step"].endswith("WriteIndexBuckets")]
        assert index["bytes"] > hour.delivered * 36, name
        per_event = costs["per_event"]
        assert per_event["shuffles"] == 1
        assert per_event["bytes_shuffled"] == pytest.approx(
            sum(step["bytes"] for step in costs["steps"]) / work.counts[name]
        )


def test_the_codec_comparison_measures_files_written_in_each_codec(tmp_path):
    """``make bench`` compares codecs by the bytes of what each run published: each run's files must be
    in its codec, or the comparison compares nothing."""
    work = workload.build(tmp_path / "workload", 1000)
    for codec in ("deflate", "zstandard"):
        runs.run_pipeline(work, tmp_path / codec, workers=1, codec=codec)
        written = sorted((tmp_path / codec).glob("*/*/dt=*/hr=*/*.avro"))
        assert written and {fastavro.reader(path.open("rb")).codec for path in written} == {codec}
        assert runs.published_bytes(tmp_path / codec) == sum(path.stat().st_size for path in written)
        assert runs.compression_seconds(tmp_path / codec, codec) > 0
