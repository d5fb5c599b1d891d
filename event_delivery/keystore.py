"""The subject keystore: one random data key per data subject, stored only wrapped.

Layout, the same in every backend:

- a *subject* entry, keyed by the subject's pseudonym (a keyed HMAC of its id, so the
  keystore holds no subject id in clear), names the subject's key id, or is a
  tombstone once the subject is forgotten;
- a *data key* entry, keyed by the opaque key id, holds the data key wrapped by the
  key-encryption key (with the key id as associated data);
- a *named key* entry (the pseudonym secret, the dead-letter quarantine keys) names
  a data key by purpose.

``forget`` deletes the data key and turns the subject entry into a tombstone, so the
subject's ciphertexts can never be decrypted again, and no new key is ever created
for it. Two workers that meet a new subject at once end up with one key: the first
subject entry written wins, atomically, and the loser's key is deleted.

Backends: SQLite (embedded, the default for local runs) and Cloud Bigtable
(production; tested against the Bigtable emulator).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

from event_delivery.kek import KEY_BYTES, KeyEncryptionKey, KeysNotFound, key_encryption_key

PSEUDONYM_KEY = "subject-pseudonyms"
DEFAULT_KEYSTORE = "sqlite:///.keys/keystore.db"
DEFAULT_KEY_FILE = ".keys/kek.key"


@dataclasses.dataclass(frozen=True)
class SubjectKey:
    key_id: str
    data_key: bytes = dataclasses.field(repr=False)

    @property
    def aead(self) -> AESGCM:
        return AESGCM(self.data_key)


def new_key_id() -> str:
    """A random, opaque key id: it says nothing about its subject."""
    return secrets.token_hex(16)


class Keystore(abc.ABC):
    """Subject keys, wrapped by a key-encryption key, in some backend."""

    def __init__(self, kek: KeyEncryptionKey):
        self.kek = kek
        self._pseudonym_mac = None

    # Backend primitives. Each call takes a batch, to keep round trips per bundle.
    @abc.abstractmethod
    def _read_subjects(self, pseudonyms: list[str]) -> dict[str, str | None]:
        """Known subjects: pseudonym -> key id, or None for a tombstone."""

    @abc.abstractmethod
    def _create_subjects(self, new: dict[str, tuple[str, bytes]]) -> None:
        """Stores ``pseudonym -> (key id, wrapped key)`` where no entry exists yet; first writer wins."""

    @abc.abstractmethod
    def _read_wrapped_keys(self, key_ids: list[str]) -> dict[str, bytes]:
        """Wrapped data keys that still exist."""

    @abc.abstractmethod
    def _forget(self, pseudonym: str) -> bool:
        """Deletes the subject's data key and leaves a tombstone; True if it had a key."""

    @abc.abstractmethod
    def _named_key_id(self, name: str, candidate: tuple[str, bytes]) -> str:
        """The key id stored under ``name``, storing ``candidate`` first if there is none."""

    @abc.abstractmethod
    def holds_keys(self) -> bool:
        """Whether any data key is stored: a keystore that jobs have used holds some."""

    # The interface the pipeline and the tools use.
    def pseudonym(self, subject_id: str) -> str:
        if self._pseudonym_mac is None:
            self._pseudonym_mac = HMAC(self.named_key(PSEUDONYM_KEY).data_key, SHA256())
        mac = self._pseudonym_mac.copy()  # the keyed state, without keying a new HMAC for every subject
        mac.update(subject_id.encode("utf-8"))
        return mac.finalize().hex()[:32]

    def subject_key_ids(self, subject_ids, create: bool = True) -> dict[str, str | None]:
        """Key ids for many subjects in one batch; None for forgotten (or, without ``create``, unknown) ones."""
        by_pseudonym = {self.pseudonym(s): s for s in set(subject_ids)}
        known = self._read_subjects(list(by_pseudonym))
        missing = [p for p in by_pseudonym if p not in known]
        if missing and create:
            fresh = {}
            for pseudonym in missing:
                key_id = new_key_id()
                fresh[pseudonym] = (key_id, self.kek.wrap(secrets.token_bytes(KEY_BYTES), key_id.encode()))
            self._create_subjects(fresh)
            known.update(self._read_subjects(missing))
        return {subject: known.get(p) for p, subject in by_pseudonym.items()}

    def subject_keys(self, subject_ids, create: bool = True) -> dict[str, SubjectKey | None]:
        """Keys for many subjects in one batch; None for forgotten (or, without ``create``, unknown) ones."""
        key_ids = self.subject_key_ids(subject_ids, create)
        keys = self.data_keys([k for k in key_ids.values() if k])
        return {s: SubjectKey(k, keys[k]) if k and keys.get(k) else None for s, k in key_ids.items()}

    def data_keys(self, key_ids) -> dict[str, bytes | None]:
        """Unwrapped data keys by key id; None where the key was deleted (its subject forgotten)."""
        wanted = sorted(set(key_ids))
        wrapped = self._read_wrapped_keys(wanted)
        return {k: self.kek.unwrap(wrapped[k], k.encode()) if k in wrapped else None for k in wanted}

    def forget(self, subject_id: str) -> bool:
        """Crypto-shreds a subject: True if a key was deleted, False if there was none (a tombstone stays)."""
        return self._forget(self.pseudonym(subject_id))

    def is_forgotten(self, subject_id: str) -> bool:
        pseudonym = self.pseudonym(subject_id)
        known = self._read_subjects([pseudonym])
        return pseudonym in known and known[pseudonym] is None

    def named_key(self, name: str) -> SubjectKey:
        """A key kept for a purpose rather than a subject, created on first use."""
        key_id = new_key_id()
        candidate = (key_id, self.kek.wrap(secrets.token_bytes(KEY_BYTES), key_id.encode()))
        stored_id = self._named_key_id(name, candidate)
        return SubjectKey(stored_id, self.data_keys([stored_id])[stored_id])


