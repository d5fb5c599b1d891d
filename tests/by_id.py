"""Counting by event id, independently of the jobs: what a test published against what the files hold.

The audit balances totals, and it takes the duplicates from the jobs' own manifests, so a
unique event that a job drops and counts as a duplicate still balances. These helpers read
the delivered, late and dead-letter Avro files themselves (fastavro, no code of the jobs)
and hold the ids found there against the ids the test published.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from collections.abc import Iterable

import fastavro
from apache_beam.io.filesystems import FileSystems

from tools.local.loadgen import DEAD_LETTER

ROOTS = {"delivered": "delivered", "late": "late", "dead_lettered": "dead-letter"}


@dataclasses.dataclass
class IdsFound:
    """How often each event id is in a type's files of each outcome (None: a dead letter without an id)."""

    delivered: collections.Counter
    late: collections.Counter
    dead_lettered: collections.Counter

    @property
    def written(self) -> collections.Counter:
        return self.delivered + self.late


def _avro_ids(pattern: str) -> collections.Counter:
    found = collections.Counter()
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(metadata.path, mime_type="application/octet-stream") as handle:
            found.update(record["event_id"] for record in fastavro.reader(io.BytesIO(handle.read())))
    return found


def ids_found(storage_root: str, event_type: str) -> IdsFound:
    """The ids in every hour folder of the type under ``storage_root``'s delivered, late and dead-letter roots."""
    root = str(storage_root).rstrip("/")
    return IdsFound(
        **{name: _avro_ids(f"{root}/{folder}/{event_type}/dt=*/hr=*/*.avro") for name, folder in ROOTS.items()}
    )


def assert_every_id_in_one_place(
    storage_root: str,
    event_type: str,
    published: Iterable[str],
    dead_lettered: Iterable[str] = (),
    may_be_late_again: Iterable[str] = (),
) -> IdsFound:
    """Asserts that the ids found in the type's files are the ids the test published, each in one place.

    ``published`` holds the id of every message the test published with one, a repeat as often as
    it was sent; ``dead_lettered`` those that must be dead-lettered. Every other id is written
    (delivered or late) exactly once, however often it was sent: a repeat after its hour's close is
    dropped against the hour's index (docs/dataflow.md, "Late repeats"). ``may_be_late_again`` names
    the ids a test sends past a documented bound of that check (a spent read budget, staged files of
    another shard count): each may be written late again, at most as often as it was sent. Returns
    what was found, for further checks.
    """
    sent, must_dead_letter, unchecked = collections.Counter(published), set(dead_lettered), set(may_be_late_again)
    found = ids_found(storage_root, event_type)
    written, dead = found.written, set(found.dead_lettered) - {None}
    missing = sorted(set(sent) - set(written) - dead)
    assert not missing, f"{event_type}: {len(missing)} published id(s) in no file, e.g. {missing[:5]}"
    unknown = sorted((set(written) | dead) - set(sent))
    assert not unknown, f"{event_type}: {len(unknown)} id(s) in the files that were never published: {unknown[:5]}"
    assert dead == must_dead_letter, f"{event_type}: dead-lettered {sorted(dead ^ must_dead_letter)[:5]} wrongly"
    both = sorted(set(written) & dead)
    assert not both, f"{event_type}: {len(both)} id(s) both written and dead-lettered, e.g. {both[:5]}"
    twice = sorted(i for i, n in found.delivered.items() if n > 1)
    assert not twice, f"{event_type}: {len(twice)} id(s) delivered more than once, e.g. {twice[:5]}"
    again = {i: (found.delivered[i], found.late[i]) for i, n in written.items() if n > 1 and i not in unchecked}
    assert not again, f"{event_type}: {len(again)} id(s) written more than once, (delivered, late): {_some(again)}"
    too_often = sorted(i for i, n in (written + found.dead_lettered).items() if i is not None and n > sent[i])
    assert not too_often, f"{event_type}: {len(too_often)} id(s) found more often than sent, e.g. {too_often[:5]}"
    return found


def _some(copies: dict) -> dict:
    return dict(sorted(copies.items())[:5])


def ledger_ids(ledger) -> tuple[list[str], list[str]]:
    """``(published, dead_lettered)`` ids of a load generator's ``Ledger``, for ``assert_every_id_in_one_place``."""
    return [i for ids in ledger.ids.values() for i in ids], ledger.ids[DEAD_LETTER]
