"""The decrypt job: a decrypted copy of delivered partitions, for authorized readers.

It reads one type's hour partitions in a range, decrypts every personal field with
the subject's data key (unwrapped with the key-encryption key), and writes the same
files under ``--output_root`` with the registry's clear schema. A forgotten subject's
fields come out null. Run it where the output is allowed to hold personal data::

    python -m pipelines.decrypt --event_type search --input_root gs://bucket/delivered \\
        --output_root gs://restricted-bucket/decrypted --start 2026-11-29T00 --end 2026-11-30T00 \\
        --keystore bigtable://my-project/event-delivery/subject-keys --kms_key projects/.../cryptoKeys/...
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
from pipelines.runtime import add_hour_range_arguments, partition_paths, pipeline_options, start_batch_job


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
        clear = []
        for record in records:
            aead = aeads.get(record.get("key_id"))
            decrypted, failures = decrypt_record(record, self.event_type, aead)
            clear.append(decrypted)
            self.forgotten.inc(aead is None)
            self.undecryptable.inc(failures)
        destination = self.output_root + path[len(self.input_root) :]
        files.write_avro(destination, self.event_type.parsed_clear_schema, clear)
        self.records.inc(len(clear))
        yield destination


def decrypt(pipeline, paths: list[str], event_type: EventType, keys: KeyConfig, input_root: str, output_root: str):
    return (
        pipeline
        | "ListFiles" >> beam.Create(paths)
        | "DecryptFiles" >> beam.ParDo(DecryptFileFn(event_type, keys, input_root, output_root))
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
    add_key_arguments(parser)
    args, beam_args, (start, end), keys = start_batch_job(parser, argv, _resolve, "input_root")
    event_type = get_event_type(args.event_type)
    paths = partition_paths(args.input_root, event_type.name, start, end)
    if not paths:
        print(f"no {event_type.name} files in {args.input_root} for {start:%Y-%m-%dT%H}..{end:%Y-%m-%dT%H}")
        return 0
    with preflight.exit_on_failure(parser.prog):
        keys.preflight()
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    decrypt(pipeline, paths, event_type, keys, args.input_root, args.output_root)
    result = pipeline.run()
    result.wait_until_finish()
    counts = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    print(
        f"decrypted {counts.get('records', 0)} record(s) in {len(paths)} file(s) of {event_type.name} into "
        f"{args.output_root}; {counts.get('forgotten_records', 0)} belong to forgotten subjects (or keys this "
        f"keystore does not hold) and came out null; {counts.get('undecryptable_fields', 0)} field(s) did not decrypt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
