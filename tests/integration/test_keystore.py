"""The keystore, on SQLite and on the Bigtable emulator: one key per subject, forget, concurrency."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import hmac
import itertools
import multiprocessing
import os
import pickle
import secrets
import sqlite3
import stat
import time
import uuid

import pytest
from cryptography.exceptions import InvalidTag

from event_delivery.contract.dead_letters import quarantine_key_name
from event_delivery.keys import bigtable as bigtable_backend
from event_delivery.keys import cache as cache_module
from event_delivery.keys import sqlite as sqlite_backend
from event_delivery.keys.bigtable import BigtableKeystore
from event_delivery.keys.cache import KeyCache
from event_delivery.keys.config import KeyConfig, open_keystore
from event_delivery.keys.kek import KeysNotFound, LocalKeyFile
from event_delivery.keys.keystore import PSEUDONYM_KEY, SubjectKey
from event_delivery.keys.rotation import REWRAP_LEASE, REWRAP_LEASE_SECONDS, RewrapCounts, RotationUnderWay
from event_delivery.keys.sqlite import SqliteKeystore
from event_delivery.keys.wrapped_keys import KEY_WRAPPING_MEMORY_SECONDS, new_key_id
from event_delivery.keys.wrapping import (
    KEY_WRAPPING_KEYS,
    KeyWrappingReplaced,
    NewKey,
    generation_name,
    generation_of,
    newest_generation,
    wrapping_key_id_of,
)
from pipelines.forget import sweep_quarantine_keys
from transforms.sealing import TRANSIENT, UNAVAILABLE, JobKeyCache


@pytest.fixture(params=["sqlite", pytest.param("bigtable", marks=pytest.mark.emulators)])
def keystore_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/keystore.db"
    request.getfixturevalue("bigtable_emulator")
    return f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kek(tmp_path):
    return LocalKeyFile(tmp_path / "kek.key", create=True)


def provisioned(url, kek):
    """A keystore as ``make provision`` leaves it (test setup, the one other place that creates one)."""
    keystore = open_keystore(url, kek, create=True)
    keystore.check()
    return keystore


class Died(Exception):
    """A process that dies at this point."""


def stop_after(keystore, step: int, methods: list[str]) -> None:
    """Makes the ``step``-th call among the keystore's ``methods`` die once it has done its work."""
    calls = itertools.count(1)
    for name in methods:

        def die_after(*args, _done=getattr(keystore, name)):
            result = _done(*args)
            if next(calls) == step:
                raise Died(f"stopped after step {step}")
            return result

        setattr(keystore, name, die_after)


def another_keystore(keystore_url: str, name: str) -> str:
    """The URL of one more keystore of the same backend as ``keystore_url``."""
    if keystore_url.startswith("sqlite"):
        return keystore_url.replace("keystore.db", f"{name}.db")
    return f"{keystore_url}-{name}"


def test_a_subject_gets_one_key_and_keeps_it(keystore_url, kek):
    keystore = provisioned(keystore_url, kek)
    first = keystore.subject_keys(["alice", "bob"])
    assert first["alice"].key_id != first["bob"].key_id
    assert len(first["alice"].data_key) == 32
    assert keystore.subject_keys(["alice"])["alice"] == first["alice"]
    reopened = open_keystore(keystore_url, LocalKeyFile(kek.path))
    assert reopened.subject_keys(["alice"])["alice"] == first["alice"]


def test_forget_deletes_the_key_and_never_creates_another(keystore_url, kek):
    keystore = provisioned(keystore_url, kek)
    key_id = keystore.subject_keys(["alice", "bob"])["alice"].key_id
    assert keystore.forget("alice") is True
    assert keystore.data_keys([key_id]) == {key_id: None}, "the wrapped key itself is gone"
    assert keystore.subject_keys(["alice"]) == {"alice": None}
    assert keystore.subject_keys(["alice"]) == {"alice": None}, "still no key after asking twice"
    key_ids = keystore.subject_key_ids(["alice", "bob"])
    assert key_ids["alice"] is None and key_ids["bob"] is not None, "the tombstone: asking makes no key"
    assert keystore.subject_keys(["bob"])["bob"] is not None
    assert keystore.forget("carol") is False, "an unknown subject is tombstoned ahead of time"
    assert keystore.subject_keys(["carol"]) == {"carol": None}


def test_a_subject_has_a_key_of_its_own_in_each_type_and_forget_deletes_every_one(keystore_url, kek):
    keystore = provisioned(keystore_url, kek)
    legacy = keystore.subject_keys(["alice"])["alice"]  # unscoped, as keys were made before types had their own
    play = keystore.subject_keys(["alice", "bob"], scope="play")
    search = keystore.subject_keys(["alice"], scope="search")["alice"]
    assert len({legacy.key_id, play["alice"].key_id, search.key_id}) == 3, "one key id per type"
    assert keystore.subject_keys(["alice"], scope="play")["alice"] == play["alice"]
    assert len({keystore.pseudonym("alice", scope) for scope in (None, "play", "search")}) == 3, "rows unlinkable"
    alices = sorted([legacy.key_id, play["alice"].key_id, search.key_id])
    assert keystore.key_ids_of("alice") == alices
    assert set(keystore.named_keys(PSEUDONYM_KEY)) == {
        PSEUDONYM_KEY,
        f"{PSEUDONYM_KEY}/play",
        f"{PSEUDONYM_KEY}/search",
    }

    assert keystore.forget("alice") is True
    assert keystore.data_keys(alices) == dict.fromkeys(alices), "every type's key and the unscoped one are gone"
    assert keystore.subject_key_ids(["alice"]) == {"alice": None} and keystore.key_ids_of("alice") == []
    assert keystore.subject_keys(["alice"], scope="play") == {"alice": None}
    assert keystore.subject_keys(["alice", "bob"], scope="page_view")["alice"] is None, "no key in a type met later"
    assert keystore.key_ids_of("alice") == [], "nor any key row"
    assert keystore.subject_keys(["bob"], scope="play", create=False) == {"bob": play["bob"]}
    assert keystore.subject_keys(["bob"], scope="page_view", create=False)["bob"] is not None


def test_forget_of_a_subject_never_seen_leaves_no_key_to_make_in_any_type(keystore_url, kek):
    keystore = provisioned(keystore_url, kek)
    keystore.subject_keys(["bob"], scope="play")
    assert keystore.forget("carol") is False
    assert keystore.subject_keys(["carol"], scope="play") == {"carol": None}
    assert keystore.subject_keys(["carol"], scope="search") == {"carol": None}
    assert keystore.key_ids_of("carol") == []


