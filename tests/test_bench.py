"""The benchmark compares like with like: the floor and the pipeline deliver the same events."""

from __future__ import annotations

from benchmarks import floor, runs, workload
from event_delivery.cloud import files
from event_delivery.contract.partitions import Layout
from event_delivery.ops.audit import audit_type


def test_the_floor_and_the_backfill_pipeline_do_the_same_work(tmp_path):
    work = workload.build(tmp_path / "workload", 3000)
    assert sum(n for name, n in work.counts.items() if name in workload.MIX) == 3000

    assert floor.run_floor(work, tmp_path / "floor") == 3000
    runs.run_pipeline(work, tmp_path / "pipeline", workers=1)

    for name in workload.MIX:
        by_floor = [r["event_id"] for r in files.read_avro(str(tmp_path / "floor" / f"{name}.avro"))]
        dead_by_floor = files.count_avro_records(str(tmp_path / "floor" / f"{name}-dead-letters.avro"))
        root = tmp_path / "pipeline"
        audit = audit_type(Layout.under(root, name, 3600))
        assert not audit.problems
        [hour] = audit.hours.values()
        assert sorted(hour.delivered_ids) == sorted(by_floor), name
        assert len(by_floor) == len(set(by_floor)), f"{name}: the floor deduplicates too"
        assert hour.dead_lettered == dead_by_floor, name
        assert hour.total == work.counts[name], f"{name}: every archived message is accounted for"
