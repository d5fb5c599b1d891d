"""Bucket what a job reads into UTC hours and group it into panes per (hour, shard, writer).

The window of an hour spans the hour itself plus its allowed lateness, so the
watermark closes it exactly when the contract says the hour closes: the timers of
``GatherPanes`` and ``CloseHour`` fire at the window's end. What is grouped here is
packed where it was read: dead letters, archived messages, late events and a bounded
input's events (a stream's on-time events are gathered by ``transforms.stream_panes``).

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
import typing
import uuid
import zlib

import apache_beam as beam
from apache_beam.transforms import trigger
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp

from event_delivery.contract.counts import hour_start_seconds
from event_delivery.contract.hours import into_hours
from transforms import any_trigger  # noqa: F401 - AfterAny as Dataflow runs it


def hour_windows(settings, when=None) -> beam.WindowInto:
    """Into the hour windows of ``settings`` (a ``DeliverySettings``), as every step of the path sees them."""
    return into_hours(settings, when)


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


def approximate_bytes(value) -> int:
    """About what ``value`` takes once encoded, to bound a shuffled element: the length of its
    bytes and of its strings in UTF-8, keys included, and 8 for anything else."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(approximate_bytes(k) + approximate_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(approximate_bytes(v) for v in value)
    return 8


def pane_key(element, window_seconds: int, num_shards: int, writer: str) -> tuple[int, int, str]:
    """``(bucket, shard, writer)``: the start of the element's hour (bucket), its id's shard,
    and the writer. Messages without an id (dead letters) spread over the shards by their arrival."""
    received_at_millis = element[1]
    shard = shard_of(element[0] or str(received_at_millis), num_shards)
    return hour_start_seconds(received_at_millis, window_seconds), shard, writer