SCOPES = ("play", "search", "page_view")


def forgotten_everywhere(keystore, subject: str, key_ids: list[str]) -> bool:
    """Whether no key of ``subject`` is stored, listed or served, in any type, nor made anew."""
    cache = KeyCache(keystore, "play", ttl_seconds=60)  # a job's lookup, which misses its cache
    return (
        keystore.data_keys(key_ids) == dict.fromkeys(key_ids)
        and keystore.key_ids_of(subject) == []
        and all(keystore.subject_keys([subject], scope=s) == {subject: None} for s in (None, *SCOPES, "new_type"))
        and cache.lookup([subject])[subject] == (None, None)
    )


@pytest.mark.parametrize("finish", ["forget again", "sweep"])
def test_a_forget_stopped_after_any_step_is_finished_by_running_it_again_or_by_the_sweep(
    keystore_url, tmp_path, finish
):
    """Steps: record the work, the unscoped tombstone, each type's key and tombstone, drop the
    record, purge the backend's log. From the tombstone on, lookups treat the subject as forgotten,
    whatever keys are left."""
    for step in itertools.count(1):
        url, kek = another_keystore(keystore_url, f"f{step}"), LocalKeyFile(tmp_path / f"kek-{step}", create=True)
        keystore = provisioned(url, kek)
        alices = [keystore.subject_keys(["alice"])["alice"].key_id]  # unscoped, from before types had keys
        alices += [keystore.subject_keys(["alice", "bob"], scope=s)["alice"].key_id for s in SCOPES]
        bobs = {s: keystore.subject_keys(["bob"], scope=s, create=False)["bob"] for s in SCOPES}
        stop_after(keystore, step, ["_record_forget", "_forget", "_forget_done", "_purge_deleted"])
        completed = True
        try:
            keystore.forget("alice")
        except Died:
            completed = False
        after = open_keystore(url, LocalKeyFile(kek.path))  # another process
        if after.subject_key_ids(["alice"])["alice"] is None:  # tombstoned (else its unscoped key is still there)
            served = [s for s in SCOPES if after.subject_key_ids(["alice"], scope=s, create=False)["alice"]]
            assert served == [], f"stopped after step {step}: the tombstone decides"
        if finish == "sweep":
            after.sweep_orphans()
        else:
            after.forget("alice")
        assert forgotten_everywhere(after, "alice", alices), f"stopped after step {step}"
        assert {s: after.subject_keys(["bob"], scope=s, create=False)["bob"] for s in SCOPES} == bobs
        if completed:
            break
    assert step == 8, "it stopped after each of 7 steps: record, tombstone, three types, drop the record, purge"


def _race(url, key_file, subjects, start_line, queue):
    keystore = open_keystore(url, LocalKeyFile(key_file, create=False))
    keystore.pseudonym("warm-up")  # open connections before the start line
    start_line.wait()
    queue.put({s: k.key_id for s, k in keystore.subject_keys(subjects).items()})


