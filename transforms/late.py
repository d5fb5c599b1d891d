"""Late panes, and panes staged for an hour that closed before their report reached the close
(``move_late_checked``): written to the late root, less the ids that their hour already holds, for the
whole late horizon.

No state per id is kept: for the whole late horizon (7 days) it is not affordable at 1M events/s.
So the close leaves the hour's ids behind, in an *index* beside the hour (``Layout.id_index``),
written before the marker; late panes, which are rare, read it (``transforms.id_index``), and what
a pane reads of it and of the late files is bounded by the pane's ``ReadBudget``, never the hour.

``WriteLatePanes`` keys late panes by (hour, shard) alone, so one key's work, a pane at a
time, reads the index and the late files that earlier panes of its shard wrote, and
drops the ids found there as duplicates (an hour report, so the hour's accounting stays
``in = delivered + duplicates + late + dead-lettered``). A retried work item rewrites the
files it wrote before under the same numbers, perhaps for panes in another order: files of
this key numbered at or past the number state kept are no earlier copies, and a pane that
keeps nothing deletes the file a lost try may have written under its number (a deletion denied for
good leaves the ids it holds late there, not duplicates too: counted). A pane that
cannot read what it should (an index missing or unreadable) is written as it is and counted
(``late_panes_unchecked``): the index is a way to drop repeats, never a reason to stall.

Until the hour's marker is written its index is not complete (the close has not planned, or is
publishing). A late pane then is staged for the hour instead, reported delivered: a close that has
not planned yet publishes it with the hour, one that has keeps it waiting in its state (``Waiting``)
and moves it late less the ids the hour holds once the marker is written, and no longer than
``WAITING_SECONDS`` after it began to wait (then unchecked, counted).
"""

from __future__ import annotations

import logging
import posixpath
import re

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from transforms import retries
from transforms.dedup import keep_first_copies
from transforms.hours import bucket_start_seconds, shard_of
from transforms.id_index import ReadBudget, indexed_ids
from transforms.reports import DELIVERED, DUPLICATES, LATE, report
from transforms.write import WRITE_FAILED, WriteBoundedPaneFn, WriteStreamPaneFn, given_up_as_dead_letters

_LOG = logging.getLogger(__name__)
NUMBER = WriteStreamPaneFn.NUMBER
# Files staged for an hour that is closing but not yet published wait for its marker, when its index is
# complete, to move late less the ids it holds (``Waiting``): looked for this often, each for at most this
# long (then it moves unchecked, counted). A drain expires the close's state: they stay staged for the next
# run's start.
LOOKING_SECONDS = 60
WAITING_SECONDS = 1800