class SqliteKeystore(Keystore):
    """The embedded keystore: one SQLite file, safe for concurrent writers on one machine."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS subjects (pseudonym TEXT PRIMARY KEY, key_id TEXT, forgotten_at REAL);
        CREATE TABLE IF NOT EXISTS data_keys (key_id TEXT PRIMARY KEY, wrapped BLOB NOT NULL);
        CREATE TABLE IF NOT EXISTS named_keys (name TEXT PRIMARY KEY, key_id TEXT NOT NULL);
    """

    def __init__(self, kek: KeyEncryptionKey, path: str, create: bool = True):
        super().__init__(kek)
        self.path = path
        self._lock = threading.Lock()
        if path != ":memory:":
            if not create and not os.path.exists(path):
                raise KeysNotFound(f"there is no keystore at {path}")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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

    def _create_subjects(self, new):
        with self._transaction() as db:
            for pseudonym, (key_id, wrapped) in new.items():
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

    def _named_key_id(self, name, candidate):
        key_id, wrapped = candidate
        with self._transaction() as db:
            row = db.execute("SELECT key_id FROM named_keys WHERE name = ?", (name,)).fetchone()
            if row:
                return row[0]
            db.execute("INSERT INTO data_keys VALUES (?, ?)", (key_id, wrapped))
            db.execute("INSERT INTO named_keys VALUES (?, ?)", (name, key_id))
            return key_id

    def holds_keys(self):
        with self._lock:
            return self._connection.execute("SELECT 1 FROM data_keys LIMIT 1").fetchone() is not None

    def __reduce__(self):
        return (SqliteKeystore, (self.kek, self.path))


