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
from event_delivery.keys.fields import decrypt_bytes, encrypt_bytes, encrypt_value
from transforms.archive import RAW

_MISSING = object()


def deliver_type(name: str, paths: list[str], keystore, out: pathlib.Path) -> int:
    event_type = load_registry()[name]
    schema, personal, subject_field = (
        event_type.parsed_payload_schema,
        event_type.personal_fields,
        event_type.subject_field,
    )
    fields = [(f["name"], f.get("default", _MISSING)) for f in event_type.schema["fields"]]
    known = {n for n, _ in fields}
    quarantine = {}  # by day, as the pipeline's workers cache them
    unseal, seal = {}, {}
    seen, delivered, dead = set(), [], []
    read = 0
    for path in paths:
        with open(path, "rb") as handle:
            records = list(fastavro.reader(handle))
        read += len(records)
        missing = {r["key_id"] for r in records if r["key_id"]} - unseal.keys()
        unseal.update({k: AESGCM(v) for k, v in keystore.data_keys(missing).items()})
        parsed = []
        for archived in records:
            data = archived["payload"]
            key_id = archived["key_id"]
            if key_id:
                data = decrypt_bytes(unseal[key_id], data, name, RAW, key_id, archived["event_id"])
            attributes = archived["attributes"]
            event_id, received_at = attributes["event_id"], parse_received_at(attributes["received_at"])
            try:
                obj = json.loads(data)
                record = {n: obj.get(n, d) for n, d in fields}
                valid = (
                    not (obj.keys() - known)
                    and _MISSING not in record.values()
                    and validate(record, schema, raise_errors=False)
                )
            except (ValueError, AttributeError):
                valid = False
            if not valid:
                # Sealed under the day's quarantine key, whatever subject it names, as the pipeline does.
                day = quarantine_key_name(name, received_at)
                if day not in quarantine:
                    quarantine[day] = keystore.named_key(day)
                key = quarantine[day]
                sealed = encrypt_bytes(key.aead, data, name, "payload", key.key_id, event_id)
                dead.append(
                    {
                        "event_id": event_id,
                        "received_at": received_at,
                        "event_type": name,
                        "error_kind": "NOT_JSON",
                        "error_detail": "",
                        "attributes": attributes,
                        "payload": sealed,
                        "quarantine_key_id": key.key_id,
                    }
                )
                continue
            if event_id in seen:
                continue
            seen.add(event_id)
            record["event_id"], record["received_at"] = event_id, received_at
            parsed.append(record)
        if subject_field:
            new = {r[subject_field] for r in parsed} - seal.keys()
            seal.update({s: (k.key_id, k.aead) for s, k in keystore.subject_keys(new, scope=name).items()})
        for record in parsed:
            if subject_field:
                key_id, aead = seal[record[subject_field]]
                record["key_id"] = key_id
                for field in personal:
                    value = record[field]
                    record[field] = (
                        None if value is None else encrypt_value(aead, value, name, field, key_id, record["event_id"])
                    )
            delivered.append(record)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.avro", "wb") as handle:
        fastavro.writer(handle, event_type.parsed_delivered_schema, delivered, codec="deflate")
    with open(out / f"{name}-dead-letters.avro", "wb") as handle:
        fastavro.writer(handle, parsed_dead_letter_schema(), dead, codec="deflate")
    return read


def run_floor(workload, out: pathlib.Path) -> int:
    """Delivers the whole workload; returns how many messages it read."""
    keystore = workload.keys.open()
    return sum(
        deliver_type(name, workload.archive_paths(name), keystore, out) for name in workload.counts if name[0] != "_"
    )
