"""The inventory of decrypted copies: what each decrypt run writes in clear, for forget to find.

A folder, local or gs://, that decrypt and forget share (``--copies_inventory``). A decrypt
run records what it is about to write before it writes it, so a run that fails, or is still
running, is found too:

- ``decrypt-<UTC time>-<random>/run.json``, before anything else: the type, the input and
  storage roots, and the output root, the only place the run writes;
- ``.../file-<hash>.json``, before each file: its path and the key ids of the records it
  holds in clear;
- ``.../files.jsonl``, once every file is written: all of them, which forget reads instead.

Forget records each purge in ``purge-<UTC time>-<random>.jsonl``. Key ids are random and
already in clear in every delivered record; the inventory names no subject and holds no value.
Each file is written whole or not at all, so a reader never sees half of one.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import urllib.parse
from typing import NamedTuple

from event_delivery.cloud import files, preflight
from event_delivery.contract.partitions import HOUR_SECONDS, Layout, join

RUN = "run.json"
FILES = "files.jsonl"
NO_INVENTORY = "none"  # forget's --copies_inventory when no decrypt run has ever recorded a copy


class DecryptedCopy(NamedTuple):
    """A file a decrypt run writes, and the key ids of the records in it that are in clear."""

    path: str
    key_ids: list[str]


class DecryptRun(NamedTuple):
    """A decrypt run as recorded: where it writes, and the copies it recorded (all of them once finished)."""

    record: str
    event_type: str
    input_root: str
    storage_root: str
    output_root: str
    copies: list[DecryptedCopy]


def default_inventory(keystore: str) -> str | None:
    """The inventory beside a SQLite keystore (``<its folder>/decrypted-copies``); none beside Bigtable."""
    parsed = urllib.parse.urlparse(keystore)
    if parsed.scheme != "sqlite" or not parsed.path[1:]:
        return None
    return os.path.join(os.path.dirname(parsed.path[1:]), "decrypted-copies")


def add_copies_inventory_argument(parser) -> None:
    """``--copies_inventory``, the one place decrypt and forget both know."""
    parser.add_argument(
        "--copies_inventory",
        help="A folder (local or gs://) where decrypt records each decrypted file before it writes it, with "
        "the key ids of the records it holds in clear, and where forget looks for a subject's copies. Give "
        "decrypt and forget the same one: in production a restricted gs:// folder (required with a Bigtable "
        "keystore). Default: decrypted-copies beside a SQLite keystore.",
    )


def inventory_of(args) -> str:
    """The inventory the flags name, or the one beside the SQLite keystore; ValueError if neither."""
    inventory = args.copies_inventory or default_inventory(args.keystore)
    if not inventory:
        raise ValueError("--copies_inventory is required with a Bigtable keystore (a restricted gs:// folder)")
    return inventory


def check_inventory(inventory: str, named: bool) -> None:
    """An inventory ``named`` on the command line must exist (a local folder; on gs://, a recorded run):
    ``PreflightError`` otherwise, as copies recorded elsewhere would be missed. The default one, beside the
    keystore, is made by the first decrypt run that uses it."""
    if inventory.startswith("gs://"):
        preflight.check_root(inventory, create=False)
        found = bool(files.glob(join(inventory, "decrypt-*", RUN)))
    else:
        found = os.path.isdir(inventory)
    if not found and named:
        raise preflight.PreflightError(
            f"there is no inventory of decrypted copies at {inventory}: give --copies_inventory the folder "
            f"decrypt records in, or {NO_INVENTORY} if no decrypt run has ever recorded a copy"
        )


def refuse_output_root(output_root: str, input_root: str, storage_root: str, event_type: str) -> None:
    """ValueError unless ``output_root`` lies outside the input root and every root of the storage layout
    (delivered, its staging, late, dead letters, raw archive, audit): a clear copy never sits among sealed data."""
    if _inside(output_root, input_root):
        raise ValueError(
            "--output_root must not be --input_root or inside it: a clear copy never sits among sealed data"
        )
    for root in Layout.under(storage_root, event_type, HOUR_SECONDS, raw_archive=True).roots:
        if _inside(output_root, root):
            raise ValueError(
                f"--output_root must not be inside {root}, a root of the storage layout under {storage_root}: "
                "a clear copy never sits among sealed data"
            )


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (local paths compared as real paths)."""
    if "://" not in path and "://" not in root:
        path, root = os.path.realpath(path), os.path.realpath(root)
    return (path.rstrip("/") + "/").startswith(root.rstrip("/") + "/")


def _new_record(inventory: str, kind: str) -> str:
    """A new record's name, by its UTC time and a random suffix: records never overwrite each other, and sort."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return join(inventory, f"{kind}-{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}")


def _write_whole(path: str, documents) -> None:
    """Writes JSON Lines whole or not at all (a gs:// upload is whole already; a local file is renamed into place)."""
    if "://" in path:
        files.write_json_lines(path, documents)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"
    files.write_json_lines(partial, documents)
    os.replace(partial, path)


def start_run(inventory: str, event_type: str, input_root: str, storage_root: str, output_root: str) -> str:
    """Records a decrypt run before it writes anything; returns its record (a folder of the inventory)."""
    record = _new_record(inventory, "decrypt")
    roots = {"input_root": input_root, "storage_root": storage_root, "output_root": output_root}
    _write_whole(join(record, RUN), [{"event_type": event_type, **roots}])
    return record


def record_copy(record: str, copy: DecryptedCopy) -> None:
    """Records a file of the run before it is written. Named by its path: a retried write records it again, in place."""
    name = hashlib.sha256(copy.path.encode("utf-8")).hexdigest()[:32]
    _write_whole(join(record, f"file-{name}.json"), [copy._asdict()])


def finish_run(record: str) -> int:
    """Gathers the run's file records into one, read instead of them from then on; returns how many files."""
    copies = sorted(_file_records(record))
    _write_whole(join(record, FILES), (c._asdict() for c in copies))
    return len(copies)


def _file_records(record: str) -> list[DecryptedCopy]:
    return [
        DecryptedCopy(**line)
        for path in files.glob(join(record, "file-*.json"))
        for line in files.read_json_lines(path)
    ]


def decrypt_runs(inventory: str) -> list[DecryptRun]:
    """Every decrypt run the inventory records, oldest first, with the copies recorded so far."""
    runs = []
    for run_file in files.glob(join(inventory, "decrypt-*", RUN)):
        record = run_file[: -len(RUN) - 1]
        [run] = files.read_json_lines(run_file)
        finished = join(record, FILES)
        lines = files.read_json_lines(finished) if files.exists(finished) else None
        copies = _file_records(record) if lines is None else [DecryptedCopy(**line) for line in lines]
        runs.append(
            DecryptRun(record, run["event_type"], run["input_root"], run["storage_root"], run["output_root"], copies)
        )
    return runs


def copies_holding(runs: list[DecryptRun], key_ids) -> list[tuple[DecryptRun, DecryptedCopy]]:
    """The recorded copies that hold a record of any of ``key_ids`` in clear (still there or not), with the
    run that recorded each (a path that several runs wrote comes once for each)."""
    wanted = set(key_ids)
    return [(run, copy) for run in runs for copy in run.copies if wanted.intersection(copy.key_ids)]


def written_by(run: DecryptRun, path: str) -> bool:
    """Whether ``path`` is where ``run`` writes a copy, ``<output_root>/<type>/dt=.../hr=.../<file>.avro``, and
    the run's output root one decrypt accepts. An inventory line naming anything else is no copy: forget never
    deletes it (whoever can write the inventory could otherwise have it delete delivered data, or the keystore)."""
    try:
        refuse_output_root(run.output_root, run.input_root, run.storage_root, run.event_type)
    except ValueError:
        return False
    folder = join(run.output_root, run.event_type) + "/"
    if not (path.startswith(folder) and _inside(path, folder)):
        return False
    parts = path[len(folder) :].split("/")
    return len(parts) == 3 and parts[0].startswith("dt=") and parts[1].startswith("hr=") and parts[2].endswith(".avro")


def record_purge(inventory: str, purged: list[str], deleted: list[str]) -> str:
    """Records that forget purged the files of ``purged`` (of which it deleted ``deleted``, the rest were
    already gone); returns the record's path."""
    record, deleted = f"{_new_record(inventory, 'purge')}.jsonl", set(deleted)
    _write_whole(record, ({"path": path, "deleted": path in deleted} for path in purged))
    return record
