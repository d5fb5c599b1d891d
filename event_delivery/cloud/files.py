"""Reading and writing Avro and JSON on any Beam filesystem (local paths or gs://)."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Container, Mapping

import fastavro
from apache_beam.io.filesystems import FileSystems
from fastavro.write import Writer

AVRO_CODEC = "deflate"
# The codecs a job may write its files with (``--codec``): deflate for any reader, snappy for
# speed, zstandard for size. fastavro needs cramjam for snappy and backports.zstd for
# zstandard (both pinned in setup.py); the Apache Avro reader, python-snappy and zstandard.
CODECS = (AVRO_CODEC, "snappy", "zstandard")
UNCOMPRESSED = "null"  # Avro's name for no codec


class AvroWriteError(RuntimeError):
    """A record does not match the file's schema. The message never quotes record values."""


# What fastavro raises for a record its schema does not take; its message quotes the offending
# value, which may be personal. A number too large for its type passes fastavro's validation and
# raises OverflowError; a list where the schema has a map, AttributeError.
RECORD_MISFITS = (ValueError, TypeError, KeyError, OverflowError, AttributeError)


def write_avro(path: str, parsed_schema, records, codec: str = AVRO_CODEC) -> None:
    """Writes one Avro container file, with its schema, compressed unless ``codec`` is
    ``UNCOMPRESSED``, in a single upload."""
    buffer = io.BytesIO()
    try:
        fastavro.writer(buffer, parsed_schema, records, codec=codec)
    except RECORD_MISFITS:
        raise AvroWriteError(f"a record does not match the Avro schema of {path}") from None
    write_bytes(path, buffer.getvalue())


BLOCK_BYTES = 16_000  # where fastavro's writer cuts its blocks, and so where records already encoded are cut


EVENT_IDS = "event_delivery.event_ids"  # header metadata: the file's event ids in record order, a JSON list
RECORD_SIZES = "event_delivery.record_sizes"  # header metadata: the bytes of each record, in order, a JSON list


def write_encoded_avro(
    path: str, parsed_schema, encoded: list[bytes], codec: str = AVRO_CODEC, header: dict[str, str] | None = None
) -> None:
    """As ``write_avro``, for records already encoded under ``parsed_schema`` (see ``encoded_avro``)."""
    write_bytes(path, encoded_avro(parsed_schema, encoded, codec, header))


def encoded_avro(
    parsed_schema, encoded: list[bytes], codec: str = AVRO_CODEC, header: dict[str, str] | None = None
) -> bytes:
    """An Avro container file of records already encoded under ``parsed_schema`` (schemaless, as
    ``fastavro.schemaless_writer`` writes them): their bytes concatenated into the file's blocks,
    no record decoded or encoded again. ``header``, the records' ids and sizes (``ids_header``), goes in
    the file's header, where ``read_event_ids`` finds the ids and ``rewrite_avro_without`` cuts the
    records apart, neither decoding one."""
    buffer = io.BytesIO()
    writer = Writer(buffer, parsed_schema, codec=codec, metadata=header)
    _write_blocks(writer, encoded)
    writer.flush()
    return buffer.getvalue()


def ids_header(event_ids: list[str], encoded: list[bytes]) -> dict[str, str]:
    """The header metadata that lists records' ids and sizes (``EVENT_IDS``, ``RECORD_SIZES``), in their order."""
    compact = {"separators": (",", ":")}
    sizes = [len(record) for record in encoded]
    return {EVENT_IDS: json.dumps(event_ids, **compact), RECORD_SIZES: json.dumps(sizes, **compact)}


def _write_blocks(writer: Writer, encoded) -> None:
    """Encoded records into ``writer``'s blocks, cut where fastavro cuts them (``BLOCK_BYTES``)."""
    block, size = [], 0
    for record in encoded:
        block.append(record)
        size += len(record)
        if size >= BLOCK_BYTES:
            writer.write_block(_Block(block))
            block, size = [], 0
    if block:
        writer.write_block(_Block(block))


class _Block:
    """Encoded records as ``fastavro``'s ``Writer.write_block`` takes a block read from another file."""

    def __init__(self, records: list[bytes]):
        self.num_records = len(records)
        self.bytes_ = io.BytesIO(b"".join(records))


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path, mime_type="application/octet-stream") as handle:
        handle.write(data)