class WriteLatePaneFn(WriteStreamPaneFn):
    """Writes a late pane of an (hour, shard) less the ids its hour already holds: delivered (in the
    index), or written late by an earlier pane of the shard. Those are counted as duplicates."""

    def __init__(self, settings):
        schema = settings.event_type.delivered_schema  # records encoded where sealed: no ``to_record``
        super().__init__(
            settings, settings.layout.late, LATE, schema, None, True, settings.codec, partitions.LATE_SERIES
        )
        self.num_shards = settings.num_shards
        staged_late = (files.UNCOMPRESSED, partitions.STAGED_LATE_SERIES)
        self.staging = WriteBoundedPaneFn(
            settings, settings.layout.staging, DELIVERED, schema, None, True, *staged_late
        )

    def default_label(self):
        return "WriteLatePaneFn"  # its own name, not the one its parent keeps for running jobs

    def setup(self):
        super().setup()
        self.staging.setup()
        self.duplicates = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DUPLICATES)
        self.unchecked = beam.metrics.Metrics.counter(slo.NAMESPACE, "late_panes_unchecked")
        self.left_by_lost_tries = beam.metrics.Metrics.counter(slo.NAMESPACE, "late_files_left_by_lost_tries")

    def process(
        self, pane_elements, window=beam.DoFn.WindowParam, number=beam.DoFn.StateParam(WriteStreamPaneFn.NUMBER)
    ):
        (shard, writer), pane = pane_elements
        events = keep_first_copies(pane, set())  # a second copy within the pane: counted
        repeats = len(pane) - len(events)
        if not events:
            yield from self._counted(repeats)
            return
        current = number.read() or 0  # the file this pane writes: on a retry, the one it wrote before
        if not files.exists(self.layout.marker(bucket_start_seconds(window))):
            # The hour is still open downstream, or closing: its close publishes the pane or, once its marker
            # is written and its index complete, moves it late less the ids the hour holds.
            yield from self._counted(repeats)
            number.write(current + 1)
            yield from self.staging.write(((shard, writer), events), window, current)
            return
        event_ids = {e[0] for e in events}
        held = self._held_by_the_hour(window, shard, event_ids, current)
        kept = [e for e in events if e[0] not in held]
        if not kept:  # an earlier try of this pane may have written it unchecked: its commit was lost, so is its file
            held -= self._left_by_a_lost_try(
                partitions.join(self._folder(window), self._name(shard, writer, current)), event_ids
            )
        yield from self._counted(repeats + sum(1 for e in events if e[0] in held))
        if kept:
            number.write(current + 1)
            yield from self.write(((shard, writer), kept), window, current)

    def _counted(self, duplicates: int):
        if duplicates:
            self.duplicates.inc(duplicates)
            yield report(DUPLICATES, duplicates)

    def _uncommitted(self, path: str, current: int) -> bool:
        """Whether ``path`` is one of this key's files from a try whose commit was lost: numbered at or past
        the number state kept. It is no earlier copy: the retry may take its panes in another order, and
        rewrites those names."""
        prefix = re.escape(f"{self.layout.event_type}-{self.run_id}-{partitions.LATE_SERIES}")
        written = re.match(rf"{prefix}(\d+)-s", posixpath.basename(path))
        return bool(written) and int(written.group(1)) >= current

    def _held_by_the_hour(self, window, shard: int, event_ids: set[str], current: int) -> set[str]:
        hour = HourHeld(self.layout, bucket_start_seconds(window), shard, self.num_shards)
        held = hour.of(event_ids, skip=lambda path: self._uncommitted(path, current))
        for what, error in hour.unchecked:
            self._count_unchecked(what, error)
        return held

    def _left_by_a_lost_try(self, path: str, event_ids: set[str]) -> set[str]:
        """Deletes the file a try whose commit was lost may have written under this pane's number; returns
        those of ``event_ids`` that it still holds when the deletion is denied for good. Those are late in
        it (the audit counts its records), so not duplicates too: counted (``late_files_left_by_lost_tries``)
        instead. Another error is retried (``transforms.retries``), then fails the bundle: the runner retries."""
        try:
            retries.with_retries(lambda: files.delete_existing([path]), passing=lambda error: not retries.denied(error))
            return set()
        except Exception as error:
            if not retries.denied(error):
                raise
            _LOG.error("a late file of a lost commit, %s, could not be deleted (%s)", path, type(error).__name__)
        self.left_by_lost_tries.inc()
        try:
            return event_ids.intersection(files.read_event_ids(path))
        except Exception as error:
            if not retries.denied(error):
                raise
            return event_ids  # it may hold any of them: none is counted twice

    def _count_unchecked(self, what: str, error: Exception) -> None:
        self.unchecked.inc()
        _LOG.warning("a late pane of %s was not checked against %s (%s)", self.layout.event_type, what, why(error))


def why(error: Exception) -> str:
    """What a check that did not happen logs as its reason: a refusal says why, an error names its type."""
    return str(error) if isinstance(error, LookupError) else type(error).__name__


class HourHeld:
    """Which ids a closed hour already holds for one of its shards: delivered (its index) or late (its late
    files), as far as one ``ReadBudget`` reads. What it could not check is in ``unchecked``, ``(what, error)``:
    the index is a way to drop repeats, never a reason to stall."""

    def __init__(self, layout, hour_start: int, shard: int, num_shards: int):
        self.layout, self.hour_start, self.shard, self.num_shards = layout, hour_start, shard, num_shards
        self.unchecked = []

    def of(self, event_ids: set[str], skip=lambda path: False) -> set[str]:
        """Those of ``event_ids`` the hour holds; late files that ``skip`` names are not read."""
        budget, held = ReadBudget(), set()
        try:
            held |= indexed_ids(self.layout, self.hour_start, self.shard, event_ids, self.num_shards, budget)
        except Exception as error:  # noqa: BLE001 - see the class
            self.unchecked.append(("its hour's index", error))
        try:
            folder = self.layout.hour(self.layout.late, self.hour_start)
            late_files = partitions.late_files_of_shard(folder, self.layout.event_type, self.shard)
            for path, size in sorted(late_files.items()):
                if not skip(path) and budget.allows(size):
                    held |= event_ids.intersection(files.read_event_ids(path))
        except Exception as error:  # noqa: BLE001 - as above
            self.unchecked.append(("the late files of its shard", error))
        if budget.spent:
            self.unchecked.append(("all it should", LookupError(f"past its {budget.limit} bytes to read")))
        return held


