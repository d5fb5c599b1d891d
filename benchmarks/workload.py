"""The benchmark's workload: a deterministic mix of every type, written as a raw archive.

Events are spread over the registry's types with realistic weights and sizes (a few
bytes to a few kB), 5% are duplicates, 1% malformed, and personal fields name one of
50k subjects. All of them fall into one hour. The archive is exactly what a delivery
job with ``--raw_archive_root`` writes, sealed with subject keys in a local keystore,
so the backfill job reads it as it would in production. It is generated once per size
and seed, and reused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import uuid

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.dead_letters import quarantine_key_name
from event_delivery.contract.registry import load_registry
from event_delivery.contract.samples import fake_fields
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.fields import encrypt_bytes
from event_delivery.producer import attributes_for
from transforms.archive import RAW, parsed_raw_archive_schema

HOUR = 1_795_946_400  # 2026-11-29T10:00:00Z
MIX = {
    "play": 0.40,
    "ad_impression": 0.20,
    "page_view": 0.15,
    "search": 0.10,
    "service_log": 0.08,
    "playlist_edit": 0.05,
    "account_update": 0.02,
}
DUPLICATES, MALFORMED, SUBJECTS = 0.05, 0.01, 50_000
FILES_PER_TYPE = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    folder: pathlib.Path
    events: int
    counts: dict  # per type: messages, duplicates, malformed

    @property
    def archive_root(self) -> str:
        return str(self.folder / "raw")

    @property
    def keys(self) -> KeyConfig:
        return KeyConfig(f"sqlite:///{self.folder}/keystore.db", str(self.folder / "kek.key"))

    def archive_paths(self, type_name: str) -> list[str]:
        return files.glob(f"{self.archive_root}/{type_name}/*/*/*.avro")

    def archived(self, type_name: str) -> list[dict]:
        """The type's archived records, file after file."""
        return [record for path in self.archive_paths(type_name) for record in files.read_avro(path)]


def _sized(fields: dict, type_name: str, rng: random.Random) -> dict:
    """Stretches the free-text fields, so payloads range from tens of bytes to a few kB."""
    if type_name == "service_log" and rng.random() < 0.3:
        frames = min(int(rng.expovariate(1 / 12)) + 1, 60)
        fields["message"] += "".join(f"\n  at service.module{i}.call(file{i}.py:{i * 7})" for i in range(frames))
    return fields


def _messages(total: int, rng: random.Random):
    """``(type, event_id, received_at_millis, subject, data, attributes)`` in arrival order."""
    registry = load_registry()
    names, weights = list(MIX), list(MIX.values())
    recent: dict[str, list] = {name: [] for name in names}
    for n in range(total):
        name = rng.choices(names, weights)[0]
        event_type = registry[name]
        received_at = HOUR * 1000 + n * 3_000_000 // total  # spread over the hour's first 50 minutes
        draw = rng.random()
        if draw < DUPLICATES and recent[name]:
            yield (name, *rng.choice(recent[name]))
            continue
        event_id = str(uuid.UUID(int=rng.getrandbits(128)))
        attributes = attributes_for(event_type, event_id, received_at)
        if draw < DUPLICATES + MALFORMED:
            yield name, event_id, received_at, None, b'{"truncated": ', attributes
            continue
        fields = _sized(fake_fields(event_type, rng, SUBJECTS), name, rng)
        subject = fields[event_type.subject_field] if event_type.subject_field else None
        message = (event_id, received_at, subject, json.dumps(fields).encode(), attributes)
        recent[name].append(message)
        if len(recent[name]) > 1000:
            recent[name].pop(0)
        yield (name, *message)


FORMAT = 4  # what a built workload stores (keys per type, records sealed per event id); a change builds anew


def build(folder: pathlib.Path, total: int, seed: int = 7) -> Workload:
    """Generates the workload into ``folder`` unless it is already there."""
    done = folder / "workload.json"
    if done.exists():
        return Workload(folder, total, json.loads(done.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    registry = load_registry()
    workload = Workload(folder, total, {})
    keystore = workload.keys.provision()
    by_type: dict[str, list] = {name: [] for name in MIX}
    for message in _messages(total, random.Random(seed)):
        by_type[message[0]].append(message[1:])
    counts = {"_payload_bytes": 0}
    for name, messages in by_type.items():
        event_type = registry[name]
        sealed = bool(event_type.personal_fields)
        keys = keystore.subject_keys({m[2] for m in messages if m[2] is not None}, scope=name) if sealed else {}
        records = []
        for event_id, received_at, subject, data, attributes in messages:
            quarantine = keystore.named_key(quarantine_key_name(name, received_at)) if subject is None else None
            key = (keys[subject] if subject is not None else quarantine) if sealed else None
            records.append(
                {
                    "event_id": event_id,
                    "received_at": received_at,
                    "arrival": received_at + 200,
                    "attributes": attributes,
                    "key_id": key.key_id if key else None,
                    "payload": encrypt_bytes(key.aead, data, name, RAW, key.key_id, event_id) if key else data,
                }
            )
            counts["_payload_bytes"] += len(data)
        folder_path = partitions.partition_dir(workload.archive_root, name, HOUR, partitions.HOUR_SECONDS)
        for i in range(FILES_PER_TYPE):
            part = records[i::FILES_PER_TYPE]
            if part:
                path = partitions.join(folder_path, partitions.pane_file_name(name, "workload", 0, i))
                files.write_avro(path, parsed_raw_archive_schema(), part)
        counts[name] = len(messages)
    done.write_text(json.dumps(counts))
    return Workload(folder, total, counts)