def test_concurrent_workers_meeting_new_subjects_agree_on_one_key(keystore_url, kek):
    subjects = [f"subject-{i}" for i in range(150)]
    provisioned(keystore_url, kek).named_key("warm-up")  # table and pseudonym secret exist before the race
    context = multiprocessing.get_context("spawn")
    # A worker that never reaches the start line breaks it for the others instead of holding them forever.
    queue, start_line = context.Queue(), context.Barrier(4, timeout=120)
    workers = [
        context.Process(target=_race, args=(keystore_url, str(kek.path), subjects, start_line, queue)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    try:
        seen = [queue.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(10)
            worker.kill()  # a stuck worker would otherwise keep pytest waiting for it at exit
    assert all(view == seen[0] for view in seen)
    keystore = open_keystore(keystore_url, kek)
    key_ids = list(seen[0].values())
    assert len(set(key_ids)) == len(subjects)
    assert all(keystore.data_keys(key_ids).values()), "every winning key is stored"


def test_a_wrapped_key_only_unwraps_under_its_own_key_id(tmp_path, kek):
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    keys = keystore.subject_keys(["alice", "bob"])
    wrapped = keystore._read_wrapped_keys([keys["alice"].key_id])[keys["alice"].key_id]
    assert keystore._unwrap_key(keys["alice"].key_id, wrapped) == keys["alice"].data_key
    with pytest.raises(InvalidTag):
        keystore._unwrap_key(keys["bob"].key_id, wrapped)
    altered = wrapped[:1] + bytes([wrapped[1] ^ 1]) + wrapped[2:]  # names another key-wrapping key
    with pytest.raises(KeysNotFound):
        keystore._unwrap_key(keys["alice"].key_id, altered)


def test_the_keystore_holds_no_subject_id_and_no_clear_key(tmp_path, kek):
    path = tmp_path / "keys.db"
    keystore = SqliteKeystore(kek, str(path), create=True)
    key = keystore.subject_keys(["subject-4f1d9e"])["subject-4f1d9e"]
    keystore._connection.execute("PRAGMA wal_checkpoint(FULL)")
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))
    assert b"subject-4f1d9e" not in stored
    assert key.data_key not in stored


def test_the_cache_serves_a_forgotten_key_until_its_ttl(tmp_path, kek):
    now = [0.0]
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    cache = KeyCache(keystore, "search", ttl_seconds=60, clock=lambda: now[0])
    key, _ = cache.lookup(["alice"])["alice"]
    keystore.forget("alice")
    now[0] = 59
    assert cache.lookup(["alice"])["alice"][0] == key
    now[0] = 61
    assert cache.lookup(["alice"])["alice"] == (None, None)


def test_the_cache_batches_misses_into_one_keystore_call(tmp_path, kek):
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    calls = []
    original = keystore.subject_key_ids
    keystore.subject_key_ids = lambda subjects, create=True, scope=None: (
        calls.append(list(subjects)) or original(subjects, create, scope)
    )
    cache = KeyCache(keystore, "search", ttl_seconds=60)
    cache.lookup(["a", "b", "c", "a"])
    cache.lookup(["a", "b", "d"])
    assert [sorted(c) for c in calls] == [["a", "b", "c"], ["d"]]


def test_a_pseudonym_is_hmac_sha256_of_the_subject_id_so_existing_keystores_stay_readable(tmp_path, kek):
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    secret = keystore.named_key(PSEUDONYM_KEY).data_key
    for subject in ("alice", "user-00042", "zoë", ""):
        assert keystore.pseudonym(subject) == hmac.new(secret, subject.encode(), hashlib.sha256).hexdigest()[:32]
    keystore.pseudonym("alice", "play")
    play = keystore.named_key(f"{PSEUDONYM_KEY}/play").data_key
    assert play != secret, "a type's pseudonyms have a secret of their own"
    assert keystore.pseudonym("alice", "play") == hmac.new(play, b"alice", hashlib.sha256).hexdigest()[:32]


def test_a_key_read_by_key_id_serves_a_later_lookup_by_subject(tmp_path, kek):
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    key = keystore.subject_keys(["alice"], scope="search")["alice"]
    reads = []
    original = keystore.data_keys
    keystore.data_keys = lambda key_ids: reads.append(sorted(key_ids)) or original(key_ids)
    cache = KeyCache(keystore, "search", ttl_seconds=60)
    assert cache.data_keys([key.key_id])[key.key_id][0] == key
    assert cache.lookup(["alice"])["alice"][0] == key
    assert reads == [[key.key_id]], "the subject's key came from the cache"


def test_a_forgotten_key_read_by_key_id_is_gone_after_the_ttl(tmp_path, kek):
    now = [0.0]
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    key_id = keystore.subject_keys(["alice"], scope="search")["alice"].key_id
    cache = KeyCache(keystore, "search", ttl_seconds=60, clock=lambda: now[0])
    assert cache.data_keys([key_id])[key_id][0] is not None
    keystore.forget("alice")
    now[0] = 61
    assert cache.data_keys([key_id])[key_id] == (None, None)
    assert cache.lookup(["alice"])["alice"] == (None, None)


def test_a_forgotten_key_leaves_the_workers_memory_at_the_caches_next_use_after_its_ttl(tmp_path, kek):
    now = [0.0]
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    cache = KeyCache(keystore, "search", ttl_seconds=60, clock=lambda: now[0])
    alice, _ = cache.lookup(["alice", "bob"])["alice"]
    keystore.forget("alice")
    now[0] = 30
    carol, _ = cache.lookup(["carol"])["carol"]
    now[0] = 61
    cache.lookup(["carol"])  # served from the cache: nothing else is fetched
    assert set(cache._key_ids) == {"carol"} and set(cache._keys) == {carol.key_id}, "alice's and bob's went"
    assert alice.data_key not in [key.data_key for _, (key, _) in cache._keys.values() if key]
    now[0] = 91
    assert cache.lookup(["carol"])["carol"][0] == carol, "fetched again once its own TTL passed"
    assert len(cache._expiring) == 2, "carol's key id and key, each queued once per fetch"


def test_the_cache_holds_at_most_max_entries_dropping_the_oldest_before_their_ttl(tmp_path, kek, monkeypatch):
    monkeypatch.setattr(cache_module, "MAX_ENTRIES", 4)
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    cache = KeyCache(keystore, "search", ttl_seconds=3600, clock=lambda: 0.0)
    keys = {s: cache.lookup([s])[s][0] for s in ["alice", "bob", "carol", "dave", "erin"]}
    assert len(cache._expiring) <= 4 and len(cache._key_ids) + len(cache._keys) <= 4
    assert set(cache._key_ids) == {"dave", "erin"}, "the newest stay, none of them expired"
    assert cache.lookup(["alice"])["alice"][0] == keys["alice"], "a dropped one is fetched again"


def test_the_cache_reads_each_named_key_once_and_each_name_is_a_key_of_its_own(tmp_path, kek):
    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    read, named_key = [], keystore.named_key
    keystore.named_key = lambda name: read.append(name) or named_key(name)
    cache = KeyCache(keystore, "search", ttl_seconds=60)
    days = [quarantine_key_name("search", day * 86_400_000) for day in (5, 6)]
    served = [cache.named_key(name) for name in days + days]
    assert read == days, "one keystore read per name for the worker's life"
    assert served[:2] == served[2:] and served[0][0] != served[1][0]
    assert [key.key_id for key, _ in served[:2]] == [named_key(name).key_id for name in days]


def test_the_newest_generation_of_a_months_key_wrapping_key_is_the_highest_number_not_the_last_name():
    month = KEY_WRAPPING_KEYS + "2026-12"
    names = {month: "k0", month + "/1": "k1", month + "/10": "k10", month + "/9": "k9"}  # in name order
    assert newest_generation(names) == (month + "/10", "k10")
    assert [generation_of(name) for name in names] == [("2026-12", n) for n in (0, 1, 10, 9)]
    assert generation_name("2026-12", 0) == month and generation_name("2026-12", 10) == month + "/10"


def test_the_cache_survives_another_thread_emptying_its_expiry_queue_as_it_looks(tmp_path, kek):
    class EmptiedAsRead(collections.deque):
        def __getitem__(self, index):
            self.clear()  # another thread's eviction, between the length check and the read
            return super().__getitem__(index)

    keystore = SqliteKeystore(kek, str(tmp_path / "keys.db"), create=True)
    cache = KeyCache(keystore, "search", ttl_seconds=60)
    cache._expiring = EmptiedAsRead([(0.0, {}, "gone")])
    assert cache.lookup(["alice"])["alice"][0] is not None


def test_steps_of_one_job_share_a_cache_and_another_job_gets_its_own(tmp_path):
    keys = KeyConfig(f"sqlite:///{tmp_path}/keys.db", str(tmp_path / "kek.key"))
    keys.provision()
    job, other_job = JobKeyCache(keys, "search"), JobKeyCache(keys, "search")
    step = pickle.loads(pickle.dumps(job))  # as a worker receives it
    assert step.acquire() is job.acquire()
    assert other_job.acquire() is not job.acquire()


def test_sqlite_urls_take_relative_and_absolute_paths(tmp_path, monkeypatch, kek):
    monkeypatch.chdir(tmp_path)
    open_keystore("sqlite:///keys/relative.db", kek, create=True).subject_keys(["alice"])
    assert (tmp_path / "keys" / "relative.db").exists()
    open_keystore(f"sqlite:///{tmp_path}/absolute.db", kek, create=True).subject_keys(["alice"])
    assert (tmp_path / "absolute.db").exists()


def test_bigtable_and_sqlite_urls():
    assert isinstance(open_keystore("bigtable://p/i/t", None), BigtableKeystore)
    with pytest.raises(ValueError, match="bigtable://"):
        open_keystore("bigtable://p/i", None)
    with pytest.raises(ValueError, match="unknown keystore"):
        open_keystore("redis://x", None)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://keys.db", "sqlite:////"])
def test_a_sqlite_keystore_must_name_a_file_not_memory_a_process_loses(url, kek):
    with pytest.raises(ValueError, match="names no file"):
        open_keystore(url, kek, create=True)
    with pytest.raises(ValueError, match="names no file"):
        KeyConfig(url, str(kek.path)).check()


def test_after_forget_the_wrapped_key_is_in_no_file_of_the_keystore(tmp_path, kek):
    """WAL mode keeps the frame that wrote a key until a truncating checkpoint; secure_delete alone is not enough."""
    url = f"sqlite:///{tmp_path}/keys/keystore.db"
    keystore = provisioned(url, kek)
    reader = open_keystore(url, kek)  # another connection, as a running job holds one
    keystore.subject_keys(["alice", "bob"])
    key_id = keystore.subject_key_ids(["alice"])["alice"]
    wrapped = keystore._read_wrapped_keys([key_id])[key_id]
    reader.subject_keys(["bob"])
    keystore_files = lambda: [p for p in (tmp_path / "keys").iterdir() if p.name.startswith("keystore.db")]  # noqa: E731
    assert any(wrapped in p.read_bytes() for p in keystore_files()), "the scan can see a stored key"

    assert keystore.forget("alice")
    assert not [p.name for p in keystore_files() if wrapped in p.read_bytes()]
    assert reader.subject_keys(["bob"], create=False)["bob"], "others' keys stay readable"


def test_a_reader_holding_the_sqlite_log_delays_only_forgets_last_step(tmp_path, kek):
    """The log is emptied once, after every deletion: a reader that keeps it from being emptied
    fails the forget with every key already deleted, and forget run again empties it."""
    url = f"sqlite:///{tmp_path}/keys/keystore.db"
    keystore = provisioned(url, kek)
    alices = [keystore.subject_keys(["alice", "bob"], scope=s)["alice"].key_id for s in SCOPES]
    wrapped = keystore._read_wrapped_keys(alices)
    keystore._connection.execute("PRAGMA busy_timeout = 50")
    reader = open_keystore(url, kek)  # a job's connection, in the middle of a read
    reader._connection.execute("BEGIN")
    reader._connection.execute("SELECT count(*) FROM data_keys").fetchone()

    with pytest.raises(sqlite3.OperationalError, match="run forget again"):
        keystore.forget("alice")
    assert keystore.data_keys(alices) == dict.fromkeys(alices), "every type's key is deleted"
    assert keystore._pending_forgets() == {}
    reader._connection.execute("COMMIT")
    assert keystore.forget("alice") is False
    files = [p for p in (tmp_path / "keys").iterdir() if p.name.startswith("keystore.db")]
    assert not [p.name for p in files for w in wrapped.values() if w in p.read_bytes()]
    assert reader.subject_keys(["bob"], scope="play", create=False)["bob"] is not None


@pytest.fixture
def open_umask():
    """The umask most systems default to, which leaves new files readable by all."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(folder) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def test_the_keys_folder_and_the_keystore_files_are_readable_by_their_owner_alone(tmp_path, open_umask):
    LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)
    keystore = open_keystore(f"sqlite:///{tmp_path}/store/keystore.db", None, create=True)
    keystore._connection.execute("CREATE TABLE written (x)")  # the log and its index exist
    assert modes(tmp_path / "keys") == {"keys": 0o700, "kek.key": 0o600}
    private = {"keystore.db": 0o600, "keystore.db-wal": 0o600, "keystore.db-shm": 0o600}
    assert modes(tmp_path / "store") == {"store": 0o700, **private}


def test_an_existing_keys_folder_and_keystore_are_closed_when_opened(tmp_path, kek, open_umask):
    url = f"sqlite:///{tmp_path}/keys/keystore.db"
    provisioned(url, kek).subject_keys(["alice"])
    for path in (tmp_path / "keys").iterdir():
        path.chmod(0o644)  # as keystores were made before, or copied in
    (tmp_path / "keys").chmod(0o755)
    LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)  # provisioning again
    open_keystore(url, kek).subject_keys(["alice"])
    private = {"kek.key": 0o600, "keystore.db": 0o600, "keystore.db-wal": 0o600, "keystore.db-shm": 0o600}
    assert modes(tmp_path / "keys") == {"keys": 0o700, **private}


def test_a_keystore_in_the_working_folder_leaves_the_folder_open(tmp_path, monkeypatch, kek, open_umask):
    """The working folder (or /tmp) is not a folder of keys: closing it would lock out its other uses."""
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    monkeypatch.chdir(work)
    open_keystore("sqlite:///keystore.db", kek, create=True).subject_keys(["alice"])
    assert modes(work)["work"] == 0o755 and modes(work)["keystore.db"] == 0o600


def _forget_or_claim(url, key_file, subjects, action, scope, start_line, queue):
    keystore = open_keystore(url, LocalKeyFile(key_file, create=False))
    keystore.pseudonym("warm-up")  # the type's own secret is made in the race, by the first claim
    for subject in subjects:
        start_line.wait()  # every subject is raced afresh: the four meet it at once
        keystore.forget(subject) if action == "forget" else keystore.subject_keys([subject], scope=scope)
    queue.put(action)


@pytest.mark.emulators
@pytest.mark.parametrize("scope", [None, "play"])
def test_a_key_claimed_while_forget_runs_is_erased_too(bigtable_emulator, tmp_path, kek, scope):
    """First sight and forget of the same subjects race in four processes: every subject ends
    forgotten, and no data key is left that nothing points to (a readable orphan), whether the
    claims are in a type's scope (made during the race) or unscoped."""
    url = f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}"
    keystore = provisioned(url, kek)
    keystore.named_key("warm-up")
    subjects = [f"subject-{i}" for i in range(120)]
    context = multiprocessing.get_context("spawn")
    queue, start_line = context.Queue(), context.Barrier(4, timeout=120)
    actions = ["forget", "claim", "forget", "claim"]
    workers = [
        context.Process(target=_forget_or_claim, args=(url, str(kek.path), subjects, a, scope, start_line, queue))
        for a in actions
    ]
    for worker in workers:
        worker.start()
    try:
        assert sorted(queue.get(timeout=180) for _ in workers) == sorted(actions)
    finally:
        for worker in workers:
            worker.join(10)
            worker.kill()
    assert set(keystore.subject_key_ids(subjects).values()) == {None}, "tombstoned: asking makes no key"
    assert not [s for s in subjects if keystore.key_ids_of(s)]
    named = [row.row_key for row in keystore.table.read_rows(start_key=b"n#", end_key=b"n$")]
    keys = [row.row_key for row in keystore.table.read_rows(start_key=b"d#", end_key=b"d$")]
    assert len(keys) == len(named), "the only keys left are the named ones"


