"""make tables: per event type, a BigQuery external table over its delivered hours.

Each type's table reads ``gs://<bucket>/delivered/<type>/dt=YYYY-MM-DD/hr=HH/*.avro`` in
place, with ``dt`` (DATE) and ``hr`` (STRING, as the folder spells it: ``'08'``) as Hive
partition columns, and refuses a query without a partition filter: a query reads the hours it
names, never the whole history. Nothing is copied and nothing is loaded: a closed hour is
queryable as soon as its files are there, and complete once its ``_SUCCESS`` is (docs/tables.md).

The columns are the type's delivered schema, from the registry: the envelope, ``key_id`` in
clear, and each personal field as BYTES (AES-GCM ciphertext; ``make decrypt`` gives clear
values to whom may read them). BigQuery takes an Avro table's columns from the files, never
from the table definition; so each table names a *reference file* (an Avro file without
records, written beside the hours in ``delivered/_schemas/``) whose schema is the registry's
newest, and older files, whose schemas it resolves, are read through it. ``columns`` gives
the same columns as BigQuery ``SchemaField``s, which a dry run prints and a real run checks
the created table against.

    python -m tools.ops.tables --project my-project --bucket my-bucket [--dataset event_delivery] [--dry_run]

Creating a table that exists updates it to this definition; one that already has it is left
as it is, and said so.
"""

from __future__ import annotations

import argparse
import json
import sys

from google.api_core import exceptions
from google.cloud import bigquery

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import EventType, load_registry

DATASET = "event_delivery"
SCHEMAS = "_schemas"  # beside the types' folders under delivered/; ``_`` hides it from Hive and Spark, as staging
PARTITION_KEYS = "{dt:DATE}/{hr:STRING}"  # typed by the source URI prefix (CUSTOM mode)
# What this module defines of a table, by the client's property and the resource's key.
DEFINED = {"external_data_configuration": "externalDataConfiguration", "description": "description", "labels": "labels"}

# Avro's types as BigQuery reads them (with logical types on); a union with null is NULLABLE.
_PRIMITIVES = {
    "boolean": "BOOLEAN",
    "int": "INTEGER",
    "long": "INTEGER",
    "float": "FLOAT",
    "double": "FLOAT",
    "bytes": "BYTES",
    "fixed": "BYTES",
    "string": "STRING",
    "enum": "STRING",
}
_LOGICAL = {"timestamp-millis": "TIMESTAMP", "timestamp-micros": "TIMESTAMP", "date": "DATE", "uuid": "STRING"}


def _field(name: str, avro_type, doc: str | None = None, mode: str = "REQUIRED") -> bigquery.SchemaField:
    if isinstance(avro_type, list):
        others = [t for t in avro_type if t != "null"]
        if len(others) != 1:
            raise ValueError(f"{name}: BigQuery reads a union only of null and one type, not {avro_type}")
        return _field(name, others[0], doc, "NULLABLE" if "null" in avro_type else mode)
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if avro_type.get("logicalType") in _LOGICAL:
            return bigquery.SchemaField(name, _LOGICAL[avro_type["logicalType"]], mode, description=doc)
        if kind == "record":
            nested = [_field(f["name"], f["type"], f.get("doc")) for f in avro_type["fields"]]
            return bigquery.SchemaField(name, "RECORD", mode, description=doc, fields=nested)
        if kind == "array":
            return _field(name, avro_type["items"], doc, "REPEATED")
        if kind == "map":
            entry = [bigquery.SchemaField("key", "STRING", "REQUIRED"), _field("value", avro_type["values"])]
            return bigquery.SchemaField(name, "RECORD", "REPEATED", description=doc, fields=entry)
        avro_type = kind
    if avro_type not in _PRIMITIVES:
        raise ValueError(f"{name}: no BigQuery column for the Avro type {avro_type!r}")
    return bigquery.SchemaField(name, _PRIMITIVES[avro_type], mode, description=doc)


def columns(event_type: EventType) -> list[bigquery.SchemaField]:
    """The table's columns from the type's delivered schema, as BigQuery reads its files."""
    return [_field(f["name"], f["type"], f.get("doc")) for f in event_type.delivered_schema["fields"]]


def hours_of(storage_root: str, event_type: EventType) -> str:
    """The type's delivered folder: the hours' common prefix, where the Hive partition keys begin."""
    delivered = Layout.under(storage_root, event_type.name, partitions.HOUR_SECONDS).delivered
    return partitions.join(delivered, event_type.name)


def reference_file(storage_root: str, event_type: EventType) -> str:
    delivered = Layout.under(storage_root, event_type.name, partitions.HOUR_SECONDS).delivered
    return partitions.join(delivered, SCHEMAS, f"{event_type.name}.avro")


