"""Where keys live and what wraps them: the keystore URL, the KEK, the cache TTL, and their flags."""

from __future__ import annotations

import dataclasses
import urllib.parse

from event_delivery.cloud import clients, preflight
from event_delivery.keys.bigtable import BigtableKeystore
from event_delivery.keys.kek import KeyEncryptionKey, KeysNotFound, key_encryption_key
from event_delivery.keys.keystore import PSEUDONYM_KEY, Keystore
from event_delivery.keys.sqlite import SqliteKeystore

DEFAULT_KEYSTORE = "sqlite:///.keys/keystore.db"
DEFAULT_KEY_FILE = ".keys/kek.key"
MAX_KEY_CACHE_TTL_SECONDS = 3600


def keystore_location(url: str) -> tuple[str, ...]:
    """``("sqlite", path)`` or ``("bigtable", project, instance, table)``; ValueError for any other URL.

    A SQLite URL must name a file: without one (``sqlite://``, ``sqlite:///``, ``:memory:``) each
    process would open a keystore of its own in memory, and what it sealed would outlive its keys.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "sqlite":
        # As in SQLAlchemy: sqlite:///relative/path and sqlite:////absolute/path.
        path = parsed.path[1:]
        if parsed.netloc or not path.strip("/") or path == ":memory:":
            raise ValueError(
                f"the keystore {url!r} names no file: use sqlite:///relative/path or sqlite:////absolute/path "
                "(an in-memory keystore would lose every key when its process ends)"
            )
        return ("sqlite", path)
    if parsed.scheme == "bigtable":
        parts = [parsed.netloc, *parsed.path.strip("/").split("/")]
        if len(parts) != 3 or not all(parts):
            raise ValueError("a Bigtable keystore is bigtable://<project>/<instance>/<table>")
        return ("bigtable", *parts)
    raise ValueError(f"unknown keystore {url!r}: use sqlite:///path or bigtable://project/instance/table")


def open_keystore(url: str, kek: KeyEncryptionKey, create: bool = False) -> Keystore:
    """``sqlite:///relative/keys.db``, ``sqlite:////absolute/keys.db`` or ``bigtable://project/instance/table``.

    Only provisioning and test setup pass ``create``: everything else opens what exists, or stops.
    """
    kind, *where = keystore_location(url)
    backend = SqliteKeystore if kind == "sqlite" else BigtableKeystore
    return backend(kek, *where, create)


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    """Where keys live and what wraps them; picklable, so workers open their own keystore."""

    keystore: str
    local_key_file: str | None = None
    kms_key: str | None = None
    cache_ttl_seconds: float = 300

    def open(self, create: bool = False) -> Keystore:
        """The keystore, wrapped by its KEK; ``KeysNotFound`` unless both exist. ``create`` is for
        provisioning only (``provision``)."""
        return open_keystore(self.keystore, key_encryption_key(self.local_key_file, self.kms_key, create), create)

    def check(self) -> Keystore:
        """The keystore, once it and its KEK are known to exist: what a job or tool checks before it
        starts, so a missing one is one clear ``KeysNotFound`` rather than a failing worker."""
        keystore = self.open()
        keystore.kek.check()
        keystore.check()
        return keystore

    def preflight(self) -> Keystore:
        """``check``, at a command's start: a keystore or KEK that is missing, or out of reach, is one
        ``PreflightError`` saying what to fix, before any worker starts."""
        if self.keystore.startswith("bigtable://"):
            preflight.check_credentials(clients.BIGTABLE_EMULATOR_HOST, "Bigtable")
        if self.kms_key:
            preflight.check_credentials(None, "Cloud KMS")
        try:
            return self.check()
        except KeysNotFound as error:
            raise preflight.PreflightError(f"{error}, or check --keystore and --local_key_file (--kms_key)") from None

    def provision(self) -> Keystore:
        """Creates the KEK, the keystore and its pseudonym secret where they are missing, and keeps
        what exists (provisioning again changes nothing). For ``make provision`` and test setup."""
        keystore = self.open(create=True)
        keystore.check()
        keystore.named_key(PSEUDONYM_KEY)
        return keystore


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
        help=f"Key-encryption key for local runs, created by `make provision`. Default: {DEFAULT_KEY_FILE}",
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
        f"key can still be used. At most {MAX_KEY_CACHE_TTL_SECONDS}. Default: 300.",
    )


def key_config_from_args(args) -> KeyConfig:
    """The key flags as a ``KeyConfig``; ValueError (a command's exit code 2) for a keystore URL that
    names no keystore or a TTL out of bounds."""
    keystore_location(args.keystore)
    if not 0 <= args.key_cache_ttl_seconds <= MAX_KEY_CACHE_TTL_SECONDS:
        raise ValueError(
            f"key_cache_ttl_seconds must be between 0 and {MAX_KEY_CACHE_TTL_SECONDS}: "
            "it bounds how long a forgotten key can still be used"
        )
    return KeyConfig(args.keystore, args.local_key_file, args.kms_key, args.key_cache_ttl_seconds)
