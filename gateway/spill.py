"""The spill: events Pub/Sub did not acknowledge in time, durable in SQLite on local disk.

An event is safe once ``add`` returns: the rows are committed with ``synchronous=FULL``, so
they survive a crash of the process or of the machine. ``oldest`` hands them back ``high``
tier first (by the tier's ``recovery_order``), oldest first within a tier; ``remove``
forgets them once Pub/Sub has them. A crash between the two publishes an event twice,
which delivery deduplicates by ``event_id``.

The class is synchronous and not thread-safe: the gateway calls it from one thread.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sqlite3
import time

from event_delivery.contract.registry import TIERS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rank INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    data BLOB NOT NULL,
    attributes TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    spilled_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_rank ON events (rank, seq);
"""
_TIER_OF_RANK = {tier.recovery_order: name for name, tier in TIERS.items()}


@dataclasses.dataclass(frozen=True)
class SpilledEvent:
    seq: int
    event_type: str
    data: bytes
    attributes: dict[str, str]
    size: int


@dataclasses.dataclass(frozen=True)
class Usage:
    """What one (type, tier) holds in the spill."""

    event_type: str
    tier: str
    events: int
    size: int
    oldest_spilled_at: float


def event_size(data: bytes, attributes: dict[str, str]) -> int:
    """The bytes an event counts against the spill's cap: its data and its attributes."""
    return len(data) + sum(len(k) + len(v) for k, v in attributes.items())


class Spill:
    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def add(self, tier: str, events: list[tuple[str, bytes, dict[str, str]]]) -> None:
        """Stores ``(event_type, data, attributes)`` events of one tier in one durable transaction."""
        now, rank = time.time(), TIERS[tier].recovery_order
        rows = [(rank, t, data, json.dumps(attrs), event_size(data, attrs), now) for t, data, attrs in events]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO events (rank, event_type, data, attributes, bytes, spilled_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def oldest(self, limit: int) -> list[SpilledEvent]:
        """Up to ``limit`` events, ``high`` tier first, then by age."""
        rows = self.db.execute(
            "SELECT seq, event_type, data, attributes, bytes FROM events ORDER BY rank, seq LIMIT ?", (limit,)
        )
        return [SpilledEvent(seq, t, data, json.loads(attrs), size) for seq, t, data, attrs, size in rows]

    def remove(self, seqs: list[int]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])

    def usage(self) -> list[Usage]:
        rows = self.db.execute(
            "SELECT event_type, rank, COUNT(*), SUM(bytes), MIN(spilled_at) FROM events GROUP BY event_type, rank"
        )
        return [Usage(t, _TIER_OF_RANK[rank], n, size, oldest) for t, rank, n, size, oldest in rows]

    def close(self) -> None:
        self.db.close()
