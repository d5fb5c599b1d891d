"""Bucket events into UTC hours and group them into panes per (hour, shard, writer).

The window of an hour spans the hour itself plus its allowed lateness, so the
watermark closes it exactly when the contract says the hour closes: the timers of
``Deduplicate`` and ``CloseHour`` fire at the window's end.

A pane's key is its events' id shard and, in a stream, the *writer*: the worker
process that read them. Every copy of an id lands in the same shard, which is what
a restarted run's deduplication needs; the writer splits each shard over the worker
processes, so the steps that form, filter and write panes run on as many keys as
the job has processes, not on the shard count. A runner processes one key's work at a
time. The writer is the process, not the thread: each key writes a file per pane,
and a key per thread would multiply the files by the threads for nothing.
"""

from __future__ import annotations

import pickle
import uuid
import zlib

import apache_beam as beam
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Duration, Timestamp

from event_delivery.contract.hours import HourWindows


def hour_windows(settings, when=None) -> beam.WindowInto:
    """Into the hour windows of ``settings`` (a ``DeliverySettings``), as every step of the path sees them."""
    return beam.WindowInto(
        HourWindows(settings.window_seconds, settings.allowed_lateness_seconds),
        trigger=when or trigger.DefaultTrigger(),
        accumulation_mode=trigger.AccumulationMode.DISCARDING,
        # Parsing dead-letters events older than one horizon on arrival; the second
        # horizon is slack between arrival and the watermark, so the runner never
        # drops an event as too late.
        allowed_lateness=Duration(seconds=2 * settings.late_horizon_seconds),
    )


WRITER = uuid.uuid4().hex[:12]  # this worker process, as pane keys and file names name it


def writer_id() -> str:
    """The id of the worker process this runs in: the same for all its threads."""
    return WRITER


def bucket_start_seconds(interval_window) -> int:
    """The start of the hour (bucket) a window belongs to, in epoch seconds."""
    return interval_window.start.micros // 1_000_000


def shard_of(event_id: str, num_shards: int) -> int:
    """A stable shard for an id, the same on every worker (unlike ``hash``)."""
    return zlib.crc32(event_id.encode("utf-8")) % num_shards


class PackByShardFn(beam.DoFn):
    """Packs a bundle's elements into one blob per (bucket, shard), keyed by ``(shard, writer)``
    (the writer empty unless ``per_writer``) and stamped with the earliest
    ``received_at`` in it, so the shuffle that forms panes moves a few pickled blobs instead
    of every event through Beam's per-field coder and the runner's grouping buffer (in
    ``make bench`` this halved the time of bucketing).

    Within a bucket every element of a pack falls into the same hour window, so windowing
    the pack by its stamp puts each of its elements where it would have gone on its own.
    The blobs never leave the job: they are written and read by its own workers.
    """

    def __init__(self, window_seconds: int, num_shards: int, per_writer: bool = False):
        self.window_millis = window_seconds * 1000
        self.num_shards = num_shards
        self.per_writer = per_writer

    def start_bundle(self):
        self.packs = {}
        self.writer = writer_id() if self.per_writer else ""

    def process(self, element):
        event_id, received_at_millis = element[0], element[1]
        # Messages without an id (dead letters) spread by their arrival instead of all landing in one shard.
        shard = shard_of(event_id or str(received_at_millis), self.num_shards)
        key = (received_at_millis - received_at_millis % self.window_millis, shard)
        pack = self.packs.get(key)
        if pack is None:
            self.packs[key] = [received_at_millis, [element]]
        else:
            pack[0] = min(pack[0], received_at_millis)
            pack[1].append(element)

    def finish_bundle(self):
        for (_, shard), (earliest_millis, elements) in self.packs.items():
            pack = pickle.dumps(elements, protocol=pickle.HIGHEST_PROTOCOL)
            yield GlobalWindows.windowed_value(((shard, self.writer), pack), Timestamp(micros=earliest_millis * 1000))
        self.packs = {}


def _unpack(keyed_packs):
    pane_key, packs = keyed_packs
    return pane_key, [element for pack in packs for element in pickle.loads(pack)]


class BucketByHour(beam.PTransform):
    """``(id, received_at_millis, payload)`` in; ``((shard, writer), [elements])`` panes out.

    Every copy of an id lands in the same shard. A stream's panes are split further by
    writer; a bounded input's are not (writer ``""``): its one pane per (hour, shard)
    holds every copy of an id, which is how it deduplicates.

    A pane fires every ``trigger_seconds`` while the hour is open, when it closes, and
    afterwards for stragglers. Which of those a pane is, is decided downstream by state,
    not by the runner's pane label: the Python DirectRunner labels panes with a
    watermark that event timestamps from the past can hold back.
    """

    def __init__(self, settings):
        """``settings`` is the job's ``DeliverySettings``."""
        super().__init__()
        self.settings = settings

    def expand(self, elements):
        s = self.settings
        if s.trigger_seconds is None:  # a bounded input: one pane per hour and shard
            when = trigger.DefaultTrigger()
        else:
            flush = trigger.AfterProcessingTime(s.trigger_seconds)
            when = trigger.AfterWatermark(early=flush, late=flush)
        return (
            elements
            | "PackByShard"
            >> beam.ParDo(PackByShardFn(s.window_seconds, s.num_shards, per_writer=not s.bounded)).with_output_types(
                tuple[tuple[int, str], bytes]
            )
            | "HourWindows" >> hour_windows(s, when)
            | "GroupIntoPanes" >> beam.GroupByKey()
            | "Unpack" >> beam.Map(_unpack)
        )
