"""The schema registry: every event type is one Avro schema in ``avro_schemas/``.

Record-level properties name the type (``event_type``), its priority ``tier`` and,
optionally, the field that names the data subject (``subject_field``). A field-level
``"personal": true`` marks personal data. Topics, subscriptions, jobs, output paths
and tests all derive from this module; nothing else repeats a type's name or fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources

import fastavro

from event_delivery.contract import envelope

SCHEMA_PACKAGE = "avro_schemas"


AUDIT_SUBSCRIPTION = "subscription"  # the auditor reads a second subscription of the type's topic
AUDIT_PRODUCER_COUNTS = "producer_counts"  # the auditor sums the producers' count reports


@dataclasses.dataclass(frozen=True)
class Tier:
    """What a priority tier sets for each of its jobs, and the service levels it promises.

    An hour must close (its ``_SUCCESS`` written) by its end + ``allowed_lateness_seconds``
    + ``close_margin_seconds`` (``slo.is_overdue`` decides); it must lose nothing (published = delivered + duplicates +
    late + dead-lettered); and at most ``max_dead_letter_rate`` of what was published may
    be dead-lettered. ``audit_source`` says where the auditor counts what was published.
    """

    name: str
    allowed_lateness_seconds: int
    num_shards: int
    max_workers: int
    recovery_order: int
    close_margin_seconds: int
    max_dead_letter_rate: float
    audit_source: str


# High-tier hours close soonest so consumers of revenue and royalty data start early;
# low-tier types wait longer for stragglers and get the fewest resources. The busy
# tiers are audited from producer count reports: a second subscription would deliver
# every byte twice.
TIERS = {
    "high": Tier(
        "high",
        allowed_lateness_seconds=10 * 60,
        num_shards=16,
        max_workers=50,
        recovery_order=0,
        close_margin_seconds=5 * 60,
        max_dead_letter_rate=0.001,
        audit_source=AUDIT_PRODUCER_COUNTS,
    ),
    "normal": Tier(
        "normal",
        allowed_lateness_seconds=30 * 60,
        num_shards=8,
        max_workers=20,
        recovery_order=1,
        close_margin_seconds=10 * 60,
        max_dead_letter_rate=0.005,
        audit_source=AUDIT_PRODUCER_COUNTS,
    ),
    "low": Tier(
        "low",
        allowed_lateness_seconds=2 * 60 * 60,
        num_shards=4,
        max_workers=5,
        recovery_order=2,
        close_margin_seconds=15 * 60,
        max_dead_letter_rate=0.01,
        audit_source=AUDIT_SUBSCRIPTION,
    ),
}

# Envelope fields every delivered record carries ahead of the type's own fields.
ENVELOPE_FIELDS = [
    {"name": "event_id", "type": "string", "doc": "Producer-assigned id; unique per hour after delivery."},
    {
        "name": "received_at",
        "type": {"type": "long", "logicalType": "timestamp-millis"},
        "doc": "When the entry point received the event; it decides the hour.",
    },
]


KEY_ID_FIELD = {
    "name": "key_id",
    "type": ["null", "string"],
    "default": None,
    "doc": "The data subject's opaque key id, in clear so analytics can count subjects; null once forgotten.",
}
ENCRYPTED_DOC = "Personal: AES-256-GCM ciphertext (nonce || ciphertext) under the subject's key."


def _nullable(avro_type) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


class RegistryError(ValueError):
    """A schema in the registry breaks the registry's rules."""


@dataclasses.dataclass(frozen=True)
class EventType:
    """One event type, as declared by its schema file."""

    name: str
    tier: Tier
    subject_field: str | None
    personal_fields: tuple[str, ...]
    schema: dict

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(field["name"] for field in self.schema["fields"])

    @property
    def topic(self) -> str:
        return f"events-{self.name}"

    @property
    def subscription(self) -> str:
        return f"events-{self.name}-delivery"

    @property
    def audit_subscription(self) -> str:
        """The auditor's own subscription to the topic (tiers audited from a subscription)."""
        return f"events-{self.name}-audit"

    @functools.cached_property
    def parsed_payload_schema(self):
        """The schema of the message payload, as fastavro validates it."""
        return fastavro.parse_schema(_without_registry_properties(self.schema))

    @functools.cached_property
    def holds_logical_types(self) -> bool:
        """Whether a field holds an Avro logical type anywhere. fastavro validates and writes such
        a value by its underlying type alone, so a value its logical type cannot read back (a
        uuid that is no UUID, a timestamp past the year 9999) would be written, and then break
        every reader of the file."""
        return any(_holds_logical_type(field["type"]) for field in self.schema["fields"])

    @functools.cached_property
    def delivered_schema(self) -> dict:
        """Delivered records: the envelope, the subject's key id in clear, then the fields,
        each personal one as AES-GCM ciphertext (null when its subject is forgotten)."""
        schema = _without_registry_properties(self.schema)
        fields = []
        for field in schema["fields"]:
            if field["name"] in self.personal_fields:
                field = {"name": field["name"], "type": ["null", "bytes"], "default": None, "doc": ENCRYPTED_DOC}
            fields.append(field)
        key_id = [KEY_ID_FIELD] if self.subject_field else []
        schema["fields"] = ENVELOPE_FIELDS + key_id + fields
        schema["name"] = schema["name"] + "Delivered"
        return schema

    @functools.cached_property
    def parsed_delivered_schema(self):
        return fastavro.parse_schema(self.delivered_schema)

    @functools.cached_property
    def clear_schema(self) -> dict:
        """Decrypted records: the envelope and the fields in clear; personal fields are
        nullable, because a forgotten subject's values decrypt to null."""
        schema = _without_registry_properties(self.schema)
        for field in schema["fields"]:
            if field["name"] in self.personal_fields and not _nullable(field["type"]):
                field["type"] = ["null", field["type"]]
                field["default"] = None
        schema["fields"] = ENVELOPE_FIELDS + schema["fields"]
        schema["name"] = schema["name"] + "Clear"
        return schema

    @functools.cached_property
    def parsed_clear_schema(self):
        return fastavro.parse_schema(self.clear_schema)


