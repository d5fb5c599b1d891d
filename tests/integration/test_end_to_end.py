"""Every type delivered at once on the real emulators: Pub/Sub in, Avro and markers on GCS out.

One delivery job per type runs as its own process on the DirectRunner, exactly as
``make demo`` runs them, fed by the load generator with duplicates, malformed and
late messages. Then every message must be found in exactly one place.
"""

from __future__ import annotations

import collections
import datetime
import io
import re

import apache_beam as beam
import avro.datafile
import avro.io
import fastavro
import pytest
from apache_beam.io.filesystems import FileSystems

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.dead_letters import ErrorKind
from event_delivery.keys.config import KeyConfig
from pipelines.decrypt import decrypt
from pipelines.runtime import LOCAL_RUNNER, partition_paths
from tests.by_id import assert_every_id_in_one_place, ledger_ids
from tests.emulated import drop_subscriptions_of
from tools.local.demo import Scenario, run_scenario
from tools.local.loadgen import TrafficMix

pytestmark = [pytest.mark.emulators, pytest.mark.slow]


@pytest.fixture(scope="module")
def outcomes(emulators, registry, tmp_path_factory):
    scenario = Scenario(
        types=sorted(registry),
        bucket="event-delivery-e2e",
        publish_seconds=25,
        rate=8,
        mix=TrafficMix(duplicates=0.1, malformed=0.05, late=0.05, late_by_seconds=20, producer_attributes=0.2),
        raw_archive=True,
    )
    drop_subscriptions_of(scenario.project, registry.values())  # only this test's traffic, from the start
    state_dir = tmp_path_factory.mktemp("e2e")
    scenario.state_dir = state_dir
    return scenario, run_scenario(scenario, state_dir, say=print)


def test_every_message_ends_up_in_exactly_one_place(outcomes):
    _, by_type = outcomes
    for name, outcome in by_type.items():
        audit = outcome.audit
        assert not audit.problems, name
        assert audit.settled, f"{name}: an hour with data did not close"
        accounted = sum(audit.total(kind) for kind in ("delivered", "duplicates", "late", "dead_lettered"))
        assert accounted == outcome.ledger.published, name


def test_every_published_id_is_found_in_one_place_in_the_files(outcomes):
    """Ids, not totals: a unique event dropped and counted as a duplicate balances every total,
    and the duplicates come from the jobs' own manifests. So the files are read, and every id
    the load generator published must be in them: delivered or late, or dead-lettered if it
    was sent broken.

    A repeat that arrives after its hour closed is dropped against the hour's index, so each
    id is written once, and every repeat sent is counted as a duplicate.
    """
    scenario, by_type = outcomes
    for name, outcome in by_type.items():
        found = assert_every_id_in_one_place(scenario.storage_root, name, *ledger_ids(outcome.ledger))
        assert found.dead_lettered[None] == outcome.ledger.dead_letter_kinds[ErrorKind.MISSING_ID.value], name
        assert outcome.audit.total("duplicates") == outcome.ledger.expected["duplicate"], name


def test_no_subject_id_is_in_clear_in_any_output_file_or_job_log(outcomes):
    """Generated subjects are ``user-NNNNNN`` and the subject field is personal: none may be readable
    in the records (read decompressed), the raw archive or the manifests on GCS, nor in any job's
    log; neither where a producer put one in an attribute of its own (a fifth of the messages)."""
    scenario, by_type = outcomes
    subject = re.compile(rb"user-\d{6}")
    for name in by_type:
        archived = files.glob(f"{scenario.storage_root}/raw/{name}/dt=*/hr=*/*.avro")
        assert archived, f"{name}: the jobs archive what they read"
        assert any(r["sealed_attributes"] for p in archived for r in files.read_avro(p)), name
        for root in ("delivered", "late", "dead-letter", "raw"):
            for path in files.glob(f"{scenario.storage_root}/{root}/{name}/dt=*/hr=*/*"):
                readable = [repr(r).encode() for r in files.read_avro(path)] if path.endswith(".avro") else []
                with FileSystems.open(path) as handle:
                    readable.append(handle.read())
                assert not any(subject.search(text) for text in readable), path
    logs = sorted((scenario.state_dir / "logs").glob("*.log"))
    assert len(logs) == len(by_type) + 1, "a log per delivery job, and the auditor's"
    for log in logs:
        assert not subject.search(log.read_bytes()), log


