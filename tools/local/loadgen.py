"""Generate realistic traffic for any registered type, with known fractions of trouble.

Values come from the schema alone: enums pick a symbol, fields with ``examples``
pick one, numeric fields with a ``range`` draw from it, and the subject field draws
from a fixed pool of subjects. Injected trouble is exact and recorded in a ledger:
duplicates (a producer retry: same id, same attributes), malformed messages (one of
every dead-letter kind, in turn) and late events (stamped ``late_by_seconds`` ago,
once the traffic is that old, so that they belong to an hour that had traffic and
has closed). A careless producer may also add an attribute of its own that names a
subject (``producer_attributes``), which the jobs must seal.

    python -m tools.local.loadgen --project local-project --event_type play \\
        --count 1000 --rate 200 --duplicates 0.05 --malformed 0.01 --late 0.02
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import sys
import time
import uuid

from event_delivery.cloud import preflight
from event_delivery.contract import envelope
from event_delivery.contract.dead_letters import MESSAGE_ERRORS, ErrorKind
from event_delivery.contract.registry import EventType, load_registry
from event_delivery.contract.samples import fake_fields
from event_delivery.producer import EventPublisher, attributes_for

DELIVERED, DUPLICATE, LATE, DEAD_LETTER = "delivered", "duplicate", "late", "dead_letter"
RECENT_EVENTS = 64
PRODUCER_ATTRIBUTE = "producer_user"  # an attribute outside the contract, naming a subject


@dataclasses.dataclass(frozen=True)
class Message:
    data: bytes
    attributes: dict
    expected: str
    kind: ErrorKind | None = None

    @property
    def received_at_millis(self) -> int | None:
        """The hour-deciding stamp, or None where it is missing or unparseable."""
        try:
            return envelope.parse_received_at(self.attributes[envelope.RECEIVED_AT])
        except (KeyError, envelope.BadTimestamp):
            return None


@dataclasses.dataclass
class Ledger:
    """What was published, by expected outcome, with the event ids of each outcome."""

    published: int = 0
    expected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dead_letter_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    received_at_millis: list = dataclasses.field(default_factory=list)
    ids: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def record(self, message: Message) -> None:
        self.published += 1
        self.expected[message.expected] += 1
        self.received_at_millis.append(message.received_at_millis)
        if message.kind is not None:
            self.dead_letter_kinds[message.kind.value] += 1
        if envelope.EVENT_ID in message.attributes:
            self.ids[message.expected].append(message.attributes[envelope.EVENT_ID])

    @property
    def unique_ids(self) -> list[str]:
        """The ids that must come out exactly once, delivered or late."""
        return self.ids[DELIVERED] + self.ids[LATE]


def malformed(event_type: EventType, kind: ErrorKind, rng: random.Random, now_millis: int, max_event_bytes: int):
    """``(data, attributes)`` of a message that must be dead-lettered with ``kind``."""
    valid = json.dumps(fake_fields(event_type, rng, 1000)).encode()
    attributes = attributes_for(event_type, str(uuid.UUID(int=rng.getrandbits(128))), now_millis)
    if kind is ErrorKind.TOO_LARGE:
        return json.dumps({"padding": "x" * (max_event_bytes + 1)}).encode(), attributes
    if kind is ErrorKind.EMPTY:
        return b"", attributes
    if kind is ErrorKind.MISSING_ID:
        del attributes[envelope.EVENT_ID]
        return valid, attributes
    if kind is ErrorKind.TYPE_MISMATCH:
        attributes[envelope.EVENT_TYPE] = event_type.name + "_other"
        return valid, attributes
    if kind is ErrorKind.BAD_TIMESTAMP:
        attributes[envelope.RECEIVED_AT] = "yesterday at noon"
        return valid, attributes
    if kind is ErrorKind.NOT_UTF8:
        return b'{"text": "\xff\xfe broken"}', attributes
    if kind is ErrorKind.NOT_JSON:
        return valid[:-1], attributes
    if kind is ErrorKind.NOT_OBJECT:
        return b"[1, 2, 3]", attributes
    if kind is ErrorKind.SCHEMA_VIOLATION:
        fields = json.loads(valid)
        fields[event_type.schema["fields"][0]["name"]] = {"nested": True}
        return json.dumps(fields).encode(), attributes
    raise ValueError(kind)


@dataclasses.dataclass
class TrafficMix:
    duplicates: float = 0.05
    malformed: float = 0.01
    late: float = 0.02
    late_by_seconds: int = 2 * 3600
    subjects: int = 50_000
    max_event_bytes: int = 64 * 1024
    producer_attributes: float = 0.0  # fraction with an extra attribute naming a subject


def traffic(event_type: EventType, count: int, mix: TrafficMix, rng: random.Random, clock=time.time):
    """Yields ``count`` messages; each knows where it is expected to end up."""
    for message in _traffic(event_type, count, mix, rng, clock):
        if message.expected != DUPLICATE and rng.random() < mix.producer_attributes:
            subject = f"user-{rng.randrange(mix.subjects):06d}"
            message = dataclasses.replace(message, attributes={**message.attributes, PRODUCER_ATTRIBUTE: subject})
        yield message


def _traffic(event_type: EventType, count: int, mix: TrafficMix, rng: random.Random, clock):
    recent = collections.deque(maxlen=RECENT_EVENTS)
    kinds = list(MESSAGE_ERRORS)
    malformed_sent = 0
    first_millis = int(clock() * 1000)
    for _ in range(count):
        now_millis = int(clock() * 1000)
        draw = rng.random()
        late_at = now_millis - mix.late_by_seconds * 1000
        if draw < mix.late:
            # Late events belong to an hour that had traffic, so it has closed by now;
            # until the traffic is that old, the draw yields an ordinary event.
            if late_at >= first_millis:
                yield _event(event_type, rng, mix, late_at, LATE)
                continue
        elif draw < mix.late + mix.malformed:
            kind = kinds[malformed_sent % len(kinds)]
            malformed_sent += 1
            data, attributes = malformed(event_type, kind, rng, now_millis, mix.max_event_bytes)
            yield Message(data, attributes, DEAD_LETTER, kind)
            continue
        elif draw < mix.late + mix.malformed + mix.duplicates and recent:
            original = rng.choice(recent)
            yield Message(original.data, original.attributes, DUPLICATE)
            continue
        message = _event(event_type, rng, mix, now_millis, DELIVERED)
        recent.append(message)
        yield message


def _event(event_type, rng, mix, received_at_millis, expected) -> Message:
    fields = fake_fields(event_type, rng, mix.subjects)
    attributes = attributes_for(event_type, str(uuid.UUID(int=rng.getrandbits(128))), received_at_millis)
    return Message(json.dumps(fields).encode(), attributes, expected)


def publish_traffic(publisher: EventPublisher, messages, rate: float, progress=None) -> Ledger:
    """Publishes at most ``rate`` messages per second; ``progress(ledger)`` runs each second."""
    ledger = Ledger()
    started = time.monotonic()
    last_report = started
    for message in messages:
        publisher.publish_raw(message.data, message.attributes)
        ledger.record(message)
        ahead = ledger.published / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
        if progress and time.monotonic() - last_report >= 1:
            last_report = time.monotonic()
            progress(ledger)
    publisher.flush()
    return ledger


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(
        prog="python -m tools.local.loadgen",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--project", required=True)
    parser.add_argument("--event_type", required=True, choices=sorted(registry))
    parser.add_argument("--count", type=int, default=1000, help="Messages to publish, trouble included.")
    parser.add_argument("--rate", type=float, default=200, help="Messages per second.")
    parser.add_argument("--duplicates", type=float, default=0.05, help="Fraction re-sent with the same id.")
    parser.add_argument("--malformed", type=float, default=0.01, help="Fraction that must be dead-lettered.")
    parser.add_argument("--late", type=float, default=0.02, help="Fraction stamped --late_by_seconds ago.")
    parser.add_argument("--late_by_seconds", type=int, default=2 * 3600)
    parser.add_argument("--subjects", type=int, default=50_000, help="Distinct data subjects.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("duplicates", "malformed", "late"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be a fraction between 0 and 1")
    if args.duplicates + args.malformed + args.late > 1:
        parser.error("--duplicates + --malformed + --late must not exceed 1")
    if args.count < 0 or args.rate <= 0:
        parser.error("--count must be >= 0 and --rate > 0")
    mix = TrafficMix(args.duplicates, args.malformed, args.late, args.late_by_seconds, args.subjects)
    event_type = registry[args.event_type]
    messages = traffic(event_type, args.count, mix, random.Random(args.seed))

    def progress(ledger):
        print(f"{event_type.name}: {ledger.published}/{args.count} published", file=sys.stderr, flush=True)

    with preflight.exit_on_failure(parser.prog):
        preflight.check_topic(f"projects/{args.project}/topics/{event_type.topic}")
    ledger = publish_traffic(EventPublisher(args.project, event_type), messages, args.rate, progress)
    print(json.dumps({"published": ledger.published, "expected": ledger.expected}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
