"""The production keystore backend: Cloud Bigtable (tested against its emulator)."""

from __future__ import annotations

import contextlib
import datetime
import time

from event_delivery.keys.kek import PROVISION_HINT, KeyEncryptionKey, KeysNotFound
from event_delivery.keys.keystore import SCAN_BATCH, Keystore
from event_delivery.keys.wrapping import KeyWrappingReplaced, check_still_newest

KEY_ID, FORGOTTEN_AT = b"key_id", b"forgotten_at"


def _live_key_id(cells: dict) -> str | None:
    """A subject row's key id, or None once it is a tombstone (whose key may still await deletion)."""
    return None if FORGOTTEN_AT in cells or KEY_ID not in cells else cells[KEY_ID].decode()


def _check(statuses, what: str) -> None:
    """Bigtable answers a batch with one status per row: any failure is an error, never ignored."""
    failed = [status for status in statuses if getattr(status, "code", 0) != 0]
    if failed:
        raise RuntimeError(f"Bigtable refused {what}: {failed[0].message}")


class BigtableKeystore(Keystore):
    """Cloud Bigtable: rows ``s#<pseudonym>``, ``d#<key id>``, ``n#<name>`` and ``p#<pseudonym>``
    (a forget under way) in one family."""

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

    def _replace_wrapped_keys(self, rewrapped):
        """One conditional mutation per key: written only while the key's row still exists, so a
        key that forget deleted after it was read is not brought back."""
        from google.cloud.bigtable.row_filters import ColumnQualifierRegexFilter

        replaced = 0
        for key_id, wrapped in rewrapped.items():
            row = self.table.conditional_row(b"d#" + key_id.encode(), filter_=ColumnQualifierRegexFilter(b"wrapped"))
            row.set_cell(self.FAMILY, b"wrapped", wrapped, state=True)
            replaced += bool(row.commit())
        return replaced

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