@pytest.mark.emulators
def test_a_forget_interrupted_after_its_tombstone_finishes_when_run_again(bigtable_emulator, kek, monkeypatch):
    keystore = provisioned(f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}", kek)
    key_id = keystore.subject_keys(["alice"])["alice"].key_id
    delete_rows = keystore._delete_rows
    monkeypatch.setattr(keystore, "_delete_rows", lambda keys: (_ for _ in ()).throw(OSError("worker died")))
    with pytest.raises(OSError):
        keystore.forget("alice")
    assert keystore.subject_key_ids(["alice"]) == {"alice": None}, "the tombstone stands: no key is used or made"
    assert keystore.subject_keys(["alice"]) == {"alice": None}

    monkeypatch.setattr(keystore, "_delete_rows", delete_rows)
    assert keystore.forget("alice") is True, "the retry finds the key id the tombstone kept"
    assert keystore.data_keys([key_id]) == {key_id: None}


@pytest.mark.emulators
def test_forget_fails_when_bigtable_refuses_the_deletion(bigtable_emulator, kek, monkeypatch):
    from google.rpc import status_pb2

    keystore = provisioned(f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}", kek)
    key_id = keystore.subject_keys(["alice"])["alice"].key_id
    refused = [status_pb2.Status(code=14, message="unavailable")]
    monkeypatch.setattr(keystore.table, "mutate_rows", lambda rows: refused)
    with pytest.raises(RuntimeError, match="Bigtable refused a key deletion: unavailable"):
        keystore.forget("alice")
    monkeypatch.undo()
    assert keystore.data_keys([key_id])[key_id] is not None, "nothing claims an erasure that did not happen"


