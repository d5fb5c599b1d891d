"""The decrypt job: a decrypted copy of delivered partitions, for authorized readers.

It reads one type's hour partitions in a range, decrypts every personal field with
the subject's data key (unwrapped with the key-encryption key), and writes the same
files under ``--output_root`` with the registry's clear schema. A forgotten subject's
fields come out null. Run it where the output is allowed to hold personal data::

    python -m pipelines.decrypt --event_type search --input_root gs://bucket/delivered \\
        --output_root gs://restricted-bucket/decrypted --start 2026-11-29T00 --end 2026-11-30T00 \\
        --copies_inventory gs://restricted-bucket/decrypted-copies \\
        --keystore bigtable://my-project/event-delivery/subject-keys --kms_key projects/.../cryptoKeys/...

Crypto-shredding cannot reach a clear copy, so every run records, when it has written
them all, each file it wrote and the key ids of the records it holds in clear: one
record per run in ``--copies_inventory``. ``pipelines.forget`` reads the inventory to
list, or purge, the copies that hold a subject it forgets. Key ids are random and
already in clear in every delivered record; the inventory names no subject.
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import sys
from typing import NamedTuple

import apache_beam as beam
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from event_delivery.cloud import files, preflight
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract.partitions import join
from event_delivery.contract.registry import EventType, get_event_type, load_registry
from event_delivery.keys.config import KeyConfig, add_key_arguments, key_config_from_args
from event_delivery.keys.fields import UndecryptableField, decrypt_value
from pipelines.runtime import add_hour_range_arguments, partition_paths, pipeline_options, start_batch_job

DEFAULT_COPIES_INVENTORY = ".keys/decrypted-copies"


class DecryptedCopy(NamedTuple):
    """A file the decrypt job wrote, and the key ids of the records in it that came out in clear."""

    path: str
    key_ids: list[str]


def decrypt_record(record: dict, event_type: EventType, aead: AESGCM | None) -> tuple[dict, int]:
    """The record in clear, and how many of its fields could not be decrypted."""
    key_id = record.get("key_id")
    clear = {name: value for name, value in record.items() if name != "key_id"}
    failures = 0
    for field in event_type.personal_fields:
        ciphertext = record.get(field)
        clear[field] = None
        if aead is None or ciphertext is None:
            continue
        try:
            clear[field] = decrypt_value(aead, ciphertext, event_type.name, field, key_id, record["event_id"])
        except UndecryptableField:
            failures += 1
    return clear, failures


class DecryptFileFn(beam.DoFn):
    def __init__(self, event_type: EventType, keys: KeyConfig, input_root: str, output_root: str):
        self.event_type = event_type
        self.keys = keys
        self.input_root = input_root.rstrip("/")
        self.output_root = output_root.rstrip("/")

    def setup(self):
        use_emulator_credentials()
        self.keystore = self.keys.open()
        self.records = beam.metrics.Metrics.counter("decrypt", "records")
        self.forgotten = beam.metrics.Metrics.counter("decrypt", "forgotten_records")
        self.undecryptable = beam.metrics.Metrics.counter("decrypt", "undecryptable_fields")

    def process(self, path: str):
        records = files.read_avro(path)
        keys = self.keystore.data_keys(r["key_id"] for r in records if r.get("key_id"))  # one batch per file
        aeads = {key_id: AESGCM(key) for key_id, key in keys.items() if key}
        clear, in_clear = [], set()
        for record in records:
            aead = aeads.get(record.get("key_id"))
            decrypted, failures = decrypt_record(record, self.event_type, aead)
            clear.append(decrypted)
            if aead is not None:
                in_clear.add(record["key_id"])
            self.forgotten.inc(aead is None)
            self.undecryptable.inc(failures)
        destination = self.output_root + path[len(self.input_root) :]
        files.write_avro(destination, self.event_type.parsed_clear_schema, clear)
        self.records.inc(len(clear))
        yield DecryptedCopy(destination, sorted(in_clear))


def decrypt(pipeline, paths: list[str], event_type: EventType, keys: KeyConfig, input_root: str, output_root: str):
    """Decrypts the files of ``paths``; returns a ``DecryptedCopy`` for each file written."""
    return (
        pipeline
        | "ListFiles" >> beam.Create(paths)
        | "DecryptFiles" >> beam.ParDo(DecryptFileFn(event_type, keys, input_root, output_root))
    )


# The inventory of decrypted copies: one JSON Lines record per decrypt run, a line per file
# written ({"path": ..., "key_ids": [...]}), and one per purge by forget ({"path": ..., "deleted": ...}).
def new_record_path(inventory: str, kind: str) -> str:
    """A new record in the inventory, named by its UTC time and a random suffix: records never overwrite
    each other, and sort by time."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return join(inventory, f"{kind}-{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}.jsonl")


