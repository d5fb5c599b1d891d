"""The plain loop: the essential work alone, the lower bound the floor is held against.

For every message, as a job reads it from Pub/Sub (in clear, with its attributes): parse
the JSON, drop a repeated id with a set, encrypt the personal fields with AES-GCM under the
subject's key, and encode the record with fastavro, deflate. Nothing else: no validation
against the schema, no dead letters for what fails to parse, no key store (each subject's
key is in a dict before the clock starts, as a warm cache holds it), no archive to unseal. It
parses with the fastest decoder at hand (orjson), as the lower bound should.
The floor does all of that too; the ratio of the two says what the floor's extra work costs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import fastavro
import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.floor import Keys
from event_delivery.contract.envelope import parse_received_at
from event_delivery.contract.registry import load_registry
from event_delivery.keys.fields import encrypt_fields
from transforms import collector


@dataclasses.dataclass
class Messages:
    """One type's messages in clear, and its subjects' keys: what the loop starts from."""

    name: str
    messages: list[tuple[str, int, bytes]]  # (event_id, received_at_millis, data)
    keys: dict[str, tuple[str, AESGCM]]  # subject id -> (key id, its AEAD)


def prepare(workload) -> list[Messages]:
    """Every type's archived messages unsealed, and the keys of their subjects fetched (as the floor fetches them)."""
    keystore = workload.keys.open()
    prepared = []
    for name in (n for n in workload.counts if n[0] != "_"):
        records = workload.archived(name)
        keys = Keys(keystore, name)
        keys.fetch_unseal_keys(records)
        messages = [
            (r["attributes"]["event_id"], parse_received_at(r["attributes"]["received_at"]), keys.unsealed(r))
            for r in records
        ]
        subject_field = load_registry()[name].subject_field
        if subject_field:
            keys.fetch_subject_keys({_subject(data, subject_field) for _, _, data in messages} - {None})
        prepared.append(Messages(name, messages, keys.seal))
    return prepared


def _subject(data: bytes, subject_field: str):
    try:
        return json.loads(data).get(subject_field)
    except (ValueError, AttributeError):
        return None


def deliver(messages: Messages, out: pathlib.Path) -> int:
    """Parses, deduplicates, encrypts and encodes one type's messages; returns how many it read."""
    event_type = load_registry()[messages.name]
    name, personal, subject_field = messages.name, event_type.personal_fields, event_type.subject_field
    seen, delivered = set(), []
    for event_id, received_at, data in messages.messages:
        try:
            record = orjson.loads(data)  # the fastest decoder at hand: this loop is the lower bound
            subject = record[subject_field] if subject_field else None
        except (ValueError, KeyError, TypeError):
            continue
        if event_id in seen:
            continue
        seen.add(event_id)
        record["event_id"], record["received_at"] = event_id, received_at
        if subject_field:
            key_id, aead = messages.keys[subject]
            record["key_id"] = key_id
            record.update(encrypt_fields(aead, record, personal, name, key_id, event_id))
        delivered.append(record)
    with open(out / f"{name}.avro", "wb") as handle:
        fastavro.writer(handle, event_type.parsed_delivered_schema, delivered, codec="deflate")
    return len(messages.messages)


def run_plain_loop(prepared: list[Messages], out: pathlib.Path) -> int:
    """Delivers every prepared type; returns how many messages it read."""
    collector.tune_for_streams()  # as the pipeline's workers run
    out.mkdir(parents=True, exist_ok=True)
    return sum(deliver(messages, out) for messages in prepared)
