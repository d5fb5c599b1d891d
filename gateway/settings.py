"""What a gateway is told at start: one settings object, filled by the command line."""

from __future__ import annotations

import dataclasses
import pathlib

from event_delivery.contract.partitions import HOUR_SECONDS

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    """Limits and timings of one gateway process; the defaults suit one Cloud Run instance."""

    project: str
    spill_dir: pathlib.Path
    host: str = "0.0.0.0"
    port: int = 8080
    # Pub/Sub takes at most 10 MB a request; an event past max_event_bytes is refused at the door.
    max_body_bytes: int = 10 * MIB
    max_event_bytes: int = 1 * MIB
    max_header_bytes: int = 16 * 1024
    # A publish not acknowledged in this time goes to the spill (or is shed, by tier).
    publish_timeout_seconds: float = 1.0
    # Messages the gateway may have in flight to Pub/Sub, all types together (tiers take shares of it).
    max_in_flight: int = 10_000
    spill_max_bytes: int = 1024 * MIB
    # The heartbeat fails when the spill is this full, or the spill's disk has less free than this.
    heartbeat_spill_fraction: float = 0.9
    min_free_disk_bytes: int = 100 * MIB
    retry_after_seconds: int = 5
    window_seconds: int = HOUR_SECONDS
    report_seconds: float = 60.0
    drain_seconds: float = 10.0

    @property
    def spill_path(self) -> pathlib.Path:
        return self.spill_dir / "spill.sqlite"