class BigtableKeystore(Keystore):
    """Cloud Bigtable: rows ``s#<pseudonym>``, ``d#<key id>`` and ``n#<name>`` in one family."""

    FAMILY = "k"

    def __init__(self, kek: KeyEncryptionKey, project: str, instance: str, table: str, create: bool = True):
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
                    raise KeysNotFound(f"there is no keystore table {self.table_id} in {self.instance_id}")
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
        return {
            key[2:].decode(): (cells[b"key_id"].decode() if b"key_id" in cells else None) for key, cells in rows.items()
        }

    def _write_data_keys(self, keys: dict[str, bytes]) -> None:
        rows = []
        for key_id, wrapped in keys.items():
            row = self.table.direct_row(b"d#" + key_id.encode())
            row.set_cell(self.FAMILY, b"wrapped", wrapped)
            rows.append(row)
        for status in self.table.mutate_rows(rows):
            if status.code != 0:
                raise RuntimeError(f"Bigtable refused a key write: {status.message}")

    def _claim(self, row_key: bytes, qualifier: bytes, value: bytes) -> bool:
        """Writes the cell only if the row is empty; True if this call wrote it."""
        from google.cloud.bigtable.row_filters import PassAllFilter

        row = self.table.conditional_row(row_key, filter_=PassAllFilter(True))
        row.set_cell(self.FAMILY, qualifier, value, state=False)
        existed = row.commit()
        return not existed

    def _create_subjects(self, new):
        # Keys first, so that no subject entry ever names a key that is not there.
        self._write_data_keys({key_id: wrapped for key_id, wrapped in new.values()})
        losers = [
            key_id for p, (key_id, _) in new.items() if not self._claim(b"s#" + p.encode(), b"key_id", key_id.encode())
        ]
        self._delete_rows([b"d#" + key_id.encode() for key_id in losers])

    def _delete_rows(self, keys: list[bytes]) -> None:
        rows = []
        for key in keys:
            row = self.table.direct_row(key)
            row.delete()
            rows.append(row)
        if rows:
            self.table.mutate_rows(rows)

    def _read_wrapped_keys(self, key_ids):
        rows = self._read_rows([b"d#" + k.encode() for k in key_ids])
        return {key[2:].decode(): cells[b"wrapped"] for key, cells in rows.items() if b"wrapped" in cells}

    def _forget(self, pseudonym):
        row_key = b"s#" + pseudonym.encode()
        key_id = self._read_rows([row_key]).get(row_key, {}).get(b"key_id")
        tombstone = self.table.direct_row(row_key)
        tombstone.delete()
        tombstone.set_cell(self.FAMILY, b"forgotten_at", str(time.time()).encode())
        tombstone.commit()
        if key_id:
            self._delete_rows([b"d#" + key_id])
        return bool(key_id)

    def _named_key_id(self, name, candidate):
        key_id, wrapped = candidate
        row_key = b"n#" + name.encode()
        existing = self._read_rows([row_key]).get(row_key, {}).get(b"key_id")
        if existing:
            return existing.decode()
        self._write_data_keys({key_id: wrapped})
        if self._claim(row_key, b"key_id", key_id.encode()):
            return key_id
        self._delete_rows([b"d#" + key_id.encode()])
        return self._read_rows([row_key])[row_key][b"key_id"].decode()

    def holds_keys(self):
        return any(self.table.read_rows(start_key=b"d#", end_key=b"d$", limit=1))

    def __reduce__(self):
        return (BigtableKeystore, (self.kek, self.project, self.instance_id, self.table_id, self._create))