_REGISTRY_PROPERTIES = ("event_type", "tier", "subject_field", "personal", "examples", "range")


def _without_registry_properties(node):
    """A deep copy of a schema without the registry's own annotations."""
    if isinstance(node, dict):
        return {k: _without_registry_properties(v) for k, v in node.items() if k not in _REGISTRY_PROPERTIES}
    if isinstance(node, list):
        return [_without_registry_properties(v) for v in node]
    return node


def _binary_type(avro_type) -> str | None:
    """``bytes`` or ``fixed`` if the type holds one anywhere (JSON has no binary values), else None."""
    if isinstance(avro_type, list):
        return next(filter(None, map(_binary_type, avro_type)), None)
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "record":
            return next(filter(None, (_binary_type(f["type"]) for f in avro_type["fields"])), None)
        nested = avro_type.get("items", avro_type.get("values"))
        return _binary_type(nested if kind in ("array", "map") else kind)
    return avro_type if avro_type in ("bytes", "fixed") else None


def _holds_logical_type(avro_type) -> bool:
    if isinstance(avro_type, list):
        return any(map(_holds_logical_type, avro_type))
    if not isinstance(avro_type, dict):
        return False  # a primitive, or a named type, walked where it is defined
    if "logicalType" in avro_type:
        return True
    kind = avro_type["type"]
    if kind == "record":
        return any(_holds_logical_type(f["type"]) for f in avro_type["fields"])
    return _holds_logical_type(avro_type.get("items", avro_type.get("values")) if kind in ("array", "map") else kind)


def event_type_from_schema(schema: dict, file_stem: str | None = None) -> EventType:
    """Validates one schema against the registry's rules and describes its type."""
    name = schema.get("event_type")
    where = f"{file_stem}.avsc" if file_stem else f"schema {schema.get('name')!r}"
    if not name or not isinstance(name, str):
        raise RegistryError(f"{where}: missing record-level property 'event_type'")
    if file_stem is not None and name != file_stem:
        raise RegistryError(f"{where}: event_type {name!r} must match the file name")
    if not name.replace("_", "").isalnum() or not name.islower():
        raise RegistryError(f"{where}: event_type must be lower_snake_case")
    tier = schema.get("tier")
    if tier not in TIERS:
        raise RegistryError(f"{where}: tier must be one of {sorted(TIERS)}, not {tier!r}")
    fields = {field["name"]: field for field in schema.get("fields", [])}
    for reserved in [*ENVELOPE_FIELDS, KEY_ID_FIELD]:
        if reserved["name"] in fields:
            raise RegistryError(f"{where}: field {reserved['name']!r} is reserved for the envelope")
    # A field under one of these names would be sealed with the same associated data as a whole
    # payload (or its attributes) under the subject's key: one ciphertext could pass for the other.
    for label in envelope.SEALING_LABELS:
        if label in fields:
            raise RegistryError(f"{where}: field {label!r} is reserved: sealing binds that name")
    personal = tuple(f["name"] for f in schema["fields"] if f.get("personal") is True)
    subject = schema.get("subject_field")
    if subject is not None:
        if subject not in fields:
            raise RegistryError(f"{where}: subject_field {subject!r} is not a field")
        if subject not in personal:
            raise RegistryError(f"{where}: subject_field {subject!r} must be marked personal")
        if fields[subject]["type"] != "string":
            raise RegistryError(f"{where}: subject_field {subject!r} must be a non-null string")
    elif personal:
        raise RegistryError(f"{where}: personal fields need a subject_field to key their encryption")
    try:
        fastavro.parse_schema(_without_registry_properties(schema))
    except Exception as error:  # fastavro raises several unrelated types here
        raise RegistryError(f"{where}: not a valid Avro schema: {error}") from None
    for field in schema["fields"]:
        binary = _binary_type(field["type"])
        if binary:
            raise RegistryError(
                f"{where}: field {field['name']!r} holds Avro {binary}, which a JSON payload cannot carry"
            )
    return EventType(name=name, tier=TIERS[tier], subject_field=subject, personal_fields=personal, schema=schema)


@functools.cache
def load_registry() -> dict[str, EventType]:
    """All event types, by name, from the packaged ``avro_schemas/``."""
    types = {}
    for entry in sorted(resources.files(SCHEMA_PACKAGE).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".avsc"):
            continue
        stem = entry.name[: -len(".avsc")]
        try:
            schema = json.loads(entry.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise RegistryError(f"{entry.name}: not JSON: {error}") from None
        types[stem] = event_type_from_schema(schema, stem)
    if not types:
        raise RegistryError(f"no schemas found in package {SCHEMA_PACKAGE}")
    return types


def tier_types(tier: str) -> list[EventType]:
    """The types of a tier, by name."""
    return sorted((t for t in load_registry().values() if t.tier.name == tier), key=lambda t: t.name)


def get_event_type(name: str) -> EventType:
    """The named type, or a ``KeyError`` listing the known ones."""
    registry = load_registry()
    if name not in registry:
        raise KeyError(f"unknown event type {name!r}; known types: {', '.join(sorted(registry))}")
    return registry[name]
