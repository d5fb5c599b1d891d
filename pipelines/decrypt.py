"""The decrypt job: a decrypted copy of delivered partitions, for authorized readers.

It reads one type's hour partitions in a range, decrypts every personal field with
the subject's data key (unwrapped with the key-encryption key), and writes the same
files under ``--output_root`` with the registry's clear schema. A forgotten subject's
fields come out null. Run it where the output is allowed to hold personal data::

    python -m pipelines.decrypt --event_type search --input_root gs://bucket/delivered \\
        --output_root gs://restricted-bucket/decrypted --start 2026-11-29T00 --end 2026-11-30T00 \\
        --copies_inventory gs://restricted-bucket/decrypted-copies \\
        --keystore bigtable://my-project/event-delivery/subject-keys --kms_key projects/.../cryptoKeys/...

Crypto-shredding cannot reach a clear copy, so every run records, in ``--copies_inventory``
(``pipelines.copies_inventory``), where it writes before it starts, and each file with the key
ids of the records it holds in clear before it writes that file: ``pipelines.forget`` reads the
inventory to list, or purge, the copies that hold a subject it forgets. The output root must
lie outside the input root and every root of the storage layout (``--storage_root``). Local
copies are private to their owner: folders 0700, files 0600.
"""

from __future__ import annotations

import argparse
import os
import sys

import apache_beam as beam
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from event_delivery.cloud import files, preflight
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract.registry import EventType, get_event_type, load_registry
from event_delivery.keys.config import KeyConfig, add_key_arguments, key_config_from_args
from event_delivery.keys.fields import UndecryptableField, decrypt_value
from pipelines.copies_inventory import (
    DecryptedCopy,
    add_copies_inventory_argument,
    finish_run,
    inventory_of,
    record_copy,
    refuse_output_root,
    start_run,
)
from pipelines.flags import add_hour_range_arguments
from pipelines.runtime import partition_paths, pipeline_options, start_batch_job


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
    def __init__(self, event_type: EventType, keys: KeyConfig, input_root: str, output_root: str, record: str | None):
        self.event_type = event_type
        self.keys = keys
        self.input_root = input_root.rstrip("/")
        self.output_root = output_root.rstrip("/")
        self.record = record

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
        copy = DecryptedCopy(self.output_root + path[len(self.input_root) :], sorted(in_clear))
        if self.record:
            record_copy(self.record, copy)  # before a byte is in clear: forget finds every file that exists
        prepare_private_file(copy.path, self.output_root)
        files.write_avro(copy.path, self.event_type.parsed_clear_schema, clear)
        self.records.inc(len(clear))
        yield copy


def decrypt(pipeline, paths, event_type: EventType, keys: KeyConfig, input_root: str, output_root: str, record=None):
    """Decrypts the files of ``paths``, each recorded in the run's ``record`` (``start_run``) before it is
    written; returns a ``DecryptedCopy`` for each file written. Only tests leave ``record`` out."""
    return (
        pipeline
        | "ListFiles" >> beam.Create(paths)
        | "DecryptFiles" >> beam.ParDo(DecryptFileFn(event_type, keys, input_root, output_root, record))
    )


def prepare_private_file(path: str, output_root: str) -> None:
    """Before a byte of a local copy is written: its folders are 0700 and its file 0600, whatever the
    umask. That holds for each folder decrypt makes, and for ``<type>/dt=.../hr=...`` even if they were
    there; an output root that exists is the operator's, left as it is. (gs:// objects have no mode:
    the bucket's IAM decides.)"""
    if "://" in path:
        return
    root = output_root.rstrip("/")
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    _private_folder(root, tighten=False)
    folder = root
    for part in os.path.relpath(os.path.dirname(path), root).split(os.sep):
        folder = os.path.join(folder, part)
        _private_folder(folder, tighten=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # files.write_avro truncates it, mode kept
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


def _private_folder(folder: str, tighten: bool) -> None:
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        if not tighten:
            return
    os.chmod(folder, 0o700)  # exactly: mkdir's mode is masked by the umask


def _resolve(args) -> tuple[KeyConfig, str]:
    args.storage_root = args.storage_root or folder_above(args.input_root)
    refuse_output_root(args.output_root, args.input_root, args.storage_root, args.event_type)
    return key_config_from_args(args), inventory_of(args)


def folder_above(root: str) -> str:
    """The folder that holds ``root`` (a bucket holds itself)."""
    if root.startswith("gs://"):
        return "gs://" + root[len("gs://") :].rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(root))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m pipelines.decrypt", description=__doc__.split("\n")[0])
    parser.add_argument("--event_type", required=True, choices=sorted(load_registry()))
    parser.add_argument("--input_root", required=True, help="A delivered (or late) root, e.g. gs://bucket/delivered.")
    parser.add_argument(
        "--storage_root",
        help="The storage root whose layout (delivered, late, dead-letter, raw, audit) the output must stay out "
        "of. Default: the folder above --input_root.",
    )
    parser.add_argument("--output_root", required=True, help="Where the decrypted copy goes, same layout.")
    add_hour_range_arguments(parser, "delivered data", required=True)
    add_copies_inventory_argument(parser)
    add_key_arguments(parser)
    args, beam_args, (start, end), (keys, inventory) = start_batch_job(parser, argv, _resolve, "input_root")
    event_type = get_event_type(args.event_type)
    paths = partition_paths(args.input_root, event_type.name, start, end)
    if not paths:
        print(f"no {event_type.name} files in {args.input_root} for {start:%Y-%m-%dT%H}..{end:%Y-%m-%dT%H}")
        return 0
    with preflight.exit_on_failure(parser.prog):
        keys.preflight()
        preflight.check_root(inventory)  # before any clear copy exists that it could not record
    # Recorded before anything is written: a run that fails, or runs while forget looks, is found too.
    record = start_run(inventory, event_type.name, args.input_root, args.storage_root, args.output_root)
    print(f"recording the decrypted files, and the key ids in them, for forget in {record}", flush=True)
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    decrypt(pipeline, paths, event_type, keys, args.input_root, args.output_root, record)
    result = pipeline.run()
    result.wait_until_finish()
    recorded = finish_run(record)
    counts = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    print(
        f"decrypted {counts.get('records', 0)} record(s) in {len(paths)} file(s) of {event_type.name} into "
        f"{args.output_root}; {counts.get('forgotten_records', 0)} belong to forgotten subjects (or keys this "
        f"keystore does not hold) and came out null; {counts.get('undecryptable_fields', 0)} field(s) did not decrypt"
    )
    print(f"recorded {recorded} decrypted file(s), and the key ids in them, for forget in {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