def write_json(path: str, document) -> None:
    write_bytes(path, json.dumps(document, indent=2, sort_keys=True).encode("utf-8"))


def write_json_lines(path: str, documents) -> None:
    """Writes one JSON document per line (JSON Lines), in a single upload."""
    write_bytes(path, b"".join(json.dumps(d, sort_keys=True).encode("utf-8") + b"\n" for d in documents))


def read_json_lines(path: str) -> list:
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        return [json.loads(line) for line in handle.read().decode("utf-8").splitlines() if line.strip()]


def read_avro(path: str) -> list[dict]:
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        return list(fastavro.reader(io.BytesIO(handle.read())))


def read_event_ids(path: str) -> list[str]:
    """The ``event_id`` of each record in an Avro file, in order: from its header if its writer put them
    there (``encoded_avro``), else from its records, whose other fields are skipped, not built."""
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        data = io.BytesIO(handle.read())
    header = fastavro.reader(data)
    if EVENT_IDS in header.metadata:
        return json.loads(header.metadata[EVENT_IDS])
    writer_schema = header.writer_schema
    data.seek(0)
    ids_only = {**writer_schema, "fields": [f for f in writer_schema["fields"] if f["name"] == "event_id"]}
    return [record["event_id"] for record in fastavro.reader(data, reader_schema=ids_only)]


def count_avro_records(path: str) -> int:
    """Records in an Avro file, counted from its block headers without decoding them."""
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        return sum(block.num_records for block in fastavro.block_reader(io.BytesIO(handle.read())))


def concatenate_avro(sources: list[str], destination: str, codec: str = AVRO_CODEC) -> int:
    """Writes the blocks of ``sources``, Avro files of one writer schema, into one file at
    ``destination`` compressed with ``codec``, in order, without decoding a record; returns how
    many records it holds. Each block is decompressed as it is read and compressed again as it is
    written, so the file has one codec whatever the sources had. Uncompressed sources cost the
    least: their blocks are compressed once, here. One block at a time is held in memory."""
    if not sources:
        raise ValueError(f"no sources to write {destination} from")
    records = 0
    # The first source's header is read before the destination is made: a source that is gone (an attempt
    # at a part whose hour was published meanwhile, its staged files deleted) leaves the destination as it was.
    with FileSystems.open(sources[0], mime_type="application/octet-stream") as first:
        first_blocks = fastavro.block_reader(first)
        schema = first_blocks.writer_schema
        with FileSystems.create(destination, mime_type="application/octet-stream") as out:
            writer = Writer(out, schema, codec=codec)
            for block in itertools.chain(first_blocks, _blocks_after(sources, schema)):
                writer.write_block(block)
                records += block.num_records
            writer.flush()
    return records


def _blocks_after(sources: list[str], schema):
    """The blocks of every source after the first, one file open at a time; each of the first's ``schema``."""
    for source in sources[1:]:
        with FileSystems.open(source, mime_type="application/octet-stream") as handle:
            blocks = fastavro.block_reader(handle)
            _check_one_schema(blocks.writer_schema, schema, source, sources[0])
            yield from blocks


def _check_one_schema(source_schema, schema, source: str, first: str) -> None:
    if source_schema != schema:
        raise ValueError(f"{source} has another writer schema than {first}: they cannot share a file")


