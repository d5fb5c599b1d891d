"""Forget data subjects: delete their keys (crypto-shredding) and leave tombstones.

Afterwards nothing any subject's delivered values were encrypted with exists any
more, and the delivery jobs deliver their later events with personal fields null
(once the key caches expire: ``--key_cache_ttl_seconds``). Subject ids are read from
the command line or, one per line, from a file; a file runs as a batch job::

    python -m event_delivery.forget --subject user-000123
    python -m event_delivery.forget --subjects_file requests.txt --keystore ... --kms_key ...

It prints counts only: subject ids are personal data and stay out of logs.
"""

from __future__ import annotations

import argparse
import sys

import apache_beam as beam

from event_delivery.keystore import KeyConfig, add_key_arguments, key_config_from_args


class ForgetSubjectsFn(beam.DoFn):
    def __init__(self, keys: KeyConfig):
        self.keys = keys

    def setup(self):
        self.keystore = self.keys.open()
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


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(prog="python -m event_delivery.forget", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--subject", action="append", help="A subject id to forget (repeatable).")
    which.add_argument("--subjects_file", help="A file of subject ids, one per line (runs as a Beam batch job).")
    add_key_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    keys = key_config_from_args(args)
    if args.subjects_file:
        deleted, tombstoned = forget_file(args.subjects_file, keys, beam_args)
    else:
        keystore = keys.open()
        outcomes = [keystore.forget(subject) for subject in args.subject]
        deleted, tombstoned = sum(outcomes), len(outcomes) - sum(outcomes)
    print(f"forgotten: {deleted} key(s) deleted, {tombstoned} subject(s) had no key and are tombstoned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
