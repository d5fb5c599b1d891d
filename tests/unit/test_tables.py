"""make tables: each type's BigQuery external table, checked offline against the client's own types."""

from __future__ import annotations

import json

import fastavro
import pytest
from google.api_core import exceptions
from google.cloud import bigquery

from event_delivery.contract.registry import load_registry
from tools.ops import tables

ROOT = "gs://event-bucket"
REGISTRY = load_registry()


def sent(event_type) -> bigquery.Table:
    """The type's table as the client sends it and the service hands it back: through its resource."""
    return bigquery.Table.from_api_repr(tables.table_for("proj", "events", ROOT, event_type).to_api_repr())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_types_table_reads_its_delivered_hours_by_partition(name):
    table = sent(REGISTRY[name])
    external = table.external_data_configuration
    assert isinstance(external, bigquery.ExternalConfig) and external.source_format == "AVRO"
    assert table.reference == bigquery.TableReference.from_string(f"proj.events.{name}")
    assert external.source_uris == [f"{ROOT}/delivered/{name}/*.avro"], "the parts, never a _SUCCESS"
    hive = external.hive_partitioning
    assert isinstance(hive, bigquery.HivePartitioningOptions)
    assert (hive.mode, hive.require_partition_filter) == ("CUSTOM", True)
    assert hive.source_uri_prefix == f"{ROOT}/delivered/{name}/{{dt:DATE}}/{{hr:STRING}}"
    assert external.reference_file_schema_uri == f"{ROOT}/delivered/_schemas/{name}.avro"
    assert not external.reference_file_schema_uri.startswith(external.source_uris[0][: -len("*.avro")])
    assert external.avro_options.use_avro_logical_types is True
    assert table.labels == {"event_type": name, "tier": REGISTRY[name].tier.name}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_types_columns_are_its_delivered_schema_with_personal_fields_as_bytes(name):
    event_type = REGISTRY[name]
    columns = {field.name: field for field in tables.columns(event_type)}
    assert list(columns) == [f["name"] for f in event_type.delivered_schema["fields"]]
    assert all(isinstance(field, bigquery.SchemaField) for field in columns.values())
    assert (columns["event_id"].field_type, columns["event_id"].mode) == ("STRING", "REQUIRED")
    assert columns["received_at"].field_type == "TIMESTAMP"
    for personal in event_type.personal_fields:
        assert (columns[personal].field_type, columns[personal].mode) == ("BYTES", "NULLABLE")
    if event_type.subject_field:
        assert (columns["key_id"].field_type, columns["key_id"].mode) == ("STRING", "NULLABLE"), "in clear"
    else:
        assert "key_id" not in columns
    clear = set(columns) - set(event_type.personal_fields) - {"key_id", "received_at"}
    assert all(columns[c].field_type != "BYTES" for c in clear), "no clear field is read as ciphertext"


def test_avro_types_map_to_the_columns_bigquery_reads_them_as():
    record = {"type": "record", "name": "R", "fields": [{"name": "x", "type": "double"}]}
    assert tables._field("a", {"type": "array", "items": "string"}).mode == "REPEATED"
    [key, value] = tables._field("m", {"type": "map", "values": ["null", "long"]}).fields
    assert (key.field_type, value.field_type, value.mode) == ("STRING", "INTEGER", "NULLABLE")
    assert [f.field_type for f in tables._field("r", record).fields] == ["FLOAT"]
    assert tables._field("e", {"type": "enum", "name": "E", "symbols": ["A"]}).field_type == "STRING"
    with pytest.raises(ValueError, match="a union only of null and one type"):
        tables._field("u", ["null", "string", "long"])


def test_the_reference_file_holds_the_delivered_schema_and_no_record(tmp_path):
    play = REGISTRY["play"]
    tables.write_reference_file(str(tmp_path), play)
    with open(tables.reference_file(str(tmp_path), play), "rb") as handle:
        reader = fastavro.reader(handle)
        assert list(reader) == []
        assert [f["name"] for f in reader.writer_schema["fields"]] == [c.name for c in tables.columns(play)]


class FakeClient:
    """The calls ``apply`` makes, answered as the service would, from the tables it holds."""

    def __init__(self):
        self.held, self.calls = {}, []

    def get_table(self, reference):
        if str(reference) not in self.held:
            raise exceptions.NotFound("no table")
        return bigquery.Table.from_api_repr(self.held[str(reference)])

    def create_table(self, table):
        self.calls.append(("create", None))
        served = table.to_api_repr()
        served["externalDataConfiguration"]["hivePartitioningOptions"]["fields"] = ["dt", "hr"]  # the service adds
        self.held[str(table.reference)] = served

    def update_table(self, table, fields):
        self.calls.append(("update", fields))
        self.held[str(table.reference)] = table.to_api_repr()


def test_tables_are_created_then_left_unchanged_then_updated_to_the_definition():
    client, search = FakeClient(), REGISTRY["search"]
    table = tables.table_for("proj", "events", ROOT, search)
    assert tables.apply(client, table) == "created"
    assert tables.apply(client, tables.table_for("proj", "events", ROOT, search)) == "unchanged"
    moved = tables.table_for("proj", "events", "gs://another-bucket", search)
    assert tables.apply(client, moved) == "updated"
    assert client.calls == [("create", None), ("update", ["external_data_configuration", "description", "labels"])]
    held = client.get_table(table.reference).external_data_configuration
    assert held.source_uris == ["gs://another-bucket/delivered/search/*.avro"]


def test_drifted_columns_name_those_bigquery_reads_otherwise():
    expected = tables.columns(REGISTRY["search"])
    found = [bigquery.SchemaField("dt", "DATE"), *expected[:-1], bigquery.SchemaField("clicked_position", "STRING")]
    assert tables.drifted_columns(expected, found) == ["clicked_position"]
    described = [bigquery.SchemaField(f.name, f.field_type, f.mode, description="another") for f in expected]
    assert tables.drifted_columns(expected, described) == []


def test_a_dry_run_prints_every_types_definition_and_calls_nothing(capsys, monkeypatch):
    monkeypatch.setattr(bigquery, "Client", lambda *a, **k: pytest.fail("a dry run made a client"))
    assert tables.main(["--project", "proj", "--bucket", "event-bucket", "--dry_run"]) == 0
    printed = json.loads("[" + capsys.readouterr().out.replace("}\n{", "},\n{") + "]")
    assert [d["table"]["tableReference"]["tableId"] for d in printed] == sorted(REGISTRY)
    assert all(
        d["table"]["externalDataConfiguration"]["hivePartitioningOptions"]["requirePartitionFilter"] for d in printed
    )


def test_a_bad_flag_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        tables.main(["--bucket", "b"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m tools.ops.tables: error: the following arguments are required: --project"
    )