def rewrite_avro_without(
    sources: list[str], destination: str, leave_out: Mapping[str, Container[str]], codec: str = AVRO_CODEC
) -> int:
    """Writes the records of ``sources``, Avro files of one writer schema, into one file at
    ``destination`` compressed with ``codec``, in order, less those whose ``event_id`` is in what
    ``leave_out`` holds for their source (a source it does not name keeps every record); returns how many
    records it holds. A source whose header lists its records' ids and sizes (a staged
    pane's, see ``encoded_avro``) has its records cut out of its blocks as they are encoded; any other
    has each record decoded and encoded again. One source is held in memory at a time. The first one's
    header is read before ``destination`` is made, so a file that is not Avro leaves none; an error
    later leaves none on GCS (Beam cancels the upload), but may leave part of one on a local disk."""
    if not sources:
        raise ValueError(f"no sources to write {destination} from")
    schema, first = _opened(sources[0])
    kept = 0

    def kept_records():
        nonlocal kept
        for number, source in enumerate(sources):
            source_schema, records = (schema, first) if number == 0 else _opened(source)
            _check_one_schema(source_schema, schema, source, sources[0])
            left_out = leave_out.get(source, ())
            for event_id, record in records:
                if event_id not in left_out:
                    kept += 1
                    yield record

    with FileSystems.create(destination, mime_type="application/octet-stream") as out:
        writer = Writer(out, schema, codec=codec)
        _write_blocks(writer, kept_records())
        writer.flush()
    return kept


def _opened(path: str):
    """An Avro file's parsed writer schema and its records, ``(event_id, encoded record)``, one at a time:
    cut apart by the sizes in its header (``_cut_apart``), or, without them, decoded and encoded again."""
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        data = io.BytesIO(handle.read())
    header = fastavro.reader(data)
    schema = fastavro.parse_schema(header.writer_schema)
    data.seek(0)
    first_field = header.writer_schema["fields"][0]
    ids_lead = first_field["name"] == "event_id" and first_field["type"] == "string"  # as every delivered schema
    if ids_lead and EVENT_IDS in header.metadata and RECORD_SIZES in header.metadata:
        event_ids, sizes = json.loads(header.metadata[EVENT_IDS]), json.loads(header.metadata[RECORD_SIZES])
        return schema, _cut_apart(path, data, event_ids, sizes)
    return schema, _encoded_again(data, schema)


def _cut_apart(path: str, data: io.BytesIO, event_ids: list[str], sizes: list[int]):
    """``(event_id, record)`` of a file whose header lists its records' ids and sizes, each record cut out
    of its block; each must begin with its id, as its schema's first field. A header that does not fit
    the blocks raises ``ValueError``."""
    if len(event_ids) != len(sizes):
        raise ValueError(f"the header of {path} lists {len(event_ids)} ids and {len(sizes)} sizes")
    records = zip(event_ids, sizes, strict=True)
    for block in fastavro.block_reader(data):
        for event_id, size in itertools.islice(records, block.num_records):
            record = block.bytes_.read(size)
            if len(record) != size or not record.startswith(avro_string(event_id)):
                raise ValueError(f"the record sizes in the header of {path} do not fit its blocks")
            yield event_id, record
        if block.bytes_.read(1):
            raise ValueError(f"the record sizes in the header of {path} do not fit its blocks")
    if next(records, None) is not None:
        raise ValueError(f"the header of {path} lists more records than its blocks hold")


def avro_string(text: str) -> bytes:
    """``text`` as Avro encodes a string: its UTF-8 length as a zigzag varint, then the bytes."""
    data = text.encode("utf-8")
    if len(data) < 64:  # a length that fits one byte, as a UUID's does
        return bytes((len(data) << 1,)) + data
    length, prefix = len(data) << 1, bytearray()  # zigzag of a length (never negative): twice it
    while length > 0x7F:
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + data


def _encoded_again(data: io.BytesIO, schema):
    for record in fastavro.reader(data):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, record)
        yield record["event_id"], buffer.getvalue()


def sizes(pattern: str) -> dict[str, int]:
    """The files matching a glob, with their sizes in bytes."""
    return {m.path: m.size_in_bytes for m in FileSystems.match([pattern])[0].metadata_list}


def read_json(path: str):
    with FileSystems.open(path, mime_type="application/octet-stream") as handle:
        return json.loads(handle.read().decode("utf-8"))


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob; ``**`` crosses folders."""
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def delete_existing(paths: list[str]) -> list[str]:
    """Deletes those of ``paths`` that exist, in one batched call; returns them. A file already gone is
    no error: deleting is done either way."""
    present = [path for path in paths if FileSystems.exists(path)]
    if present:
        FileSystems.delete(present)
    return present


def updated_seconds(path: str) -> float:
    """When a file was last written, in epoch seconds (an object's update time on GCS)."""
    return FileSystems.last_updated(path)