# Keys are created by provisioning only.


@pytest.fixture
def key_config(keystore_url, tmp_path):
    return KeyConfig(keystore_url, str(tmp_path / "keys" / "kek.key"))


def _table_exists(url: str) -> bool:
    from google.cloud import bigtable

    project, instance, table = url.removeprefix("bigtable://").split("/")
    return bigtable.Client(project=project, admin=True).instance(instance).table(table).exists()


def test_jobs_and_tools_open_only_the_keys_provisioning_made(key_config, tmp_path):
    with pytest.raises(KeysNotFound, match="no key-encryption key file .* `make provision`"):
        key_config.check()
    with pytest.raises(KeysNotFound):
        JobKeyCache(key_config, "search").acquire()
    assert not (tmp_path / "keys").exists(), "nothing was created"

    LocalKeyFile(key_config.local_key_file, create=True)
    with pytest.raises(KeysNotFound, match="no keystore .* `make provision`"):
        key_config.check()
    with pytest.raises(KeysNotFound):  # a job: when its first bundle looks a key up
        JobKeyCache(key_config, "search").acquire().lookup(["alice"])
    if key_config.keystore.startswith("sqlite"):
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["kek.key"]
    else:
        assert not _table_exists(key_config.keystore)

    kek_file = (tmp_path / "keys" / "kek.key").read_bytes()
    provisioned_keystore = key_config.provision()
    pseudonym = provisioned_keystore.pseudonym("alice")
    assert not provisioned_keystore.holds_subjects(), "a keystore only provisioned holds no subject yet"
    again = key_config.provision()
    assert (tmp_path / "keys" / "kek.key").read_bytes() == kek_file, "provisioning again keeps the KEK"
    assert again.pseudonym("alice") == pseudonym, "and the pseudonym secret"
    key = JobKeyCache(key_config, "search").acquire().lookup(["alice"])["alice"][0]
    assert key_config.check().subject_keys(["alice"], create=False, scope="search")["alice"] == key


def test_make_provision_creates_the_keystore_and_the_kek(key_config, monkeypatch, capsys):
    from tools.ops import provision

    monkeypatch.setattr(provision, "apply_plan", lambda *args: [])  # topics, buckets, Bigtable: not this test's
    args = ["--project", "local-project", "--keystore", key_config.keystore]
    assert provision.main([*args, "--local_key_file", key_config.local_key_file]) == 0
    assert f"keystore {key_config.keystore}, key-encryption key {key_config.local_key_file}" in capsys.readouterr().out
    assert key_config.check().named_key(PSEUDONYM_KEY)


# Rotation: new key-wrapping keys, every data key re-wrapped, the old ones deleted; then the KEK version destroyed.


def stored_copy(keystore) -> dict[str, bytes]:
    """Every stored key, wrapped: what a copy of the keystore (a backup, a snapshot, a file) holds."""
    return {key_id: wrapped for batch in keystore._scan_wrapped_keys() for key_id, wrapped in batch}


def assert_revoked(copy: dict[str, bytes], url: str, kek_path, *processes) -> None:
    """No data key of ``copy`` unwraps: not with the key-wrapping keys the live keystore holds, not
    with the copy's own, and not with those still in the memory of ``processes``."""
    live = open_keystore(url, LocalKeyFile(kek_path))
    restored = open_keystore(url, LocalKeyFile(kek_path))
    restored._read_wrapped_keys = lambda key_ids: {k: copy[k] for k in key_ids if k in copy}
    data_keys = {key_id: wrapped for key_id, wrapped in copy.items() if wrapping_key_id_of(wrapped)}
    assert data_keys, "the copy holds data keys wrapped by a key-wrapping key"
    for keystore in (live, restored, *processes):
        for key_id, wrapped in data_keys.items():
            with pytest.raises(KeysNotFound):
                keystore._unwrap_key(key_id, wrapped)


def test_a_rotation_revokes_every_copy_of_the_keystore_taken_before_it(keystore_url, kek):
    keystore = provisioned(keystore_url, kek)
    before = keystore.subject_keys(["alice", "bob", "carol"])
    quarantine = keystore.named_key("quarantine/search")
    pseudonym = keystore.pseudonym("alice")
    keystore.forget("carol")
    copy = stored_copy(keystore)
    [old] = keystore.named_keys(KEY_WRAPPING_KEYS)
    assert keystore.kek_versions() == {1: 1}, "the KEK wraps one key: this month's key-wrapping key"

    assert kek.rotate() == 2
    assert keystore.rewrap() == RewrapCounts(rewrapped=4, retired=1), "alice, bob, pseudonyms, quarantine"
    assert list(keystore.named_keys(KEY_WRAPPING_KEYS)) == [f"{old}/1"], "a new generation; the old one deleted"
    assert keystore.kek_versions() == {2: 1}
    kek.destroy_version(1)

    reopened = open_keystore(keystore_url, LocalKeyFile(kek.path))  # a new process: nothing cached
    after = reopened.subject_keys(["alice", "bob", "carol"], create=False)
    assert after == {"alice": before["alice"], "bob": before["bob"], "carol": None}
    assert reopened.named_key("quarantine/search") == quarantine
    assert reopened.pseudonym("alice") == pseudonym
    assert reopened.forget("alice") is True
    assert reopened.subject_keys(["alice", "dave"])["alice"] is None
    assert reopened.subject_keys(["dave"], create=False)["dave"] is not None
    assert_revoked(copy, keystore_url, kek.path, keystore, reopened)


