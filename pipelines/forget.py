"""Forget data subjects: delete their keys (crypto-shredding) and leave tombstones.

Afterwards nothing any subject's delivered values were encrypted with exists any
more, and the delivery jobs deliver their later events with personal fields null
(once the key caches expire: ``--key_cache_ttl_seconds``). Subject ids are read from
standard input or, one per line, from a file, which runs as a batch job; on the
command line they would stay in the shell's history::

    printf 'user-000123\n' | python -m pipelines.forget --subjects_file -
    python -m pipelines.forget --subjects_file requests.txt --keystore ... --kms_key ...

It prints counts only: subject ids are personal data and stay out of logs.

Crypto-shredding cannot reach a decrypted copy (``pipelines.decrypt``), which holds
personal data in clear. Before it deletes the subjects' keys, forget looks their key ids
up in the inventory decrypt keeps (``--copies_inventory``) and prints the paths of the
recorded copies that hold any of them in clear (``--decrypted_copies list``, the default),
or deletes those files and records the purge there (``--decrypted_copies purge``). A file
mixes subjects, so a purge deletes the other subjects' copies in it too: a decrypted copy
can be made again.

It never creates a key-encryption key or a keystore: a forget that points at the
wrong place stops with exit code 2 instead of tombstoning subjects in a new, empty
keystore. A keystore that holds no key at all is refused too, unless
``--allow_empty_keystore`` says that is expected.

A forget that stops halfway (a crash, a busy SQLite log) has written the subject's
tombstone, so no job serves or makes a key of that subject from then on, and it left a
record of its work in the keystore: running it again for its subjects finishes it, and so
does the sweep below, which needs no subject id. Forget exits with 0 only once complete.

``--sweep_orphans`` (alone, or after the subjects) finishes the forgets that stopped, and
deletes the data keys that nothing points to any more (a worker that died between writing
a new key and claiming its subject leaves one). It also deletes the
quarantine keys (one per type and day) of the days past ``--quarantine_retention_days``:
what they sealed (dead letters and archived messages that name no subject) can then no
longer be read. Run it daily (``make sweep-keys``)::

    python -m pipelines.forget --sweep_orphans --keystore bigtable://... --kms_key ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import apache_beam as beam

from event_delivery.cloud import files, preflight
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract.dead_letters import QUARANTINE_KEYS, QUARANTINE_RETENTION_DAYS, expired_quarantine_keys
from event_delivery.keys.config import KeyConfig, add_key_arguments, key_config_from_args
from event_delivery.keys.keystore import ORPHAN_GRACE_SECONDS, Keystore
from pipelines.decrypt import add_copies_inventory_argument, copies_holding, copies_records, record_purge


class ForgetSubjectsFn(beam.DoFn):
    def __init__(self, keys: KeyConfig):
        self.keys = keys

    def setup(self):
        self.keystore = self.keys.open(create=False)
        self.deleted = beam.metrics.Metrics.counter("forget", "subjects_with_keys")
        self.tombstoned = beam.metrics.Metrics.counter("forget", "tombstones_without_key")

    def process(self, subjects):
        for subject in subjects:
            had_key = self.keystore.forget(subject)
            self.deleted.inc(had_key)
            self.tombstoned.inc(not had_key)
            yield had_key


def forget_file(path: str, keys: KeyConfig, beam_args: list[str]) -> tuple[int, int]:
    """Runs the batch job over a file of subject ids; returns (subjects whose keys were deleted,
    subjects only tombstoned)."""
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
    return counters.get("subjects_with_keys", 0), counters.get("tombstones_without_key", 0)


def subjects_in(path: str):
    """The subject ids of a file, one per line, as the batch job reads them."""
    with open(path, encoding="utf-8") as handle:
        yield from (line.strip() for line in handle if line.strip())


def handle_decrypted_copies(keystore: Keystore, subjects, inventory: str, action: str) -> None:
    """Lists (``action`` "list") or deletes ("purge") the recorded decrypted files that hold any of
    ``subjects`` in clear, and prints paths and counts only.

    It runs before the keys are deleted, since their key ids go with them; a forget interrupted
    after a purge finds the same files when run again, already gone, which is no error.
    """
    if not copies_records(inventory):
        print(f"decrypted copies: no decrypt run is recorded in {inventory}")
        return
    held = copies_holding(inventory, {key_id for subject in subjects for key_id in keystore.key_ids_of(subject)})
    (purge_copies if action == "purge" else list_copies)(inventory, held)


def purge_copies(inventory: str, held: list[str]) -> None:
    deleted = files.delete_existing(held)
    recorded = f"; the purge is recorded in {record_purge(inventory, held, deleted)}" if held else ""
    print(
        f"decrypted copies: {len(deleted)} file(s) that held these subjects in clear deleted, "
        f"{len(held) - len(deleted)} already gone{recorded}"
    )


def list_copies(inventory: str, held: list[str]) -> None:
    present = [path for path in held if files.exists(path)]
    gone = f" ({len(held) - len(present)} recorded one(s) already gone)" if len(present) < len(held) else ""
    if not present:
        print(f"decrypted copies: no file recorded in {inventory} holds these subjects in clear{gone}")
        return
    print(
        f"decrypted copies: {len(present)} file(s) hold these subjects in clear{gone}; delete them now, as "
        "forget cannot find them once the keys are gone (--decrypted_copies purge deletes them itself):"
    )
    for path in present:
        print(f"  {path}")


def sweep_quarantine_keys(keystore: Keystore, retention_days: int, now: float | None = None) -> int:
    """Deletes the quarantine keys of the days that ended ``retention_days`` or more ago; returns how many."""
    names = keystore.named_keys(QUARANTINE_KEYS)
    expired = expired_quarantine_keys(names, retention_days, time.time() if now is None else now)
    return keystore.delete_named_keys({name: names[name] for name in expired})


def open_existing_keystore(keys: KeyConfig, allow_empty: bool) -> Keystore:
    """The keystore the flags name, which must exist and, unless ``allow_empty``, hold keys."""
    keystore = keys.preflight()
    if not allow_empty and not keystore.holds_subjects():
        raise preflight.PreflightError(
            f"the keystore {keys.keystore} holds no keys, so nothing can be forgotten in it; check --keystore, "
            "or pass --allow_empty_keystore to tombstone the subjects anyway"
        )
    return keystore


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.forget", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
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
    parser.add_argument(
        "--sweep_orphans",
        action="store_true",
        help="Then finish every forget that stopped halfway, delete the data keys no subject or named key "
        "points to (left by a worker that died between writing a key and claiming its subject), "
        "and the quarantine keys of the days past --quarantine_retention_days.",
    )
    parser.add_argument(
        "--quarantine_retention_days",
        type=int,
        default=QUARANTINE_RETENTION_DAYS,
        help="With --sweep_orphans: the days a quarantine key is kept after its day, as the bucket keeps "
        f"dead letters (make provision). Default: {QUARANTINE_RETENTION_DAYS}.",
    )
    parser.add_argument(
        "--orphan_grace_seconds",
        type=float,
        default=ORPHAN_GRACE_SECONDS,
        help="The sweep leaves keys younger than this alone: their claim may be under way (Bigtable). "
        f"Default: {ORPHAN_GRACE_SECONDS}.",
    )
    parser.add_argument(
        "--decrypted_copies",
        choices=["list", "purge"],
        default="list",
        help="What to do with the decrypted copies that --copies_inventory records as holding the subjects "
        "in clear: print their paths (default), or delete them (with the other subjects' records in the "
        "same files) and record the purge.",
    )
    add_copies_inventory_argument(parser)
    add_key_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    if not (args.subject or args.subjects_file or args.sweep_orphans):
        parser.error("give subjects (--subjects_file, or --subject) or --sweep_orphans")
    if args.orphan_grace_seconds < 0:
        parser.error("--orphan_grace_seconds cannot be negative")
    if args.quarantine_retention_days <= 0:
        parser.error("--quarantine_retention_days must be positive")
    try:
        keys = key_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.subjects_file and args.subjects_file != "-" and not os.path.isfile(args.subjects_file):
        parser.error(f"there is no file {args.subjects_file}")
    use_emulator_credentials()
    with preflight.exit_on_failure(parser.prog):
        keystore = open_existing_keystore(keys, args.allow_empty_keystore or not (args.subject or args.subjects_file))
        if args.copies_inventory.startswith("gs://"):
            preflight.check_root(args.copies_inventory, create=False)
    if args.subjects_file and args.subjects_file != "-":
        handle_decrypted_copies(keystore, subjects_in(args.subjects_file), args.copies_inventory, args.decrypted_copies)
        deleted, tombstoned = forget_file(args.subjects_file, keys, beam_args)
    elif args.subject or args.subjects_file:
        subjects = args.subject or [line.strip() for line in sys.stdin if line.strip()]
        handle_decrypted_copies(keystore, subjects, args.copies_inventory, args.decrypted_copies)
        outcomes = [keystore.forget(subject) for subject in subjects]
        deleted, tombstoned = sum(outcomes), len(outcomes) - sum(outcomes)
    if args.subject or args.subjects_file:
        print(
            f"forgotten: {deleted} subject(s) whose keys were deleted, "
            f"{tombstoned} subject(s) had no key and are tombstoned"
        )
    if args.sweep_orphans:
        swept = keystore.sweep_orphans(args.orphan_grace_seconds)
        expired = sweep_quarantine_keys(keystore, args.quarantine_retention_days)
        print(
            f"swept: {swept} key(s) that nothing pointed to deleted; {expired} quarantine key(s) of days past "
            f"the {args.quarantine_retention_days}-day retention deleted"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
