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
personal data in clear, and the keys are the only link to it. Before it deletes the subjects'
keys, forget looks their key ids up in the inventory decrypt keeps (``--copies_inventory``),
prints the paths of the recorded copies that hold any of them in clear, and stops if one is
still there (``--decrypted_copies list``, the default); or deletes those files and records the
purge there (``purge``); or deletes the keys anyway (``keep``). Copies of subjects forgotten
before (recorded key ids the keystore no longer holds) are listed, or purged, too. It deletes
only files under the output root of the run that recorded them. A file mixes subjects, so a
purge deletes the other subjects' copies in it too: a decrypted copy can be made again.

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
from pipelines.copies_inventory import (
    NO_INVENTORY,
    add_copies_inventory_argument,
    check_inventory,
    copies_holding,
    decrypt_runs,
    inventory_of,
    record_purge,
    written_by,
)


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
    """Lists (``action`` "list" or "keep") or deletes ("purge") the recorded decrypted files that hold any
    of ``subjects`` in clear, and those that hold subjects forgotten before (recorded key ids the keystore
    no longer holds); prints paths and counts only. With "list", raises ``PreflightError`` if a file of
    ``subjects`` is still there: their keys, the only link to it, must not be deleted first.

    It runs before the keys are deleted; a forget interrupted after a purge finds the same files when
    run again, already gone, which is no error. An inventory line naming a file outside the output root
    of its run is reported and never deleted.
    """
    if inventory == NO_INVENTORY:
        print(f"decrypted copies: not looked for (--copies_inventory {NO_INVENTORY}: no decrypt run recorded any)")
        return
    runs = decrypt_runs(inventory)
    if not runs:
        print(f"decrypted copies: no decrypt run is recorded in {inventory}")
        return
    theirs = copies_of(runs, {key_id for subject in subjects for key_id in keystore.key_ids_of(subject)})
    recorded = {key_id for run in runs for copy in run.copies for key_id in copy.key_ids}
    gone = [key_id for key_id, key in keystore.data_keys(recorded).items() if key is None]
    earlier = [path for path in copies_of(runs, gone) if path not in theirs]
    if action == "purge":
        purge_copies(inventory, theirs + earlier)
        return
    still_there = list_copies("these subjects", theirs)
    list_copies("subjects forgotten before", earlier)
    if still_there and action == "list":
        raise preflight.PreflightError(
            "decrypted copies hold these subjects in clear, so their keys were not deleted: purge the copies "
            "(--decrypted_copies purge), or delete them and forget again, or keep them and forget anyway "
            "(--decrypted_copies keep)"
        )


def copies_of(runs, key_ids) -> list[str]:
    """The paths of the recorded copies holding any of ``key_ids``, sorted. A path that no run recording it
    writes (outside the run's output root) is refused, on stderr, and left out."""
    held = copies_holding(runs, key_ids)
    accepted = sorted({copy.path for run, copy in held if written_by(run, copy.path)})
    for run, copy in held:
        if copy.path not in accepted:
            print(f"decrypted copies: refused {copy.path} ({run.record}): not a file its run writes", file=sys.stderr)
    return accepted


def purge_copies(inventory: str, held: list[str]) -> None:
    deleted = files.delete_existing(held)
    recorded = f"; the purge is recorded in {record_purge(inventory, held, deleted)}" if held else ""
    print(
        f"decrypted copies: {len(deleted)} file(s) that held these or earlier forgotten subjects in clear "
        f"deleted, {len(held) - len(deleted)} already gone{recorded}"
    )


def list_copies(whose: str, held: list[str]) -> list[str]:
    """Prints how many files of ``held`` are still there, and their paths; returns them."""
    present = [path for path in held if files.exists(path)]
    gone = f" ({len(held) - len(present)} recorded one(s) already gone)" if len(present) < len(held) else ""
    print(f"decrypted copies: {len(present)} file(s) hold {whose} in clear{gone}" + (":" if present else ""))
    for path in present:
        print(f"  {path}")
    return present


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


def _parser() -> argparse.ArgumentParser:
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
        choices=["list", "purge", "keep"],
        default="list",
        help="What to do with the decrypted copies that --copies_inventory records as holding the subjects "
        "in clear: print their paths and, if any is still there, stop before deleting a key (default); "
        "delete them (with the other subjects' records in the same files) and record the purge; or print "
        "them, keep them and delete the keys anyway. Each also lists (purge: deletes) the copies of subjects "
        f"forgotten before. --copies_inventory {NO_INVENTORY}: no decrypt run has ever recorded a copy.",
    )
    add_copies_inventory_argument(parser)
    add_key_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args, beam_args = parser.parse_known_args(argv)
    if not (args.subject or args.subjects_file or args.sweep_orphans):
        parser.error("give subjects (--subjects_file, or --subject) or --sweep_orphans")
    if args.orphan_grace_seconds < 0:
        parser.error("--orphan_grace_seconds cannot be negative")
    if args.quarantine_retention_days <= 0:
        parser.error("--quarantine_retention_days must be positive")
    try:
        keys = key_config_from_args(args)
        inventory = inventory_of(args) if args.subject or args.subjects_file else None
    except ValueError as error:
        parser.error(str(error))
    if args.subjects_file and args.subjects_file != "-" and not os.path.isfile(args.subjects_file):
        parser.error(f"there is no file {args.subjects_file}")
    use_emulator_credentials()
    with preflight.exit_on_failure(parser.prog):
        keystore = open_existing_keystore(keys, args.allow_empty_keystore or not (args.subject or args.subjects_file))
        if inventory not in (None, NO_INVENTORY):
            check_inventory(inventory, named=bool(args.copies_inventory))
    # A refusal over decrypted copies ends forget, like a failed check, before any key is deleted.
    if args.subjects_file and args.subjects_file != "-":
        with preflight.exit_on_failure(parser.prog):
            handle_decrypted_copies(keystore, subjects_in(args.subjects_file), inventory, args.decrypted_copies)
        deleted, tombstoned = forget_file(args.subjects_file, keys, beam_args)
    elif args.subject or args.subjects_file:
        subjects = args.subject or [line.strip() for line in sys.stdin if line.strip()]
        with preflight.exit_on_failure(parser.prog):
            handle_decrypted_copies(keystore, subjects, inventory, args.decrypted_copies)
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
