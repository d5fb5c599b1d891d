"""The floor: the delivery path's per-event work as one plain Python loop.

For every archived message: unseal it, parse and validate it against the type's schema,
drop repeated ids with a set, encrypt the personal fields with AES-GCM under the
subject's key (keys fetched in one batch per file and cached), and encode it with
fastavro, deflate, to a local file; malformed messages are sealed and written as dead
letters. Same libraries, no framework: the reference the pipeline is measured against,
so it is kept as fast as straightforward code gets.
"""

from __future__ import annotations

import json
import pathlib

import fastavro
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastavro.validation import validate

from event_delivery.contract.dead_letters import parsed_dead_letter_schema, quarantine_key_name
from event_delivery.contract.envelope import parse_received_at
from event_delivery.contract.registry import load_registry
from event_delivery.keys.fields import decrypt_bytes, encrypt_bytes, encrypt_fields
from transforms import collector
from transforms.archive import RAW
from transforms.field_checks import compile_fields

_MISSING = object()


class Keys:
    """The keys one type's delivery uses, each fetched once and cached as the pipeline's workers do."""

    def __init__(self, keystore, name: str):
        self.keystore, self.name = keystore, name
        self.unseal = {}  # archive key id -> AESGCM
        self.seal = {}  # subject -> (key id, AESGCM)
        self.quarantine = {}  # by day

    def fetch_unseal_keys(self, records) -> None:
        """One batch per file for the archive keys it names and the cache lacks."""
        missing = {r["key_id"] for r in records if r["key_id"]} - self.unseal.keys()
        self.unseal.update({k: AESGCM(v) for k, v in self.keystore.data_keys(missing).items()})

    def unsealed(self, archived: dict) -> bytes:
        """An archived message's payload as it arrived (the archive seals personal payloads)."""
        key_id = archived["key_id"]
        if not key_id:
            return archived["payload"]
        return decrypt_bytes(self.unseal[key_id], archived["payload"], self.name, RAW, key_id, archived["event_id"])

    def fetch_subject_keys(self, subjects) -> None:
        """One batch per file for the subjects the cache lacks: their key ids, and the keys that
        unsealing did not fetch already (the pipeline's ``KeyCache`` shares them the same way)."""
        key_ids = self.keystore.subject_key_ids(set(subjects) - self.seal.keys(), scope=self.name)
        missing = {k for k in key_ids.values() if k} - self.unseal.keys()
        self.unseal.update({k: AESGCM(v) for k, v in self.keystore.data_keys(missing).items() if v})
        self.seal.update({s: (k, self.unseal[k]) if k in self.unseal else None for s, k in key_ids.items()})

    def quarantine_key(self, received_at):
        day = quarantine_key_name(self.name, received_at)
        if day not in self.quarantine:
            self.quarantine[day] = self.keystore.named_key(day)
        return self.quarantine[day]


def _sealed_dead_letter(keys: Keys, event_id, received_at, attributes, data: bytes) -> dict:
    """A malformed message sealed under the day's quarantine key, whatever subject it names, as the pipeline does."""
    key = keys.quarantine_key(received_at)
    return {
        "event_id": event_id,
        "received_at": received_at,
        "event_type": keys.name,
        "error_kind": "NOT_JSON",
        "error_detail": "",
        "attributes": attributes,
        "payload": encrypt_bytes(key.aead, data, keys.name, "payload", key.key_id, event_id),
        "quarantine_key_id": key.key_id,
    }


def _parse_new(event_type, records, keys: Keys, seen: set, dead: list) -> list[dict]:
    """The file's valid records whose id is not in ``seen`` (which they join); the malformed go to ``dead``."""
    schema = event_type.parsed_payload_schema
    fields = [(f["name"], f.get("default", _MISSING)) for f in event_type.schema["fields"]]
    known = {n for n, _ in fields}
    checks = compile_fields(schema)  # as parsing compiles them: fastavro validates what they do not cover
    keys.fetch_unseal_keys(records)
    parsed = []
    for archived in records:
        data = keys.unsealed(archived)
        attributes = archived["attributes"]
        event_id, received_at = attributes["event_id"], parse_received_at(attributes["received_at"])
        try:
            obj = json.loads(data)
            record = {n: obj.get(n, d) for n, d in fields}
            valid = (
                not (obj.keys() - known)
                and _MISSING not in record.values()
                and (
                    all([check(record[n]) for n, check in checks])
                    if checks
                    else validate(record, schema, raise_errors=False)
                )
            )
        except (ValueError, AttributeError):
            valid = False
        if not valid:
            dead.append(_sealed_dead_letter(keys, event_id, received_at, attributes, data))
            continue
        if event_id in seen:
            continue
        seen.add(event_id)
        record["event_id"], record["received_at"] = event_id, received_at
        parsed.append(record)
    return parsed


def _encrypt_personal_fields(event_type, records: list[dict], keys: Keys) -> list[dict]:
    """The records with their personal fields encrypted under their subject's key, in place."""
    subject_field, personal, name = event_type.subject_field, event_type.personal_fields, event_type.name
    if not subject_field:
        return records
    keys.fetch_subject_keys(r[subject_field] for r in records)
    for record in records:
        key_id, aead = keys.seal[record[subject_field]]
        record["key_id"] = key_id
        record.update(encrypt_fields(aead, record, personal, name, key_id, record["event_id"]))
    return records


def _write_outputs(out: pathlib.Path, event_type, delivered: list[dict], dead: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{event_type.name}.avro", "wb") as handle:
        fastavro.writer(handle, event_type.parsed_delivered_schema, delivered, codec="deflate")
    with open(out / f"{event_type.name}-dead-letters.avro", "wb") as handle:
        fastavro.writer(handle, parsed_dead_letter_schema(), dead, codec="deflate")


def deliver_type(name: str, paths: list[str], keystore, out: pathlib.Path) -> int:
    """Delivers one type's archived files to ``out``; returns how many messages it read."""
    event_type = load_registry()[name]
    keys = Keys(keystore, name)
    seen, delivered, dead = set(), [], []
    read = 0
    for path in paths:
        with open(path, "rb") as handle:
            records = list(fastavro.reader(handle))
        read += len(records)
        parsed = _parse_new(event_type, records, keys, seen, dead)
        delivered.extend(_encrypt_personal_fields(event_type, parsed, keys))
    _write_outputs(out, event_type, delivered, dead)
    return read


def run_floor(workload, out: pathlib.Path) -> int:
    """Delivers the whole workload; returns how many messages it read."""
    collector.tune_for_streams()  # as the pipeline's workers run
    keystore = workload.keys.open()
    return sum(
        deliver_type(name, workload.archive_paths(name), keystore, out) for name in workload.counts if name[0] != "_"
    )
