"""The production keystore backend: Cloud Bigtable (tested against its emulator)."""

from __future__ import annotations

import contextlib
import datetime
import re
import time

from event_delivery.keys.kek import PROVISION_HINT, KeyEncryptionKey, KeysNotFound
from event_delivery.keys.keystore import SCAN_BATCH, Keystore
from event_delivery.keys.wrapping import KeyWrappingReplaced, check_still_newest

KEY_ID, FORGOTTEN_AT, WRAPPED, LEASE = b"key_id", b"forgotten_at", b"wrapped", b"lease"
ONE_MILLISECOND = datetime.timedelta(milliseconds=1)  # Bigtable's granularity of cell timestamps


def _live_key_id(cells: dict) -> str | None:
    """A subject row's key id, or None once it is a tombstone (whose key may still await deletion)."""
    return None if FORGOTTEN_AT in cells or KEY_ID not in cells else cells[KEY_ID].decode()


def _check(statuses, what: str) -> None:
    """Bigtable answers a batch with one status per row: any failure is an error, never ignored."""
    failed = [status for status in statuses if getattr(status, "code", 0) != 0]
    if failed:
        raise RuntimeError(f"Bigtable refused {what}: {failed[0].message}")


def _held_by(holder: str):
    """A filter that passes a lease cell that ``holder`` holds."""
    from google.cloud.bigtable.row_filters import ValueRegexFilter

    return ValueRegexFilter(rb"^\d{20} " + re.escape(holder).encode() + rb"$")