def move_late_checked(layout, hour_start: int, staged: str, destination: str, num_shards: int, codec: str):
    """A pane file staged for an hour that has closed, moved to ``destination`` in the late root less the ids
    the hour already holds (``HourHeld``, per shard of ``num_shards``); returns ``(records moved, repeats
    dropped, what went unchecked)``, or None if ``staged`` is gone (a try whose commit was lost moved it).

    The repeats are counted beside the late files, in a count named after the staged file, and the staged
    file is deleted last: a try that runs again after a crash finds what it wrote under the same names, and
    does not take its own late file (``destination``) for an earlier copy. What it writes replaces all an
    earlier try wrote, also when it drops every id (no late file) or none (no count): an earlier try may
    have read less of the index (an error it took for unchecked), or more."""
    if not files.exists(staged):
        return None
    event_ids = files.read_event_ids(staged)
    by_shard: dict[int, set[str]] = {}  # one shard, unless another run staged the file
    for event_id in event_ids:
        by_shard.setdefault(shard_of(event_id, num_shards), set()).add(event_id)
    held, unchecked = set(), []
    for shard, ids in sorted(by_shard.items()):
        hour = HourHeld(layout, hour_start, shard, num_shards)
        held |= hour.of(ids, skip=lambda path: path == destination)
        unchecked += hour.unchecked
    if not held:
        moved = files.concatenate_avro([staged], destination, codec)
    elif len(held) < len(event_ids):
        moved = files.rewrite_avro_without([staged], destination, {staged: held}, codec)
    else:
        files.delete_existing([destination])
        moved = 0
    count = partitions.join(posixpath.dirname(destination), partitions.late_duplicates_of(staged))
    if held:
        files.write_json(count, {DUPLICATES: len(event_ids) - moved})
    else:
        files.delete_existing([count])
    files.delete_existing([staged])
    return moved, len(event_ids) - moved, unchecked


class LateMover:
    """``CloseHour``'s mover of files staged after the close (``move_late_checked``), with its counters."""

    def __init__(self, settings):
        self.layout, self.num_shards, self.codec = settings.layout, settings.num_shards, settings.codec
        self.late = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.LATE)
        self.duplicates = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DUPLICATES)
        self.unchecked = beam.metrics.Metrics.counter(slo.NAMESPACE, "late_panes_unchecked")
        self.denied = beam.metrics.Metrics.counter(slo.NAMESPACE, "late_moves_denied")

    def move(self, staged: str, hour_start: int) -> None:
        """As ``move_late_checked``, to the hour's late folder under the staged file's name, counted and logged.

        A move denied for good (no right to write the late root) leaves the file staged, sealed, counted
        (``late_moves_denied``) and logged, and the close goes on: a later run's start moves it (see
        ``CloseHourFn._clear_up_after_the_marker``). Any other error goes to the runner, which retries."""
        destination = partitions.join(self.layout.hour(self.layout.late, hour_start), posixpath.basename(staged))
        try:
            moved = move_late_checked(self.layout, hour_start, staged, destination, self.num_shards, self.codec)
        except Exception as error:
            if not retries.denied(error):
                raise
            self.denied.inc()
            _LOG.error("moving %s late was denied (%s): it stays staged", staged, type(error).__name__)
            return
        if moved is None:
            return
        records, repeats, unchecked = moved
        self.late.inc(records)
        self.duplicates.inc(repeats)
        for what, error in unchecked:
            self.unchecked.inc()
            _LOG.warning("late file %s was not checked against %s (%s)", staged, what, why(error))


class Waiting:
    """A closing hour's staged files that wait for its marker to move late, in ``CloseHourFn``'s state: a
    bag of ``(path, when it began to wait)``, when the timer that looks for the marker was set, and the
    timer."""

    def __init__(self, files_waiting, looking, look_again):
        self.files_waiting, self.looking, self.look_again = files_waiting, looking, look_again

    def add(self, path: str, now: float) -> None:
        self.files_waiting.add((path, int(now)))
        if self.looking.read() is None:
            self.looking.write(int(now))
            self.look_again.set(Timestamp(now + LOOKING_SECONDS))

    def due(self, published: bool, now: float) -> list[str]:
        """The files to move now: all once the hour is ``published``, else those that waited long enough;
        the timer looks again for the rest."""
        waiting = list(self.files_waiting.read())
        due = [(path, since) for path, since in waiting if published or now - since >= WAITING_SECONDS]
        rest = [entry for entry in waiting if entry not in due]
        self.files_waiting.clear()
        for entry in rest:
            self.files_waiting.add(entry)
        if rest:
            self.look_again.set(Timestamp(now + LOOKING_SECONDS))
        else:
            self.looking.clear()
        return sorted({path for path, _ in due})


def _keyed_by_shard(pane):
    """A late pane keyed by its shard alone: one key's work at a time sees the late files of the others."""
    (shard, _), events = pane
    return (shard, ""), events


class WriteLatePanes(beam.PTransform):
    """``((shard, writer), [events])`` late panes in; a ``Result`` out, as from ``WriteAvroPanesOrGiveUp``:
    hour reports of late files and duplicates (``output``), and the events of a pane whose write
    failed for good as ``write_failed`` ``dead_letters``, unsealed again with ``key_cache``'s keys."""

    def __init__(self, settings, key_cache):
        super().__init__()
        self.settings = settings
        self.key_cache = key_cache

    def expand(self, panes):
        written = (
            panes
            | "KeyByShard" >> beam.Map(_keyed_by_shard)
            | "WriteFiles" >> beam.ParDo(WriteLatePaneFn(self.settings)).with_outputs(WRITE_FAILED, main="reports")
        )
        return given_up_as_dead_letters(written, self.settings.event_type, self.key_cache)