def test_a_rotation_stopped_after_any_step_leaves_every_key_readable_and_finishes_when_run_again(
    keystore_url, tmp_path, monkeypatch
):
    monkeypatch.setattr(sqlite_backend, "SCAN_BATCH", 2)  # a pass of several batches
    monkeypatch.setattr(bigtable_backend, "SCAN_BATCH", 2)
    january, february = 947_894_400, 950_572_800  # two months: two key-wrapping keys to replace
    subjects = ["alice", "bob", "carol", "dave"]
    for step in itertools.count(1):
        url, kek = another_keystore(keystore_url, f"r{step}"), LocalKeyFile(tmp_path / f"kek-{step}", create=True)
        keystore = provisioned(url, kek)
        keystore.clock = lambda: january
        keystore.subject_keys(subjects[:2], scope="play")
        keystore.clock = lambda: february
        keystore.subject_keys(subjects[2:], scope="play")
        before, copy = keystore.subject_keys(subjects, scope="play"), stored_copy(keystore)
        kek.rotate()
        stop_after(keystore, step, ["_named_key_id", "_replace_wrapped_keys", "_delete_named_key"])
        try:
            finished = keystore.rewrap()
        except Died:
            finished = None
        survivor = open_keystore(url, LocalKeyFile(kek.path))  # another process, once this one died
        assert survivor.subject_keys(subjects, scope="play", create=False) == before, f"stopped after step {step}"
        if finished is None:
            survivor.clock = lambda: february
            survivor.rewrap()
        kek.destroy_version(1)
        reader = open_keystore(url, LocalKeyFile(kek.path))
        assert reader.subject_keys(subjects, scope="play", create=False) == before, f"stopped after step {step}"
        assert_revoked(copy, url, kek.path, survivor)
        if finished is not None:
            break
    assert step > 10, "the runs stopped after each step: new keys, each batch of each pass, each deletion"


def test_a_job_stores_no_key_under_a_key_wrapping_key_a_rotation_replaced_and_forgets_that_one(keystore_url, kek):
    now = [time.time()]
    tool = provisioned(keystore_url, kek)
    job = open_keystore(keystore_url, kek)  # running: it wraps under the key-wrapping key it holds
    job.clock = lambda: now[0]
    alice = job.subject_keys(["alice"], scope="play")["alice"]
    copy = stored_copy(tool)
    kek.rotate()  # with Cloud KMS, the job's KEK knows the new version at once
    tool.rewrap()
    kek.destroy_version(1)

    erin = job.subject_keys(["erin"], scope="play")["erin"]
    day = job.named_key("quarantine/play/2026-01-01")
    other = open_keystore(keystore_url, LocalKeyFile(kek.path))
    assert other.subject_keys(["alice", "erin"], scope="play", create=False) == {"alice": alice, "erin": erin}
    assert other.named_key("quarantine/play/2026-01-01") == day
    [old_row] = [w for k, w in copy.items() if k == alice.key_id]
    assert job._unwrap_key(alice.key_id, old_row) == alice.data_key, "the job still holds the old one in memory"
    now[0] += KEY_WRAPPING_MEMORY_SECONDS
    assert job.subject_keys(["erin"], scope="play")["erin"] == erin
    assert list(job._key_wrapping_keys) == [tool.named_keys(KEY_WRAPPING_KEYS).popitem()[1]], "the new one alone"
    assert_revoked(copy, keystore_url, kek.path, job)


def rotation_during_another(keystore_url, kek, second) -> tuple[object, SubjectKey]:
    """A rotation that runs ``second(other)``, another process, between its read of the keys and
    its write of their new wrapping; returns that other process and a subject's key from before."""
    keystore = provisioned(keystore_url, kek)
    alice = keystore.subject_keys(["alice"], scope="play")["alice"]
    first, other = open_keystore(keystore_url, LocalKeyFile(kek.path)), open_keystore(keystore_url, kek)
    replace, ran = first._replace_wrapped_keys, []

    def other_runs_first(rewrapped):
        if not ran:
            ran.append(second(other))
        return replace(rewrapped)

    first._replace_wrapped_keys = other_runs_first
    first.rewrap()
    assert ran, "the other process ran during the rotation"
    return other, alice


def test_a_second_rotation_is_refused_while_one_holds_the_lease_and_runs_once_it_lapses(keystore_url, kek):
    def second_rotation(other):
        with pytest.raises(RotationUnderWay, match="one at a time"):
            other.rewrap()
        return True

    other, alice = rotation_during_another(keystore_url, kek, second_rotation)
    assert other.rewrap().retired == 1, "the lease is released when a rotation ends"
    now = time.time()
    assert other._take_lease(REWRAP_LEASE, "a run that died", now, now + REWRAP_LEASE_SECONDS)
    with pytest.raises(RotationUnderWay):
        other.rewrap()
    other.clock = lambda: now + REWRAP_LEASE_SECONDS + 1
    assert other.rewrap().retired == 1, "a dead run's lease lapses"
    reader = open_keystore(keystore_url, LocalKeyFile(kek.path))
    assert reader.subject_keys(["alice"], scope="play", create=False)["alice"] == alice


def test_a_rotation_never_overwrites_a_key_another_rewrapped_after_its_read(keystore_url, kek):
    """Two rotations at once (the lease bypassed): the second re-wraps under a newer key-wrapping
    key and deletes the first's; the first's write, from its read before, must not land."""

    def second_rotation_without_lease(other):
        other._take_lease = lambda *lease: True
        return other.rewrap()

    _, alice = rotation_during_another(keystore_url, kek, second_rotation_without_lease)
    reader = open_keystore(keystore_url, LocalKeyFile(kek.path))
    assert reader.subject_keys(["alice"], scope="play", create=False)["alice"] == alice


def test_a_new_key_under_a_newest_key_wrapping_key_that_no_longer_unwraps_is_unavailable(keystore_url, kek):
    """Not ``KeyWrappingReplaced``, which would be retried for ever: no rotation replaced it."""
    provisioned(keystore_url, kek).subject_keys(["alice"], scope="play")
    kek.rotate()
    kek.destroy_version(1)  # before any rewrap: this month's key-wrapping key no longer unwraps
    process = open_keystore(keystore_url, LocalKeyFile(kek.path))  # holds no key-wrapping key
    with pytest.raises(UNAVAILABLE) as raised:
        process.named_key("quarantine/play/2026-01-01")  # a new key, wrapped under the month's
    assert type(raised.value) is KeysNotFound