def open_keystore(url: str, kek: KeyEncryptionKey, create: bool = True) -> Keystore:
    """``sqlite:///relative/keys.db``, ``sqlite:////absolute/keys.db`` or ``bigtable://project/instance/table``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "sqlite":
        # As in SQLAlchemy: sqlite:///relative/path and sqlite:////absolute/path.
        return SqliteKeystore(kek, parsed.path[1:] or ":memory:", create)
    if parsed.scheme == "bigtable":
        parts = [parsed.netloc, *parsed.path.strip("/").split("/")]
        if len(parts) != 3 or not all(parts):
            raise ValueError("a Bigtable keystore is bigtable://<project>/<instance>/<table>")
        return BigtableKeystore(kek, *parts, create)
    raise ValueError(f"unknown keystore {url!r}: use sqlite:///path or bigtable://project/instance/table")


class KeyCache:
    """A worker's cache of keys, with a TTL: subject -> key id, and key id -> data key.

    A step that unseals by key id (replaying the archive) fills the second map, so a
    step that then seals by subject only asks the keystore which key id a subject has.

    The TTL is the upper bound on how long a worker may keep using a key after its
    subject was forgotten: both maps expire. Events encrypted in that window are
    unreadable anyway, because the key they used is gone.
    """

    MAX_ENTRIES = 1_000_000  # past this, expired entries are dropped

    def __init__(self, keystore: Keystore, ttl_seconds: float, clock=time.monotonic):
        self.keystore = keystore
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._key_ids: dict[str, tuple[float, str | None]] = {}  # subject -> (expires, key id)
        self._keys: dict[str, tuple[float, tuple]] = {}  # key id -> (expires, (key, aead))
        self._pruning = threading.Lock()

    def _cached(self, entries: dict, wanted, fetch) -> dict:
        """Fresh entries of ``wanted``; the rest from one ``fetch(missing)``, stored until the TTL."""
        now = self.clock()
        found, missing = {}, []
        for item in set(wanted):
            entry = entries.get(item)
            if entry and entry[0] > now:
                found[item] = entry[1]
            else:
                missing.append(item)
        if missing:
            expires = now + self.ttl_seconds
            for item, value in fetch(missing).items():
                found[item] = value
                entries[item] = (expires, value)
            self._prune(entries, now)
        return found

    def _prune(self, entries: dict, now: float) -> None:
        """Drops expired entries once there are too many. Steps in other threads may use
        the cache meanwhile: they only ever add or replace single entries."""
        if len(entries) > self.MAX_ENTRIES:
            with self._pruning:
                for stale in [i for i, e in list(entries.items()) if e[0] <= now]:
                    entries.pop(stale, None)

    def _fetch_data_keys(self, key_ids: list[str]) -> dict[str, tuple[SubjectKey | None, AESGCM | None]]:
        fetched = {}
        for key_id, data_key in self.keystore.data_keys(key_ids).items():
            key = SubjectKey(key_id, data_key) if data_key else None
            fetched[key_id] = (key, key.aead if key else None)
        return fetched

    def data_keys(self, key_ids) -> dict[str, tuple[SubjectKey | None, AESGCM | None]]:
        """Keys by key id, as ``(key, aead)``, ``(None, None)`` where the key is gone; misses cost one batch."""
        return self._cached(self._keys, key_ids, self._fetch_data_keys)

    def lookup(self, subject_ids) -> dict[str, tuple[SubjectKey | None, AESGCM | None]]:
        """Keys for a batch of subjects, created for new ones, ``(None, None)`` for forgotten ones."""
        key_ids = self._cached(self._key_ids, subject_ids, self.keystore.subject_key_ids)
        keys = self.data_keys(k for k in key_ids.values() if k)
        return {subject: keys[k] if k else (None, None) for subject, k in key_ids.items()}


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    """Where keys live and what wraps them; picklable, so workers open their own keystore."""

    keystore: str
    local_key_file: str | None = None
    kms_key: str | None = None
    cache_ttl_seconds: float = 300

    def open(self, create: bool = True) -> Keystore:
        """The keystore; without ``create``, ``KeysNotFound`` unless it and a local KEK already exist."""
        return open_keystore(self.keystore, key_encryption_key(self.local_key_file, self.kms_key, create), create)


def add_key_arguments(parser) -> None:
    """The keystore and key-encryption-key flags, shared by every job that touches personal data."""
    group = parser.add_argument_group("keys")
    group.add_argument(
        "--keystore",
        default=DEFAULT_KEYSTORE,
        help=f"Subject keys: sqlite:///<path> (embedded) or bigtable://<project>/<instance>/<table>. "
        f"Default: {DEFAULT_KEYSTORE}",
    )
    group.add_argument(
        "--local_key_file",
        default=DEFAULT_KEY_FILE,
        help=f"Key-encryption key for local runs, created on first use. Default: {DEFAULT_KEY_FILE}",
    )
    group.add_argument(
        "--kms_key",
        help="Cloud KMS key that wraps data keys in production (projects/.../cryptoKeys/...); "
        "overrides --local_key_file.",
    )
    group.add_argument(
        "--key_cache_ttl_seconds",
        type=float,
        default=300,
        help="How long a worker caches a subject's key: the upper bound on how long a forgotten "
        "key can still be used. Default: 300.",
    )


def key_config_from_args(args) -> KeyConfig:
    if args.key_cache_ttl_seconds < 0:
        raise ValueError("key_cache_ttl_seconds must not be negative")
    return KeyConfig(args.keystore, args.local_key_file, args.kms_key, args.key_cache_ttl_seconds)