def table_for(project: str, dataset: str, storage_root: str, event_type: EventType) -> bigquery.Table:
    """The type's external table over ``storage_root`` (``gs://<bucket>``), as the client will send it."""
    external = bigquery.ExternalConfig(bigquery.ExternalSourceFormat.AVRO)
    folder = hours_of(storage_root, event_type)
    external.source_uris = [f"{folder}/*.avro"]  # the parts, not the _SUCCESS manifests beside them
    external.reference_file_schema_uri = reference_file(storage_root, event_type)
    external.avro_options = bigquery.external_config.AvroOptions()
    external.avro_options.use_avro_logical_types = True  # received_at as TIMESTAMP, not INTEGER millis
    hive = bigquery.HivePartitioningOptions()
    hive.mode = "CUSTOM"
    hive.source_uri_prefix = f"{folder}/{PARTITION_KEYS}"
    hive.require_partition_filter = True
    external.hive_partitioning = hive
    table = bigquery.Table(f"{project}.{dataset}.{event_type.name}")
    table.external_data_configuration = external
    table.description = (
        f"{event_type.name} events delivered by the hour ({event_type.tier.name} tier). An hour is complete once "
        f"{folder}/dt=.../hr=.../_SUCCESS exists. Personal fields are AES-GCM ciphertext."
    )
    table.labels = {"event_type": event_type.name, "tier": event_type.tier.name}
    return table


def write_reference_file(storage_root: str, event_type: EventType) -> None:
    """The Avro file, without records, whose schema the table reads every hour's files through."""
    files.write_avro(reference_file(storage_root, event_type), event_type.parsed_delivered_schema, [])


def _differs(wanted, found) -> bool:
    """Whether ``found`` (a resource the service returned) lacks anything of ``wanted`` (one it was sent)."""
    if isinstance(wanted, dict):
        return not isinstance(found, dict) or any(_differs(v, found.get(k)) for k, v in wanted.items())
    return wanted != found


def apply(client, table: bigquery.Table) -> str:
    """Creates the table, or updates it to ``table``'s definition; returns ``created``, ``updated`` or
    ``unchanged``. Only what this module defines is compared and sent: columns come from the files."""
    try:
        existing = client.get_table(table.reference)
    except exceptions.NotFound:
        client.create_table(table)
        return "created"
    wanted, found = table.to_api_repr(), existing.to_api_repr()
    if not any(_differs(wanted.get(key), found.get(key)) for key in DEFINED.values()):
        return "unchanged"
    for name in DEFINED:
        setattr(existing, name, getattr(table, name))
    client.update_table(existing, list(DEFINED))
    return "updated"


def _shape(field: bigquery.SchemaField) -> tuple:
    return field.name, field.field_type, field.mode, tuple(map(_shape, field.fields))


def drifted_columns(expected: list[bigquery.SchemaField], found: list[bigquery.SchemaField]) -> list[str]:
    """The names of the registry's columns that the table BigQuery made does not read as expected (by
    type, mode and nested columns); the partition columns, which BigQuery adds, are not among them."""
    found_by_name = {field.name: _shape(field) for field in found}
    return [field.name for field in expected if found_by_name.get(field.name) != _shape(field)]


def definition(table: bigquery.Table, event_type: EventType) -> dict:
    """What a dry run prints for a type: the table's resource and the columns its files give it."""
    return {"table": table.to_api_repr(), "columns": [field.to_api_repr() for field in columns(event_type)]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.ops.tables", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True, help="The BigQuery project of the dataset.")
    parser.add_argument("--bucket", required=True, help="The bucket the jobs deliver to, without gs://.")
    parser.add_argument("--dataset", default=DATASET, help=f"The dataset of the tables. Default: {DATASET}.")
    parser.add_argument(
        "--location", default="EU", help="The dataset's location, where the bucket is (BigQuery reads only there)."
    )
    parser.add_argument(
        "--event_type", action="append", choices=sorted(load_registry()), help="Only this type (repeatable)."
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="Print each table's definition and columns as JSON; no network call."
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    registry = load_registry()
    types = [registry[name] for name in args.event_type or sorted(registry)]
    root = f"gs://{args.bucket}"
    tables = [(event_type, table_for(args.project, args.dataset, root, event_type)) for event_type in types]
    if args.dry_run:
        for event_type, table in tables:
            print(json.dumps(definition(table, event_type), indent=2, sort_keys=True))
        return 0
    client = bigquery.Client(project=args.project, location=args.location)
    dataset = bigquery.Dataset(f"{args.project}.{args.dataset}")
    dataset.location = args.location
    client.create_dataset(dataset, exists_ok=True)
    for event_type, table in tables:
        write_reference_file(root, event_type)
        done = apply(client, table)
        drifted = drifted_columns(columns(event_type), client.get_table(table.reference).schema)
        note = f"; columns not as the registry's: {', '.join(drifted)}" if drifted else ""
        print(f"{event_type.name}: {args.project}.{args.dataset}.{table.table_id} {done}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
