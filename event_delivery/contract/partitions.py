"""Where things are written: the hour-partitioned layout of the output contract."""

from __future__ import annotations

import dataclasses
import datetime
import posixpath
import re

from event_delivery.cloud import files

HOUR_SECONDS = 3600
SUCCESS_MARKER = "_SUCCESS"
AUDIT_COUNTS = "counts.json"  # the auditor's count of an hour, under the audit root
RAW_ARCHIVE = "raw"  # the raw archive's folder under a storage root (the bucket's root in production)
# How long the raw archive is kept: the window in which an hour can be backfilled (re-delivered,
# re-counted, re-sealed), and the bound on the copies it holds (sealed, but for their envelope and
# key ids). A bucket lifecycle rule on RAW_ARCHIVE/ enforces it; forget's guarantees name it.
RAW_ARCHIVE_RETENTION_DAYS = 90


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every place a type's job writes, from its roots: the one source of output paths.

    ``<storage_root>/delivered``, ``late``, ``dead-letter`` and (optionally) ``raw`` by
    default; each can be placed elsewhere. Staged panes wait under ``delivered/_staging``
    until their hour closes (``_`` hides the folder from Hive and Spark). The auditor's
    counts of what was published go under ``<storage_root>/audit`` (none without a storage root).
    """

    event_type: str
    window_seconds: int
    delivered: str
    late: str
    dead_letter: str
    raw_archive: str | None = None
    audit: str | None = None

    @classmethod
    def under(cls, storage_root: str, event_type: str, window_seconds: int, raw_archive: bool = False) -> Layout:
        root = str(storage_root).rstrip("/")
        raw = f"{root}/{RAW_ARCHIVE}" if raw_archive else None
        return cls(
            event_type, window_seconds, f"{root}/delivered", f"{root}/late", f"{root}/dead-letter", raw, f"{root}/audit"
        )

    @property
    def staging(self) -> str:
        return join(self.delivered, "_staging")

    @property
    def id_index(self) -> str:
        """Where a closed hour's ids wait for its late repeats (see ``transforms.late``); ``_``
        hides it from Hive and Spark, as staging."""
        return join(self.delivered, "_index")

    @property
    def roots(self) -> list[str]:
        """Every root the layout writes under (staging and the id index lie inside delivered)."""
        every = (self.delivered, self.staging, self.id_index, self.late, self.dead_letter, self.raw_archive, self.audit)
        return [root for root in every if root]

    def hour(self, root: str, window_start_seconds: float) -> str:
        """The folder of the hour (bucket) starting at ``window_start_seconds`` under ``root``."""
        return partition_dir(root, self.event_type, window_start_seconds, self.window_seconds)

    def marker(self, window_start_seconds: float) -> str:
        return join(self.hour(self.delivered, window_start_seconds), SUCCESS_MARKER)

    def audit_counts(self, window_start_seconds: float) -> str:
        """The auditor's ``counts.json`` of the hour starting at ``window_start_seconds``."""
        if self.audit is None:
            raise ValueError("this layout has no audit root: build it from a storage root")
        return join(self.hour(self.audit, window_start_seconds), AUDIT_COUNTS)


def check_window_seconds(window_seconds: int) -> None:
    """Buckets must tile the hour so that every bucket has one folder of its own."""
    if window_seconds <= 0 or HOUR_SECONDS % window_seconds:
        raise ValueError(f"window_seconds must divide 3600 (1 hour), not {window_seconds}")


def partition(window_start_seconds: float, window_seconds: int = HOUR_SECONDS) -> str:
    """``dt=YYYY-MM-DD/hr=HH``; buckets shorter than an hour add minutes and seconds."""
    start = datetime.datetime.fromtimestamp(window_start_seconds, tz=datetime.timezone.utc)
    hour = f"{start:%H}" if window_seconds == HOUR_SECONDS else f"{start:%H-%M-%S}"
    return f"dt={start:%Y-%m-%d}/hr={hour}"


def partition_bounds(partition: str, window_seconds: int) -> tuple[int, int]:
    """Epoch millis ``[start, end)`` of a ``dt=YYYY-MM-DD/hr=...`` partition."""
    day, hour = (part.split("=", 1)[1] for part in partition.split("/"))
    clock = hour.split("-") + ["00", "00"]
    start = datetime.datetime.fromisoformat(f"{day}T{clock[0]}:{clock[1]}:{clock[2]}+00:00")
    start_millis = int(start.timestamp() * 1000)
    return start_millis, start_millis + window_seconds * 1000


def partition_dir(root: str, event_type: str, window_start_seconds: float, window_seconds: int) -> str:
    return join(root, event_type, partition(window_start_seconds, window_seconds))


STAGED_SERIES = "p"  # panes written to staging, the dead letters, the raw archive: each a root of its own
LATE_SERIES = "l"  # panes written to the late root, beside staged panes moved there under their own name
# Late panes staged for an hour without its marker yet (``transforms.late``): their own names, in staging and
# in the late root once moved there, never those of a pane written late.
STAGED_LATE_SERIES = "q"
SERIES = (STAGED_SERIES, LATE_SERIES, STAGED_LATE_SERIES)
_PANE_SERIES = re.compile(rf"-[{''.join(SERIES)}]\d+-s\d+(?:-w[^/]*)?\.avro$")  # a pane file's name, after its run