def test_a_key_wrapping_key_replaced_at_every_attempt_to_store_is_a_transient_error(tmp_path, kek, monkeypatch):
    keystore = provisioned(f"sqlite:///{tmp_path}/keystore.db", kek)

    def replaced_again(new):
        raise KeyWrappingReplaced("a rotation replaced it")

    monkeypatch.setattr(keystore, "_create_subjects", replaced_again)
    with pytest.raises(TRANSIENT):
        keystore.subject_keys(["bob"], scope="play")


def test_a_kms_outage_fails_no_key_a_process_holds_past_the_memory_period(keystore_url, kek, monkeypatch):
    now = [time.time()]
    job = provisioned(keystore_url, kek)
    job.clock = lambda: now[0]
    alice = job.subject_keys(["alice"], scope="play")["alice"]

    def kms_out_of_reach(*args):
        raise ConnectionError("KMS out of reach")

    monkeypatch.setattr(kek, "unwrap", kms_out_of_reach)
    now[0] += 3 * KEY_WRAPPING_MEMORY_SECONDS
    assert job.data_keys([alice.key_id]) == {alice.key_id: alice.data_key}, "read under the key held"
    assert job.subject_keys(["bob"], scope="play")["bob"] is not None, "made under the key held"


def test_one_thread_of_a_process_checks_the_key_wrapping_keys_it_holds(tmp_path, kek):
    now = [time.time()]
    job = provisioned(f"sqlite:///{tmp_path}/keystore.db", kek)
    job.clock = lambda: now[0]
    job.subject_keys(["alice"], scope="play")
    [held] = job.named_keys(KEY_WRAPPING_KEYS).values()
    reads, read = [], job._read_wrapped_keys

    def slow_read(key_ids):
        reads.append(key_ids)
        time.sleep(0.2)  # the other threads arrive while this check runs
        return read(key_ids)

    job._read_wrapped_keys = slow_read
    now[0] += KEY_WRAPPING_MEMORY_SECONDS
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        found = list(threads.map(lambda _: job._key_wrapping_key(held), range(4)))
    assert reads == [[held]], "one check, one keystore read"
    assert all(aead is found[0] for aead in found), "every thread used the key held"


def test_a_check_of_the_key_wrapping_keys_that_fails_keeps_them(tmp_path, kek):
    now = [time.time()]
    job = provisioned(f"sqlite:///{tmp_path}/keystore.db", kek)
    job.clock = lambda: now[0]
    job.subject_keys(["alice"], scope="play")
    [held] = job.named_keys(KEY_WRAPPING_KEYS).values()
    aead = job._key_wrapping_key(held)

    def keystore_out_of_reach(key_ids):
        raise ConnectionError("keystore out of reach")

    job._read_wrapped_keys = keystore_out_of_reach
    now[0] += KEY_WRAPPING_MEMORY_SECONDS
    assert job._key_wrapping_key(held) is aead


def store_as_before_the_hierarchy(keystore, subject: str) -> SubjectKey:
    """A subject whose data key the KEK wraps itself, as keys were stored before key-wrapping keys."""
    key = SubjectKey(new_key_id(), secrets.token_bytes(32))
    wrapped = keystore.kek.wrap(key.data_key, key.key_id.encode())
    keystore._create_subjects({keystore.pseudonym(subject): NewKey(key.key_id, wrapped)})
    return key


def test_a_rewrap_never_brings_back_a_key_forgotten_while_it_ran(keystore_url, kek, monkeypatch):
    keystore = provisioned(keystore_url, kek)
    alice = store_as_before_the_hierarchy(keystore, "alice")
    bob = store_as_before_the_hierarchy(keystore, "bob")
    assert keystore.subject_keys(["alice", "bob"], create=False) == {"alice": alice, "bob": bob}
    assert keystore.kek_versions() == {1: 3}, "alice's, bob's and the key-wrapping key (of the pseudonyms' secret)"
    kek.rotate()
    replace = keystore._replace_wrapped_keys

    def forget_first(rewrapped):
        keystore.forget("alice")  # lands between the rewrap's read and its write
        return replace(rewrapped)

    monkeypatch.setattr(keystore, "_replace_wrapped_keys", forget_first)
    assert keystore.rewrap() == RewrapCounts(rewrapped=2, retired=1, vanished=1), "the pseudonyms' and bob's"
    assert keystore.data_keys([alice.key_id]) == {alice.key_id: None}
    assert keystore.kek_versions() == {2: 2}
    assert keystore.subject_keys(["bob"], create=False)["bob"] == bob


# The orphan sweep.


def _data_key_ids(keystore) -> set[str]:
    return {key_id for batch in keystore._scan_wrapped_keys() for key_id, _ in batch}


@pytest.mark.emulators
def test_the_sweep_deletes_a_key_left_by_a_crash_between_key_and_pointer(bigtable_emulator, kek, monkeypatch):
    keystore = provisioned(f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}", kek)
    alice = keystore.subject_keys(["alice"])["alice"]
    named = {keystore.named_key(name).key_id for name in (PSEUDONYM_KEY, "quarantine/search")}
    named.add(keystore._current_wrapping().key_id)
    monkeypatch.setattr(keystore, "_claim", lambda *args: (_ for _ in ()).throw(OSError("worker died")))
    with pytest.raises(OSError):
        keystore.subject_keys(["bob"])
    monkeypatch.undo()
    [orphan] = _data_key_ids(keystore) - named - {alice.key_id}

    assert keystore.sweep_orphans() == 0, "a key younger than the grace may have a claim under way"
    assert orphan in _data_key_ids(keystore)
    assert keystore.sweep_orphans(grace_seconds=0) == 1
    assert _data_key_ids(keystore) == named | {alice.key_id}
    assert keystore.subject_keys(["alice"])["alice"] == alice
    assert keystore.subject_keys(["bob"])["bob"] is not None, "bob gets a key of his own later"


