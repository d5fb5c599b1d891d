"""The embedded keystore backend: one SQLite file (the default for local runs).

The file and its log (``-wal``, ``-shm``) are readable by their owner alone (0600; SQLite gives
the log the database's mode), in a folder closed to others (0700).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time

from event_delivery.keys.kek import PROVISION_HINT, KeyEncryptionKey, KeysNotFound, private_folder
from event_delivery.keys.keystore import SCAN_BATCH, Keystore
from event_delivery.keys.wrapping import check_still_newest

PRIVATE_FILE = 0o600


class SqliteKeystore(Keystore):
    """The embedded keystore: one SQLite file, safe for concurrent writers on one machine."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS subjects (pseudonym TEXT PRIMARY KEY, key_id TEXT, forgotten_at REAL);
        CREATE TABLE IF NOT EXISTS data_keys (key_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL);
        CREATE TABLE IF NOT EXISTS named_keys (name TEXT PRIMARY KEY, key_id TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS pending_forgets (pseudonym TEXT PRIMARY KEY, scoped TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
    """

    def __init__(self, kek: KeyEncryptionKey, path: str, create: bool = False):
        super().__init__(kek)
        self.path = path
        self._lock = threading.Lock()
        if not create and not os.path.exists(path):
            raise KeysNotFound(f"there is no keystore at {path}; {PROVISION_HINT}")
        private_folder(os.path.dirname(os.path.abspath(path)))
        _make_private(path)
        self._connection = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        # Deleted keys are overwritten on disk, not just unlinked from the b-tree.
        self._connection.execute("PRAGMA secure_delete = ON")
        with contextlib.suppress(sqlite3.OperationalError):
            self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.executescript(self.SCHEMA)

    @contextlib.contextmanager
    def _transaction(self):
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _select(self, sql: str, values: list) -> list[tuple]:
        rows, size = [], min(5000, self._connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
        for start in range(0, len(values), size):
            chunk = values[start : start + size]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows.extend(self._connection.execute(sql.format(marks=marks), chunk).fetchall())
        return rows

    def _read_subjects(self, pseudonyms):
        return dict(self._select("SELECT pseudonym, key_id FROM subjects WHERE pseudonym IN ({marks})", pseudonyms))

    @staticmethod
    def _names_in(db, prefix: str) -> dict[str, str]:
        return dict(
            db.execute("SELECT name, key_id FROM named_keys WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
        )

    def _create_subjects(self, new):
        with self._transaction() as db:
            check_still_newest(new.values(), lambda prefix: self._names_in(db, prefix))  # a rotation scans after
            for pseudonym, (key_id, wrapped, _) in new.items():
                if db.execute("SELECT 1 FROM subjects WHERE pseudonym = ?", (pseudonym,)).fetchone():
                    continue  # another writer got there first; its key stands
                db.execute("INSERT INTO data_keys VALUES (?, ?)", (key_id, wrapped))
                db.execute("INSERT INTO subjects VALUES (?, ?, NULL)", (pseudonym, key_id))

    def _read_wrapped_keys(self, key_ids):
        return dict(self._select("SELECT key_id, wrapped FROM data_keys WHERE key_id IN ({marks})", key_ids))

    def _forget(self, pseudonym):
        with self._transaction() as db:
            row = db.execute("SELECT key_id FROM subjects WHERE pseudonym = ?", (pseudonym,)).fetchone()
            if row and row[0]:
                db.execute("DELETE FROM data_keys WHERE key_id = ?", (row[0],))
            db.execute(
                "INSERT INTO subjects VALUES (?, NULL, ?) "
                "ON CONFLICT (pseudonym) DO UPDATE SET key_id = NULL, forgotten_at = excluded.forgotten_at",
                (pseudonym, time.time()),
            )
        return bool(row and row[0])

    def _record_forget(self, pseudonym, scoped):
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO pending_forgets VALUES (?, ?)", (pseudonym, " ".join(scoped)))

    def _pending_forgets(self):
        with self._lock:
            rows = self._connection.execute("SELECT pseudonym, scoped FROM pending_forgets").fetchall()
        return {pseudonym: scoped.split() for pseudonym, scoped in rows}

    def _forget_done(self, pseudonym):
        with self._transaction() as db:
            db.execute("DELETE FROM pending_forgets WHERE pseudonym = ?", (pseudonym,))

    def _sweep_orphans(self, grace_seconds):
        # A key and the entry that points to it are written in one transaction, so an orphan is
        # never a claim under way: whatever nothing points to can go, however young.
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM data_keys WHERE key_id NOT IN (SELECT key_id FROM subjects WHERE key_id IS NOT NULL) "
                "AND key_id NOT IN (SELECT key_id FROM named_keys)"
            ).rowcount

    def _named_keys(self, prefix):
        with self._lock:
            return self._names_in(self._connection, prefix)

    def _delete_named_key(self, name, key_id):
        with self._transaction() as db:
            db.execute("DELETE FROM data_keys WHERE key_id = ?", (key_id,))
            db.execute("DELETE FROM named_keys WHERE name = ? AND key_id = ?", (name, key_id))
        self._purge_deleted()

    def _scan_wrapped_keys(self):
        after = ""
        while True:
            with self._lock:
                batch = self._connection.execute(
                    "SELECT key_id, wrapped FROM data_keys WHERE key_id > ? ORDER BY key_id LIMIT ?",
                    (after, SCAN_BATCH),
                ).fetchall()
            if not batch:
                return
            yield batch
            after = batch[-1][0]

    def _replace_wrapped_keys(self, rewrapped):
        with self._transaction() as db:
            return sum(
                db.execute(
                    "UPDATE data_keys SET wrapped = ? WHERE key_id = ? AND wrapped = ?", (new, key_id, old)
                ).rowcount
                for key_id, (old, new) in rewrapped.items()
            )

    def _take_lease(self, name, holder, now, until):
        with self._transaction() as db:
            row = db.execute("SELECT holder, until FROM leases WHERE name = ?", (name,)).fetchone()
            if row and row[0] != holder and row[1] > now:
                return False
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, holder, until))
            return True

    def _release_lease(self, name, holder):
        with self._transaction() as db:
            db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def _purge_deleted(self):
        """Copies the write-ahead log into the database and empties it.

        ``secure_delete`` overwrites a deleted key in the database file, but the log
        still holds the frame that wrote it until a truncating checkpoint; a forget is
        not done before then. It waits for readers (the busy timeout) and fails loudly
        if they hold on, rather than report an erasure that is not complete. A forget
        runs it once, after every deletion, so readers can only delay the last step.
        """
        with self._lock:
            busy, _, _ = self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError(
                f"the key is deleted, but {self.path}-wal could not be emptied while other connections read; "
                "run forget again once they are idle"
            )

    def _named_key_id(self, name, candidate):
        with self._lock:
            row = self._connection.execute("SELECT key_id FROM named_keys WHERE name = ?", (name,)).fetchone()
        if row:
            return row[0]
        new = candidate()
        key_id, wrapped, _ = new
        with self._transaction() as db:
            row = db.execute("SELECT key_id FROM named_keys WHERE name = ?", (name,)).fetchone()
            if row:
                return row[0]
            check_still_newest([new], lambda prefix: self._names_in(db, prefix))
            db.execute("INSERT INTO data_keys VALUES (?, ?)", (key_id, wrapped))
            db.execute("INSERT INTO named_keys VALUES (?, ?)", (name, key_id))
            return key_id

    def holds_subjects(self):
        with self._lock:
            return self._connection.execute("SELECT 1 FROM subjects LIMIT 1").fetchone() is not None

    def __reduce__(self):
        return (SqliteKeystore, (self.kek, self.path))


def _make_private(path: str) -> None:
    """Creates the database file readable by its owner alone, or closes the one that exists and its log."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_uid == os.getuid():
                os.chmod(name, PRIVATE_FILE)