class PackByShardFn(beam.DoFn):
    """Packs a bundle's elements into blobs per (bucket, shard), keyed by ``(bucket, shard, writer)``
    (the writer empty unless ``per_writer``; the bucket, so that a key holds one window: see
    ``pane_trigger``) and stamped with the earliest
    ``received_at`` in it, so the shuffle that forms panes moves a few pickled blobs instead
    of every event through Beam's per-field coder and the runner's grouping buffer (in
    ``make bench`` this halved the time of bucketing). With ``max_pack_bytes``, a pack is sent
    on once it holds that much, so no shuffled blob outgrows the bound, whatever the bundle.

    Packing pays only where a bundle holds many elements: where messages are read (dead
    letters, the raw archive) or in a bounded input. After a keyed stateful step a runner
    such as Dataflow hands over one key's work per bundle, and there is nothing to pack.

    Within a bucket every element of a pack falls into the same hour window, so windowing
    the pack by its stamp puts each of its elements where it would have gone on its own.
    The blobs never leave the job: they are written and read by its own workers.
    """

    def __init__(self, window_seconds: int, num_shards: int, per_writer: bool = False, max_pack_bytes=None):
        self.window_seconds = window_seconds
        self.num_shards = num_shards
        self.per_writer = per_writer
        self.max_pack_bytes = max_pack_bytes

    def start_bundle(self):
        self.packs = {}
        self.writer = writer_id() if self.per_writer else ""

    def process(self, element):
        received_at_millis = element[1]
        key = pane_key(element, self.window_seconds, self.num_shards, self.writer)
        pack = self.packs.get(key)
        if pack is None:
            pack = self.packs[key] = [received_at_millis, [], 0]
        pack[0] = min(pack[0], received_at_millis)
        pack[1].append(element)
        if self.max_pack_bytes:
            pack[2] += approximate_bytes(element)
            if pack[2] >= self.max_pack_bytes:
                yield from self._sealed(key, self.packs.pop(key))

    def finish_bundle(self):
        for key, pack in self.packs.items():
            yield from self._sealed(key, pack)
        self.packs = {}

    def _sealed(self, key: tuple, pack: list):
        """The pack, and in a stream one ``WEIGHT`` per ``PACK_WEIGHT_BYTES`` it holds past the
        first, stamped with its earliest arrival (see ``pane_trigger``)."""
        earliest_millis, elements, _ = pack
        blob = pickle.dumps(elements, protocol=pickle.HIGHEST_PROTOCOL)
        keyed = (key, blob)
        stamp = Timestamp(micros=earliest_millis * 1000)
        weights = -(-len(blob) // PACK_WEIGHT_BYTES) - 1 if self.max_pack_bytes else 0
        for value in (keyed, *[(keyed[0], WEIGHT)] * weights):
            yield GlobalWindows.windowed_value(value, stamp)


WEIGHT = b""  # an element that only weighs: ``FormPanes`` drops it
PACK_WEIGHT_BYTES = 64 * 1024  # what a pack, or a weight among packs, stands for


class FormPanesFn(beam.DoFn):
    """A key's grouped values in (packs and their weights); its
    panes out, each ``((shard, writer), [elements])`` of at most ``max_pane_bytes``, or one
    pane of them all. The hour leaves the key here: the window holds it from now on.

    A pane is one element from here on, through the shuffle into the stateful steps that
    filter and write it. Streaming Engine refuses a commit or a value past ~80 MB, and the
    key then holds the watermark for good; a trigger bounds a pane in time only, and a
    backlog, a burst or fewer writers fill it beyond any size. So a stream's panes are cut
    at a byte bound (each pack itself bounded). A bounded
    input's one pane per (hour, shard) is not cut: its deduplication needs the whole of it,
    and a batch shuffle has no such limit.
    """

    def __init__(self, max_pane_bytes=None):
        self.max_pane_bytes = max_pane_bytes

    def process(self, keyed_values):
        (_, *pane_key), values = keyed_values
        pane_key, pane, size = tuple(pane_key), [], 0
        for value in values:
            if value == WEIGHT:
                continue
            elements = pickle.loads(value)
            if self.max_pane_bytes:
                if pane and size + len(value) > self.max_pane_bytes:
                    yield pane_key, pane
                    pane, size = [], 0
                size += len(value)
            pane.extend(elements)
        if pane:
            yield pane_key, pane


def pane_trigger(settings) -> trigger.TriggerFn:
    """When a key's panes fire: a bounded input's once per hour; a stream's every
    ``trigger_seconds`` while the hour is open, or as soon as twice ``max_pane_bytes`` wait
    (counted in packs, each standing for ``PACK_WEIGHT_BYTES``, with weights added where a pack
    holds more: ``PackByShardFn``), whichever comes first; when it closes; and afterwards, for
    stragglers, on the same two.

    A firing leaves in one commit, with every pane ``FormPanes`` cuts from it. Streaming
    Engine refuses a key's commit past ~180 MB, and a firing's commit cannot be split as the
    input of a work item can (apache/beam#19956): the key would be retried for good. So a
    firing holds what waited before it (less than twice ``max_pane_bytes``, 32 MB) plus one
    work item's input, whatever the rate, the backlog, the size of the events or the number
    of writers; and since a key is one hour's (its bucket leads it), the timers that fire
    together in one work item fire one window's panes, however many hours a backlog spans.
    """
    s = settings
    if s.trigger_seconds is None:  # a bounded input: one pane per hour and shard
        return trigger.DefaultTrigger()
    waited = max(1, 2 * s.max_pane_bytes // PACK_WEIGHT_BYTES)
    if s.trigger_events:  # a count for the clock (the bench's): of two counts the smaller fires first
        either = trigger.AfterCount(min(s.trigger_events, waited))
    else:  # on the local runner as on Dataflow: see transforms.any_trigger
        either = trigger.AfterAny(trigger.AfterProcessingTime(s.trigger_seconds), trigger.AfterCount(waited))
    return trigger.AfterWatermark(early=either, late=either)


class BucketByHour(beam.PTransform):
    """``(id, received_at_millis, payload)`` in; ``((shard, writer), [elements])`` panes out.

    Every copy of an id lands in the same shard. A stream's panes are split further by
    writer, and cut at ``max_pane_bytes`` (see ``FormPanesFn``); a bounded input's are not
    (writer ``""``): its one pane per (hour, shard) holds every copy of an id, which is how
    it deduplicates. Packing pays where bundles are read (see ``PackByShardFn``): a stream's events
    are gathered into panes by ``transforms.stream_panes``.

    When a pane fires is ``pane_trigger``'s. Which pane it is (early, on time, late) is decided downstream by state,
    not by the runner's pane label: the Python DirectRunner labels panes with a
    watermark that event timestamps from the past can hold back.
    """

    def __init__(self, settings):
        """``settings`` is the job's ``DeliverySettings``."""
        super().__init__()
        self.settings = settings

    def expand(self, elements):
        s = self.settings
        bound = None if s.bounded else s.max_pane_bytes
        pack = PackByShardFn(s.window_seconds, s.num_shards, per_writer=not s.bounded, max_pack_bytes=bound)
        return (
            elements
            | "PackByShard" >> beam.ParDo(pack).with_output_types(tuple[tuple[int, int, str], bytes])
            | "HourWindows" >> hour_windows(s, pane_trigger(s))
            | "GroupIntoPanes" >> beam.GroupByKey()
            | "FormPanes" >> beam.ParDo(FormPanesFn(bound)).with_output_types(tuple[tuple[int, str], list[typing.Any]])
        )