@pytest.mark.emulators
def test_the_sweep_finishes_a_forget_interrupted_after_its_tombstone(bigtable_emulator, kek, monkeypatch):
    keystore = provisioned(f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}", kek)
    key_id = keystore.subject_keys(["alice", "bob"])["alice"].key_id
    monkeypatch.setattr(keystore, "_delete_rows", lambda keys: (_ for _ in ()).throw(OSError("worker died")))
    with pytest.raises(OSError):
        keystore.forget("alice")
    monkeypatch.undo()

    assert keystore.sweep_orphans() == 1, "within the grace too: the subject is forgotten already"
    assert keystore.data_keys([key_id]) == {key_id: None}
    row_key = b"s#" + keystore.pseudonym("alice").encode()
    assert b"key_id" not in keystore._read_rows([row_key])[row_key], "the pointer is dropped too"
    assert keystore.subject_key_ids(["alice"]) == {"alice": None} and keystore.subject_keys(["bob"])["bob"] is not None


def test_the_sqlite_sweep_deletes_keys_nothing_points_to_and_leaves_no_copy(tmp_path, kek):
    keystore = provisioned(f"sqlite:///{tmp_path}/keys/keystore.db", kek)
    alice = keystore.subject_keys(["alice"])["alice"]
    kept = _data_key_ids(keystore)
    orphan = kek.wrap(b"o" * 32, b"orphan")  # no write path leaves one (a key and its pointer share a
    with keystore._transaction() as db:  # transaction), but a keystore copied or edited by hand can
        db.execute("INSERT INTO data_keys VALUES (?, ?)", ("orphan", orphan))
    keystore._connection.execute("PRAGMA wal_checkpoint(FULL)")

    assert keystore.sweep_orphans() == 1
    assert _data_key_ids(keystore) == kept
    assert not [p.name for p in (tmp_path / "keys").iterdir() if orphan in p.read_bytes()]
    assert keystore.subject_keys(["alice"])["alice"] == alice
    assert keystore.sweep_orphans() == 0


# Two tiers: a key-wrapping key per month wraps the data keys.


def test_each_month_gets_its_own_key_wrapping_key_and_older_keys_still_unwrap(keystore_url, kek):
    january, february = 947_894_400, 950_572_800  # 2000-01-15 and 2000-02-15, UTC; provisioning used today's
    keystore = provisioned(keystore_url, kek)
    keystore.clock = lambda: january
    alice = keystore.subject_keys(["alice"])["alice"]
    keystore.clock = lambda: february
    bob = keystore.subject_keys(["bob"])["bob"]
    wrapped = keystore._read_wrapped_keys([alice.key_id, bob.key_id])
    assert wrapped[alice.key_id][0] == wrapped[bob.key_id][0] == 2, "both wrapped in the process"
    by_month = {m: keystore.named_key(f"key-wrapping/2000-{m}").key_id for m in ("01", "02")}
    assert wrapped[alice.key_id][1:17].hex() == by_month["01"]
    assert wrapped[bob.key_id][1:17].hex() == by_month["02"]
    reopened = open_keystore(keystore_url, LocalKeyFile(kek.path))
    assert reopened.subject_keys(["alice", "bob"], create=False) == {"alice": alice, "bob": bob}
    assert keystore.kek_versions() == {1: 2}, "the KEK wraps the two months' key-wrapping keys only"


def test_an_existing_named_key_is_read_without_wrapping_a_new_one(keystore_url, kek, monkeypatch):
    keystore = provisioned(keystore_url, kek)
    key = keystore.named_key("quarantine/search")
    wraps, wrap = [], keystore._wrap_key
    monkeypatch.setattr(keystore, "_wrap_key", lambda *args: wraps.append(args) or wrap(*args))
    assert keystore.named_key("quarantine/search") == key
    assert wraps == []
    assert keystore.named_key("quarantine/play") != key and len(wraps) == 1


# Quarantine keys: one per type and day, deleted once the day is past the retention.


def test_quarantine_keys_of_days_past_the_retention_are_deleted_and_the_rest_kept(keystore_url, kek):
    keystore = provisioned(keystore_url, kek)
    now = 951_782_400  # 2000-02-29T00:00Z
    day = 24 * 3600
    by_day = {
        offset: keystore.named_key(quarantine_key_name("search", (now - offset * day) * 1000))
        for offset in (0, 30, 31, 32)
    }
    legacy = keystore.named_key("quarantine/search")  # one key for every day, from before the rotation
    other_type = keystore.named_key(quarantine_key_name("play", (now - 40 * day) * 1000))
    pseudonyms = keystore.named_key(PSEUDONYM_KEY)
    names = keystore.named_keys("quarantine/")
    assert names == {
        **{quarantine_key_name("search", (now - o * day) * 1000): k.key_id for o, k in by_day.items()},
        "quarantine/search": legacy.key_id,
        quarantine_key_name("play", (now - 40 * day) * 1000): other_type.key_id,
    }
    assert quarantine_key_name("search", now * 1000) == "quarantine/search/2000-02-29"

    # At noon, the days that ended 30 or more days ago go: 2000-01-29 (ended 30.5 days ago), 2000-01-28
    # and play's; 2000-01-30 (29.5 days) stays.
    assert sweep_quarantine_keys(keystore, 30, now=now + day / 2) == 3
    gone = [by_day[31].key_id, by_day[32].key_id, other_type.key_id]
    kept = [by_day[0], by_day[30], legacy, pseudonyms]
    assert keystore.data_keys(gone) == dict.fromkeys(gone), "what they sealed cannot be read any more"
    assert keystore.data_keys(k.key_id for k in kept) == {k.key_id: k.data_key for k in kept}
    assert set(keystore.named_keys("quarantine/")) == {
        quarantine_key_name("search", now * 1000),
        quarantine_key_name("search", (now - 30 * day) * 1000),
        "quarantine/search",
    }
    assert sweep_quarantine_keys(keystore, 30, now=now + day / 2) == 0, "a second sweep finds nothing"
    assert keystore.named_key(PSEUDONYM_KEY) == pseudonyms


@pytest.mark.emulators
def test_a_quarantine_key_deletion_interrupted_after_the_key_finishes_when_swept_again(
    bigtable_emulator, kek, monkeypatch
):
    keystore = provisioned(f"bigtable://local-project/test-instance/keys-{uuid.uuid4().hex[:8]}", kek)
    old = keystore.named_key("quarantine/search/2000-01-01")
    deletions, delete_rows = [], keystore._delete_rows

    def die_after_the_key(rows):
        deletions.append(rows)
        if len(deletions) > 1:
            raise OSError("worker died")
        delete_rows(rows)

    monkeypatch.setattr(keystore, "_delete_rows", die_after_the_key)
    with pytest.raises(OSError):
        sweep_quarantine_keys(keystore, 30)
    monkeypatch.undo()
    assert keystore.data_keys([old.key_id]) == {old.key_id: None}, "the key went first"
    assert sweep_quarantine_keys(keystore, 30) == 1
    assert keystore.named_keys("quarantine/") == {}