def test_in_equals_outcomes_for_every_type_and_hour(outcomes):
    scenario, by_type = outcomes
    window = scenario.window_seconds
    for name, outcome in by_type.items():
        sent = collections.Counter(
            partitions.partition(millis // 1000 - millis // 1000 % window, window)
            for millis in outcome.ledger.received_at_millis
            if millis is not None
        )
        found = collections.Counter(
            {p: h.total - h.dead_letter_kinds["bad_timestamp"] for p, h in outcome.audit.hours.items()}
        )
        assert +found == +sent, name
        bad_stamps = sum(h.dead_letter_kinds["bad_timestamp"] for h in outcome.audit.hours.values())
        assert bad_stamps == outcome.ledger.received_at_millis.count(None), name


def test_dead_letters_carry_the_right_kind(outcomes):
    _, by_type = outcomes
    for name, outcome in by_type.items():
        found = collections.Counter()
        for hour in outcome.audit.hours.values():
            found.update(hour.dead_letter_kinds)
        assert +found == +outcome.ledger.dead_letter_kinds, name


def test_delivered_files_are_avro_with_their_schema_and_unique_ids(outcomes, registry):
    scenario, by_type = outcomes
    for name in by_type:
        paths = files.glob(f"{scenario.storage_root}/delivered/{name}/dt=*/hr=*/*.avro")
        assert paths, name
        for path in paths:
            with FileSystems.open(path) as handle:
                reader = fastavro.reader(io.BytesIO(handle.read()))
            assert reader.metadata["avro.codec"] == files.AVRO_CODEC
            written = [f["name"] for f in reader.writer_schema["fields"]]
            assert written == [f["name"] for f in registry[name].delivered_schema["fields"]]
        for hour in by_type[name].audit.hours.values():
            assert len(hour.delivered_ids) == len(set(hour.delivered_ids))


def test_delivered_files_read_with_the_apache_avro_reference_reader(outcomes):
    """Apache Avro's own implementation, independent of fastavro, reads what was written."""
    scenario, by_type = outcomes
    for name in by_type:
        for path in files.glob(f"{scenario.storage_root}/delivered/{name}/dt=*/hr=*/*.avro"):
            with FileSystems.open(path) as handle:
                reader = avro.datafile.DataFileReader(io.BytesIO(handle.read()), avro.io.DatumReader())
            records = list(reader)
            assert records and all(record["event_id"] for record in records)
            assert len(records) == files.count_avro_records(path)


def test_markers_list_exactly_the_files_of_their_hour(outcomes):
    scenario, by_type = outcomes
    closed = 0
    for name in by_type:
        for marker in files.glob(f"{scenario.storage_root}/delivered/{name}/dt=*/hr=*/_SUCCESS"):
            manifest = files.read_json(marker)
            folder = marker.rsplit("/", 1)[0]
            present = {p for p in files.glob(f"{folder}/*.avro")}
            assert {f["path"] for f in manifest["files"]} == present
            assert manifest["accounting"]["delivered"] == sum(files.count_avro_records(p) for p in present)
            closed += 1
    assert closed >= len(by_type), "at least one closed hour per type"


def test_personal_fields_are_sealed_and_decrypt_on_gcs(outcomes, registry):
    scenario, _ = outcomes
    search = registry["search"]
    sealed = [
        r for p in files.glob(f"{scenario.storage_root}/delivered/search/dt=*/hr=*/*.avro") for r in files.read_avro(p)
    ]
    assert sealed and all(isinstance(r["query"], bytes) and r["key_id"] for r in sealed)
    dead = [
        r
        for p in files.glob(f"{scenario.storage_root}/dead-letter/search/dt=*/hr=*/*.avro")
        for r in files.read_avro(p)
    ]
    assert dead and all(r["quarantine_key_id"] for r in dead)

    keys = KeyConfig(f"sqlite:///{scenario.state_dir.resolve()}/keystore.db", f"{scenario.state_dir.resolve()}/kek.key")
    root = f"{scenario.storage_root}/delivered"
    paths = partition_paths(
        root,
        "search",
        datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc),
        datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc),
    )
    with beam.Pipeline(runner=LOCAL_RUNNER) as pipeline:
        decrypt(pipeline, paths, search, keys, root, f"{scenario.storage_root}/clear")
    clear = [
        r for p in files.glob(f"{scenario.storage_root}/clear/search/dt=*/hr=*/*.avro") for r in files.read_avro(p)
    ]
    assert len(clear) == len(sealed)
    assert all(r["user_id"].startswith("user-") and isinstance(r["query"], str) for r in clear)
