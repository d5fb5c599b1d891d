"""Forget data subjects: delete their keys (crypto-shredding) and leave tombstones.

Afterwards nothing any subject's delivered values were encrypted with exists any
more, and the delivery jobs deliver their later events with personal fields null
(once the key caches expire: ``--key_cache_ttl_seconds``). Subject ids are read from
standard input or, one per line, from a file, which runs as a batch job; on the
command line they would stay in the shell's history::

    printf 'user-000123\n' | python -m pipelines.forget --subjects_file -
    python -m pipelines.forget --subjects_file requests.txt --keystore ... --kms_key ...

It prints counts only: subject ids are personal data and stay out of logs.

It never creates a key-encryption key or a keystore: a forget that points at the
wrong place stops with exit code 2 instead of tombstoning subjects in a new, empty
keystore. A keystore that holds no key at all is refused too, unless
``--allow_empty_keystore`` says that is expected.
"""

from __future__ import annotations

import argparse
import os
import sys

import apache_beam as beam

from event_delivery.cloud import clients, preflight
from event_delivery.keys.config import KeyConfig, add_key_arguments, key_config_from_args
from event_delivery.keys.kek import KeysNotFound
from event_delivery.keys.keystore import Keystore


class ForgetSubjectsFn(beam.DoFn):
    def __init__(self, keys: KeyConfig):
        self.keys = keys

    def setup(self):
        self.keystore = self.keys.open(create=False)
        self.deleted = beam.metrics.Metrics.counter("forget", "keys_deleted")
        self.tombstoned = beam.metrics.Metrics.counter("forget", "tombstones_without_key")

    def process(self, subjects):
        for subject in subjects:
            had_key = self.keystore.forget(subject)
            self.deleted.inc(had_key)
            self.tombstoned.inc(not had_key)
            yield had_key


def forget_file(path: str, keys: KeyConfig, beam_args: list[str]) -> tuple[int, int]:
    """Runs the batch job over a file of subject ids; returns (keys deleted, tombstones only)."""
    from pipelines.runtime import pipeline_options

    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    (
        pipeline
        | "ReadSubjects" >> beam.io.ReadFromText(path)
        | "Strip" >> beam.Map(str.strip)
        | "SkipBlank" >> beam.Filter(bool)
        | "Batch" >> beam.BatchElements(min_batch_size=100, max_batch_size=1000)
        | "Forget" >> beam.ParDo(ForgetSubjectsFn(keys))
    )
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    return counters.get("keys_deleted", 0), counters.get("tombstones_without_key", 0)


def open_existing_keystore(keys: KeyConfig, allow_empty: bool) -> Keystore:
    """The keystore the flags name, which must exist and, unless ``allow_empty``, hold keys."""
    if keys.keystore.startswith("bigtable://"):
        preflight.check_credentials(clients.BIGTABLE_EMULATOR_HOST, "Bigtable")
    if keys.kms_key:
        preflight.check_credentials(None, "Cloud KMS")
    try:
        keystore = keys.open(create=False)
        empty = not keystore.holds_keys()
    except KeysNotFound as error:
        raise preflight.PreflightError(f"{error}; check --keystore and --local_key_file (or --kms_key)") from None
    if empty and not allow_empty:
        raise preflight.PreflightError(
            f"the keystore {keys.keystore} holds no keys, so nothing can be forgotten in it; check --keystore, "
            "or pass --allow_empty_keystore to tombstone the subjects anyway"
        )
    return keystore


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.forget", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--subject", action="append", help="A subject id to forget (repeatable; prefer --subjects_file -)."
    )
    which.add_argument(
        "--subjects_file",
        help="A file of subject ids, one per line (runs as a Beam batch job), or - to read them from standard input.",
    )
    parser.add_argument(
        "--allow_empty_keystore",
        action="store_true",
        help="Tombstone the subjects even in a keystore that holds no keys yet (normally a wrong --keystore).",
    )
    add_key_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    try:
        keys = key_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.subjects_file and args.subjects_file != "-" and not os.path.isfile(args.subjects_file):
        parser.error(f"there is no file {args.subjects_file}")
    with preflight.exit_on_failure(parser.prog):
        keystore = open_existing_keystore(keys, args.allow_empty_keystore)
    if args.subjects_file and args.subjects_file != "-":
        deleted, tombstoned = forget_file(args.subjects_file, keys, beam_args)
    else:
        subjects = args.subject or [line.strip() for line in sys.stdin if line.strip()]
        outcomes = [keystore.forget(subject) for subject in subjects]
        deleted, tombstoned = sum(outcomes), len(outcomes) - sum(outcomes)
    print(f"forgotten: {deleted} key(s) deleted, {tombstoned} subject(s) had no key and are tombstoned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