def pane_file_name(
    event_type: str, run_id: str, number: int, shard: int, writer: str = "", series: str = STAGED_SERIES
) -> str:
    """Deterministic per (run, series, hour, file number, shard, writer): a retried write replaces its file.

    The number counts the panes of an (hour, shard, writer) within a run; the writer is
    the worker process that formed them (a stream's), and the run id keeps a restarted
    job, whose numbers start again at 0, from overwriting the files of the run before it.
    The series keeps apart two writers that number their files on their own but write
    into one root: a staged pane that the close moves to the late root keeps its ``p``
    name there, and a pane written late is an ``l``, so neither can replace the other.
    """
    return f"{event_type}-{run_id}-{series}{number:05d}-s{shard:03d}{f'-w{writer}' if writer else ''}.avro"


def shard_of_file(path: str) -> int:
    """The shard in a pane file's name (see ``pane_file_name``)."""
    return int(re.search(r"-s(\d+)(?:-w[^/-]*)?\.avro$", path).group(1))


def late_duplicates_name(event_type: str, run_id: str, number: int) -> str:
    """A count of repeats dropped after the hour closed, beside its late files (``_``: not data)."""
    return f"_duplicates-{event_type}-{run_id}-{number:05d}.json"


def late_duplicates_of(staged: str) -> str:
    """The count of repeats dropped from a staged pane file that the close moved late, named after it."""
    return f"_duplicates-{posixpath.basename(staged).removesuffix('.avro')}.json"


LATE_DUPLICATES_PATTERN = "_duplicates-*.json"


def id_index_name(shard: int, bucket: int, buckets: int, num_shards: int) -> str:
    """One bucket of a closed hour's ids in one shard; the name says how many buckets the shard has, and how
    many shards the ids were split into (a job with another count reads other shards)."""
    return f"s{shard:03d}-n{num_shards:03d}-b{bucket:05d}-of{buckets:05d}.json"


def id_index_skipped_name(shard: int, num_shards: int) -> str:
    """Beside or in place of a shard's buckets: its index may miss ids (see ``transforms.id_index``)."""
    return f"s{shard:03d}-n{num_shards:03d}-skipped.json"


def id_index_pattern(shard: int) -> str:
    return f"s{shard:03d}-*.json"


def id_index_shape(path: str) -> tuple[int, int] | None:
    """``(num_shards, buckets)`` from an index file's name (see ``id_index_name``), 0 buckets for a
    skipped shard; None for a name without them (written before names held the shard count)."""
    named = re.search(r"-n(\d+)-(?:b\d+-of(\d+)|skipped)\.json$", path)
    return (int(named.group(1)), int(named.group(2) or 0)) if named else None


def late_files_of_shard(folder: str, event_type: str, shard: int) -> dict[str, int]:
    """The late files in an hour's ``folder`` that hold ids of ``shard``, with their sizes: written late, or
    staged and moved there, by any run and writer."""
    return {
        path: size
        for part in (f"s{shard:03d}", f"s{shard:03d}-w*")
        for path, size in files.sizes(join(folder, f"{event_type}-*-{part}.avro")).items()
    }


def late_duplicates(layout: Layout, window_start_seconds: float) -> int:
    """Repeats of the hour dropped after it closed, as counted beside its late files."""
    pattern = join(layout.hour(layout.late, window_start_seconds), LATE_DUPLICATES_PATTERN)
    return sum(files.read_json(path)["duplicates"] for path in files.glob(pattern))


def shard_files_of_other_runs(folder: str, event_type: str, run_id: str, shard: int | None = None) -> list[str]:
    """Pane files in ``folder`` written by runs other than ``run_id`` (of one shard, if given), of either
    series: a late pane is staged too while its hour has no marker (``transforms.late``)."""
    shard_parts = ["*"] if shard is None else [f"s{shard:03d}", f"s{shard:03d}-w*"]
    # One listing per shard part, whatever the series: a busy hour's folder holds ~290,000 files.
    paths = [path for part in shard_parts for path in files.glob(join(folder, f"{event_type}-*-{part}.avro"))]
    names = ((path, path.rsplit("/", 1)[-1]) for path in paths)
    return [
        path for path, name in names if _PANE_SERIES.search(name) and not name.startswith(f"{event_type}-{run_id}-")
    ]


def staged_by_other_runs(layout: Layout, run_id: str, name: str = "*.avro") -> dict[int, list[str]]:
    """The files named ``name`` in the type's staging folders that runs other than ``run_id``
    left (pane files by default), by the start of their hour."""
    left: dict[int, list[str]] = {}
    for path in files.glob(join(layout.staging, layout.event_type, "dt=*", "hr=*", name)):
        if path.rsplit("/", 1)[-1].startswith(f"{layout.event_type}-{run_id}-"):
            continue
        hour_start = partition_bounds("/".join(path.split("/")[-3:-1]), 1)[0] // 1000
        left.setdefault(hour_start, []).append(path)
    return left


def new_run_id() -> str:
    """A job launch's id: its UTC start time, which sorts and reads well in file names."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dt%H%M%S")


def iso_utc(seconds: float) -> str:
    """UTC, ISO 8601 with a Z, as manifests and counts write times."""
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])