class BigtableKeystore(Keystore):
    """Cloud Bigtable: rows ``s#<pseudonym>``, ``d#<key id>``, ``n#<name>``, ``p#<pseudonym>``
    (a forget under way) and ``l#<name>`` (a lease) in one family."""

    FAMILY = "k"

    def __init__(self, kek: KeyEncryptionKey, project: str, instance: str, table: str, create: bool = False):
        super().__init__(kek)
        self.project, self.instance_id, self.table_id = project, instance, table
        self._table = None
        self._create = create

    @property
    def table(self):
        if self._table is None:
            from google.cloud import bigtable
            from google.cloud.bigtable import column_family

            client = bigtable.Client(project=self.project, admin=True)
            table = client.instance(self.instance_id).table(self.table_id)
            if not table.exists():
                if not self._create:
                    raise KeysNotFound(
                        f"there is no keystore table {self.table_id} in {self.project}/{self.instance_id}; "
                        f"{PROVISION_HINT}"
                    )
                with contextlib.suppress(Exception):  # another worker may create it first
                    table.create(column_families={self.FAMILY: column_family.MaxVersionsGCRule(1)})
            self._table = table
        return self._table

    def _read_rows(self, keys: list[bytes]) -> dict[bytes, dict[bytes, bytes]]:
        from google.cloud.bigtable.row_set import RowSet

        if not keys:
            return {}
        row_set = RowSet()
        for key in keys:
            row_set.add_row_key(key)
        return {
            row.row_key: {qualifier: cells[0].value for qualifier, cells in row.cells.get(self.FAMILY, {}).items()}
            for row in self.table.read_rows(row_set=row_set)
        }

    def _read_subjects(self, pseudonyms):
        rows = self._read_rows([b"s#" + p.encode() for p in pseudonyms])
        return {key[2:].decode(): _live_key_id(cells) for key, cells in rows.items()}

    def _write_data_keys(self, keys: dict[str, bytes]) -> None:
        rows = []
        for key_id, wrapped in keys.items():
            row = self.table.direct_row(b"d#" + key_id.encode())
            row.set_cell(self.FAMILY, b"wrapped", wrapped)
            rows.append(row)
        _check(self.table.mutate_rows(rows), "a key write")

    def _claim(self, row_key: bytes, qualifier: bytes, value: bytes) -> bool:
        """Writes the cell only if the row is empty; True if this call wrote it."""
        from google.cloud.bigtable.row_filters import PassAllFilter

        row = self.table.conditional_row(row_key, filter_=PassAllFilter(True))
        row.set_cell(self.FAMILY, qualifier, value, state=False)
        existed = row.commit()
        return not existed

    def _stored_if_newest(self, new: list) -> None:
        """Writes new keys, then checks that a rotation has not replaced their key-wrapping key: if
        it has, deletes them and raises ``KeyWrappingReplaced``. A rotation that replaced it after
        the check scans after the write, so it re-wraps them itself."""
        self._write_data_keys({key.key_id: key.wrapped for key in new})
        try:
            check_still_newest(new, self._named_keys)
        except KeyWrappingReplaced:
            self._delete_rows([b"d#" + key.key_id.encode() for key in new])
            raise

    def _create_subjects(self, new):
        # Keys first, so that no subject entry ever names a key that is not there.
        self._stored_if_newest(list(new.values()))
        losers = [
            key_id for p, (key_id, *_) in new.items() if not self._claim(b"s#" + p.encode(), b"key_id", key_id.encode())
        ]
        self._delete_rows([b"d#" + key_id.encode() for key_id in losers])

    def _delete_rows(self, keys: list[bytes]) -> None:
        rows = []
        for key in keys:
            row = self.table.direct_row(key)
            row.delete()
            rows.append(row)
        if rows:
            _check(self.table.mutate_rows(rows), "a key deletion")

    def _read_wrapped_keys(self, key_ids):
        rows = self._read_rows([b"d#" + k.encode() for k in key_ids])
        return {key[2:].decode(): cells[b"wrapped"] for key, cells in rows.items() if b"wrapped" in cells}

    def _forget(self, pseudonym):
        """Tombstone first, keeping the key id; then delete the key; then drop the pointer.

        The tombstone is written whatever the row holds, atomically, so a first-sight
        claim can no longer win afterwards; one that won just before is read back and
        its key deleted too. A forget interrupted after the tombstone finds the key id
        still there when it runs again, and finishes.
        """
        from google.cloud.bigtable.row_filters import PassAllFilter

        row_key = b"s#" + pseudonym.encode()
        tombstone = self.table.conditional_row(row_key, filter_=PassAllFilter(True))
        stamp = str(time.time()).encode()
        for state in (True, False):  # the same write whether or not the row exists
            tombstone.set_cell(self.FAMILY, FORGOTTEN_AT, stamp, state=state)
        tombstone.commit()
        key_id = self._read_rows([row_key]).get(row_key, {}).get(KEY_ID)
        if key_id:
            self._delete_rows([b"d#" + key_id])
            pointer = self.table.direct_row(row_key)
            pointer.delete_cell(self.FAMILY, KEY_ID)
            _check([pointer.commit()], "dropping a forgotten key's id")
        return bool(key_id)

    def _record_forget(self, pseudonym, scoped):
        row = self.table.direct_row(b"p#" + pseudonym.encode())
        row.set_cell(self.FAMILY, b"scoped", " ".join(scoped).encode())
        _check([row.commit()], "recording a forget")

    def _pending_forgets(self):
        return {
            row.row_key[2:].decode(): row.cells[self.FAMILY][b"scoped"][0].value.decode().split()
            for row in self._scan(b"p#")
        }

    def _forget_done(self, pseudonym):
        self._delete_rows([b"p#" + pseudonym.encode()])

    def _purge_deleted(self):
        """Nothing to do here: Bigtable drops deleted cells from storage at its next compaction."""

    def _named_key_id(self, name, candidate):
        row_key = b"n#" + name.encode()
        existing = self._read_rows([row_key]).get(row_key, {}).get(b"key_id")
        if existing:
            return existing.decode()
        new = candidate()
        key_id = new.key_id
        self._stored_if_newest([new])
        if self._claim(row_key, b"key_id", key_id.encode()):
            return key_id
        self._delete_rows([b"d#" + key_id.encode()])
        return self._read_rows([row_key])[row_key][b"key_id"].decode()

    def _scan(self, prefix: bytes):
        """Every row whose key starts with ``prefix``, newest cell of each column only."""
        from google.cloud.bigtable.row_filters import CellsColumnLimitFilter

        end = prefix[:-1] + bytes([prefix[-1] + 1])
        return self.table.read_rows(start_key=prefix, end_key=end, filter_=CellsColumnLimitFilter(1))

    def _scan_wrapped_keys(self):
        batch = []
        for row in self._scan(b"d#"):
            cells = row.cells.get(self.FAMILY, {}).get(b"wrapped")
            if cells:
                batch.append((row.row_key[2:].decode(), cells[0].value))
            if len(batch) == SCAN_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _named_keys(self, prefix):
        return {
            row.row_key[2:].decode(): cells[0].value.decode()
            for row in self._scan(b"n#" + prefix.encode())
            if (cells := row.cells.get(self.FAMILY, {}).get(KEY_ID))
        }

    def _delete_named_key(self, name, key_id):
        self._delete_rows([b"d#" + key_id.encode()])
        self._delete_rows([b"n#" + name.encode()])

    def _newest_cells(self, row_keys: list[bytes], qualifier: bytes) -> dict[bytes, object]:
        """The newest cell of ``qualifier`` in each row that has one: row key -> cell (value, timestamp)."""
        from google.cloud.bigtable.row_filters import CellsColumnLimitFilter, ColumnQualifierRegexFilter, RowFilterChain
        from google.cloud.bigtable.row_set import RowSet

        row_set = RowSet()
        for key in row_keys:
            row_set.add_row_key(key)
        newest = RowFilterChain([ColumnQualifierRegexFilter(qualifier), CellsColumnLimitFilter(1)])
        rows = self.table.read_rows(row_set=row_set, filter_=newest) if row_keys else []
        return {row.row_key: row.cells[self.FAMILY][qualifier][0] for row in rows}

    def _replace_wrapped_keys(self, rewrapped):
        """Compare-and-set, one conditional mutation per key: the new wrapping is written only over
        the cell that holds the wrapping the rotation read, named by its timestamp (Bigtable
        compares no values but by regular expression, which arbitrary bytes defeat). A key that
        forget deleted, or that another writer re-wrapped, is left as it is."""
        from google.cloud.bigtable.row_filters import (
            CellsColumnLimitFilter,
            ColumnQualifierRegexFilter,
            RowFilterChain,
            TimestampRange,
            TimestampRangeFilter,
        )

        cells = self._newest_cells([b"d#" + key_id.encode() for key_id in rewrapped], WRAPPED)
        replaced = 0
        for key_id, (old, new) in rewrapped.items():
            row_key = b"d#" + key_id.encode()
            cell = cells.get(row_key)
            if cell is None or cell.value != old:
                continue
            same_cell = RowFilterChain(
                [
                    ColumnQualifierRegexFilter(WRAPPED),
                    CellsColumnLimitFilter(1),
                    TimestampRangeFilter(TimestampRange(start=cell.timestamp, end=cell.timestamp + ONE_MILLISECOND)),
                ]
            )
            row = self.table.conditional_row(row_key, filter_=same_cell)
            row.set_cell(self.FAMILY, WRAPPED, new, state=True)
            replaced += bool(row.commit())
        return replaced

    def _take_lease(self, name, holder, now, until):
        """The lease is one cell, ``<expiry in ms, 20 digits> <holder>``, so that one conditional
        mutation renews a lease this holder holds, and another claims one that no live lease holds
        (fixed-width digits compare as numbers)."""
        from google.cloud.bigtable.row_filters import (
            CellsColumnLimitFilter,
            ColumnQualifierRegexFilter,
            RowFilterChain,
            ValueRangeFilter,
        )

        row_key, value = b"l#" + name.encode(), b"%020d %s" % (int(until * 1000), holder.encode())
        newest = [ColumnQualifierRegexFilter(LEASE), CellsColumnLimitFilter(1)]
        mine = _held_by(holder)
        renewal = self.table.conditional_row(row_key, filter_=RowFilterChain([*newest, mine]))
        renewal.set_cell(self.FAMILY, LEASE, value, state=True)
        if renewal.commit():
            return True
        live = ValueRangeFilter(start_value=b"%020d" % int(now * 1000))
        claim = self.table.conditional_row(row_key, filter_=RowFilterChain([*newest, live]))
        claim.set_cell(self.FAMILY, LEASE, value, state=False)
        return not claim.commit()

    def _release_lease(self, name, holder):
        from google.cloud.bigtable.row_filters import ColumnQualifierRegexFilter, RowFilterChain

        mine = _held_by(holder)
        row = self.table.conditional_row(
            b"l#" + name.encode(), filter_=RowFilterChain([ColumnQualifierRegexFilter(LEASE), mine])
        )
        row.delete(state=True)
        row.commit()

    def _sweep_orphans(self, grace_seconds):
        """Keys first, then what points to them: a key written after the key scan is not judged, and
        one written before it whose claim lands after the pointer scan is younger than the grace."""
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=grace_seconds)
        keys = {}
        for row in self._scan(b"d#"):
            cells = row.cells.get(self.FAMILY, {})
            keys[row.row_key[2:]] = max((c[0].timestamp for c in cells.values()), default=cutoff)
        pointed, interrupted = set(), []
        for row in self._scan(b"n#"):
            pointed.add(row.cells.get(self.FAMILY, {}).get(KEY_ID, [None])[0].value)
        for row in self._scan(b"s#"):
            cells = {q: c[0].value for q, c in row.cells.get(self.FAMILY, {}).items()}
            if KEY_ID in cells:
                pointed.add(cells[KEY_ID])
                if FORGOTTEN_AT in cells:
                    interrupted.append(row.row_key[2:].decode())
        finished = sum(self._forget(pseudonym) for pseudonym in interrupted)
        orphans = [b"d#" + key_id for key_id, written in keys.items() if key_id not in pointed and written < cutoff]
        for start in range(0, len(orphans), SCAN_BATCH):
            self._delete_rows(orphans[start : start + SCAN_BATCH])
        return finished + len(orphans)

    def holds_subjects(self):
        return any(self.table.read_rows(start_key=b"s#", end_key=b"s$", limit=1))

    def __reduce__(self):
        # Workers never create the table: provisioning has, or the job stops.
        return (BigtableKeystore, (self.kek, self.project, self.instance_id, self.table_id))