def write_copies_record(copies: list[DecryptedCopy], record_path: str) -> None:
    files.write_json_lines(record_path, ({"path": c.path, "key_ids": c.key_ids} for c in sorted(copies)))


class RecordCopies(beam.PTransform):
    """Records every ``DecryptedCopy`` of the run in one file, written once all of them are."""

    def __init__(self, record_path: str):
        super().__init__()
        self.record_path = record_path

    def expand(self, copies):
        return (
            copies
            | "AllCopies" >> beam.combiners.ToList()
            | "WriteRecord" >> beam.Map(write_copies_record, self.record_path)
        )


def copies_records(inventory: str) -> list[str]:
    """The records of every decrypt run in the inventory, oldest first."""
    return files.glob(join(inventory, "decrypt-*.jsonl"))


def copies_holding(inventory: str, key_ids) -> list[str]:
    """The recorded decrypted files that hold a record of any of ``key_ids`` in clear (still there or not)."""
    wanted = set(key_ids)
    if not wanted:
        return []
    return sorted(
        {
            line["path"]
            for record in copies_records(inventory)
            for line in files.read_json_lines(record)
            if wanted.intersection(line["key_ids"])
        }
    )


def record_purge(inventory: str, purged: list[str], deleted: list[str]) -> str:
    """Records that forget purged the files of ``purged`` (of which it deleted ``deleted``, the rest were
    already gone); returns the record's path."""
    record_path, deleted = new_record_path(inventory, "purge"), set(deleted)
    files.write_json_lines(record_path, ({"path": path, "deleted": path in deleted} for path in purged))
    return record_path


def add_copies_inventory_argument(parser) -> None:
    """``--copies_inventory``, the one place decrypt and forget both know."""
    parser.add_argument(
        "--copies_inventory",
        default=DEFAULT_COPIES_INVENTORY,
        help="A folder (local or gs://) where decrypt records each decrypted file it writes, with the key ids "
        "of the records it holds in clear, and where forget looks for a subject's copies. Give decrypt and "
        "forget the same one: in production a restricted gs:// folder. Default: "
        f"{DEFAULT_COPIES_INVENTORY}, beside the local keystore.",
    )


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (local paths compared as real paths)."""
    if "://" not in path and "://" not in root:
        path, root = os.path.realpath(path), os.path.realpath(root)
    path, root = path.rstrip("/") + "/", root.rstrip("/") + "/"
    return path.startswith(root)


def _resolve(args) -> KeyConfig:
    if _inside(args.output_root, args.input_root):
        raise ValueError(
            "--output_root must not be --input_root or inside it: a clear copy never sits among sealed data"
        )
    return key_config_from_args(args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m pipelines.decrypt", description=__doc__.split("\n")[0])
    parser.add_argument("--event_type", required=True, choices=sorted(load_registry()))
    parser.add_argument("--input_root", required=True, help="A delivered (or late) root, e.g. gs://bucket/delivered.")
    parser.add_argument("--output_root", required=True, help="Where the decrypted copy goes, same layout.")
    add_hour_range_arguments(parser, "delivered data")
    add_copies_inventory_argument(parser)
    add_key_arguments(parser)
    args, beam_args, (start, end), keys = start_batch_job(parser, argv, _resolve, "input_root")
    event_type = get_event_type(args.event_type)
    paths = partition_paths(args.input_root, event_type.name, start, end)
    if not paths:
        print(f"no {event_type.name} files in {args.input_root} for {start:%Y-%m-%dT%H}..{end:%Y-%m-%dT%H}")
        return 0
    with preflight.exit_on_failure(parser.prog):
        keys.preflight()
        preflight.check_root(args.copies_inventory)  # before any clear copy exists that it could not record
    record_path = new_record_path(args.copies_inventory, "decrypt")
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    copies = decrypt(pipeline, paths, event_type, keys, args.input_root, args.output_root)
    copies | "RecordCopies" >> RecordCopies(record_path)
    result = pipeline.run()
    result.wait_until_finish()
    counts = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    print(
        f"decrypted {counts.get('records', 0)} record(s) in {len(paths)} file(s) of {event_type.name} into "
        f"{args.output_root}; {counts.get('forgotten_records', 0)} belong to forgotten subjects (or keys this "
        f"keystore does not hold) and came out null; {counts.get('undecryptable_fields', 0)} field(s) did not decrypt"
    )
    print(f"recorded the decrypted files, and the key ids in them, for forget in {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
