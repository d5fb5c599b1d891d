"""The settings every delivery transform takes: one object, resolved and checked once."""

from __future__ import annotations

import dataclasses

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import EventType
from event_delivery.keys.config import KeyConfig

DAY_SECONDS = 24 * 3600
# The layout of the state a stream keeps: its stateful steps' keys and coders, the triggers
# of its groupings, and the shape of the elements they hold. An in-place update hands state
# over only within one layout, so any change to them bumps it (``make update`` refuses a
# running job of another).
# 2: panes are grouped by (hour, shard, writer) and fire on the bytes waiting.
# 3: ``Deduplicate`` numbers the staged files (``StageDelivered`` keeps no state), and the close's
#    index of an hour's ids is shuffled to (hour, shard, group of buckets) keys (``WriteIndexBuckets``).
# 4: events cross shuffles and rest in panes as encoded records (``transforms.records``), not field dicts.
# 5: a stream's panes are gathered in state by ``GatherPanes``, which numbers them too: no grouping
#    of events into panes, no ``Deduplicate`` step after it.
# 6: an hour's parts are written after its index, whose keys list the hour's later copies of ids for the
#    parts to leave out (``transforms.close_repeats``): ``PartsWhenIndexed`` counts the buckets.
# 7: ``CloseHour`` keeps the staged files that wait for a closing hour's marker to move late (a bag, a
#    cell, a timer); a late pane of an hour without its marker is staged for its close.
# 8: no ``MarkRepeats``: an event's body crosses one keyed shuffle, ``GatherPanes``, whose pane cell is
#    (events waiting, their bytes, whether the hour closed); the close drops an hour's repeats.
STATE_LAYOUT = 8


@dataclasses.dataclass(frozen=True)
class DeliverySettings:
    """Everything the delivery path needs about one type's job.

    ``trigger_seconds`` is None for a bounded input (a backfill, a redrive): each hour
    and shard then comes as one pane. Tier defaults are resolved by whoever builds the
    settings (``pipelines.options.delivery_settings``); here every value is final.
    """

    event_type: EventType
    layout: Layout
    keys: KeyConfig
    allowed_lateness_seconds: int
    num_shards: int
    trigger_seconds: int | None = 60
    # A stream's panes fire after this many events instead of every ``trigger_seconds``: for a
    # runner with no processing-time clock (the bench runs the streaming path on the batch runner).
    trigger_events: int | None = None
    late_horizon_seconds: int = 7 * DAY_SECONDS
    max_future_seconds: int = 3600
    max_event_bytes: int = 64 * 1024
    # A stream's largest shuffled pane, and what a key lets wait before its panes fire (see
    # ``transforms.hours.pane_trigger``): Streaming Engine refuses a value past ~80 MB, a commit past ~180 MB.
    max_pane_bytes: int = 16 * 1024 * 1024
    target_file_mb: int = 128  # an hour's pane files are compacted at close into parts this big; 0: one per pane
    codec: str = files.AVRO_CODEC  # of the delivered, late and dead-letter files (staged panes are uncompressed)
    run_id: str = dataclasses.field(default_factory=partitions.new_run_id)

    def __post_init__(self):
        partitions.check_window_seconds(self.window_seconds)
        for name in ("allowed_lateness_seconds", "late_horizon_seconds", "max_future_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("trigger_seconds", "trigger_events", "num_shards", "max_event_bytes", "max_pane_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.codec not in files.CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {', '.join(files.CODECS)}")
        if self.target_file_mb < 0:
            raise ValueError("target_file_mb must not be negative")
        if self.late_horizon_seconds <= self.window_seconds + self.allowed_lateness_seconds:
            raise ValueError("late_horizon_seconds must exceed window_seconds + allowed_lateness_seconds")

    @property
    def window_seconds(self) -> int:
        return self.layout.window_seconds

    @property
    def bounded(self) -> bool:
        """A bounded input: each hour and shard comes as one pane."""
        return self.trigger_seconds is None
