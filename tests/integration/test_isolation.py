"""Isolation: a type whose Cloud Storage sink is down, and which is flooded with garbage, does not
hold back the type next to it.

The broken type's job stays alive through the outage, retrying its uploads, as a real job would.
Meanwhile the healthy type delivers every message it was sent (its ledger balances), closes every
hour with data, and closes each at the event time the contract says, soon after publishing ends.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import os
import pathlib
import random
import threading
import time
import urllib.parse
import uuid

import pytest

from event_delivery.cloud import clients, files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from event_delivery.producer import EventPublisher
from tests.by_id import assert_every_id_in_one_place, ledger_ids
from tests.emulated import short_hours_job_args
from tools.local.jobs import start_job, stop_jobs
from tools.local.loadgen import Ledger, TrafficMix, publish_traffic, traffic
from tools.ops import provision
from tools.ops.audit import TypeAudit, audit_type

pytestmark = [pytest.mark.emulators, pytest.mark.slow]

PROJECT = "local-project"
WINDOW, LATENESS, TRIGGER = 10, 5, 2
# The last hour closes once the watermark passes its end plus the lateness; the DirectRunner's
# Pub/Sub read then blocks up to 30 s on an empty pull before the watermark moves on, and two
# cores busy with the flood (and other work) slow every step: a generous bound, waited on.
CLOSE_BOUND_SECONDS = WINDOW + LATENESS + 240


def job_args(root: str, state: pathlib.Path) -> list[str]:
    return short_hours_job_args(root, state, WINDOW, LATENESS, TRIGGER)


def test_a_broken_flooded_type_does_not_hold_back_another(emulators, registry, tmp_path):
    healthy, broken = registry["play"], registry["search"]
    provision.provision(PROJECT, [healthy, broken], None)
    healthy_root = str(tmp_path / "play-root")
    # The job's start-up check looks its bucket up, which the outage lets through.
    broken_bucket = f"test-{uuid.uuid4().hex[:12]}"
    clients.storage_client(PROJECT).create_bucket(broken_bucket)

    outage = UploadOutageProxy(os.environ[clients.STORAGE_EMULATOR_HOST])
    threading.Thread(target=outage.serve_forever, daemon=True).start()
    jobs = []
    try:
        jobs.append(start_job("play", job_args(healthy_root, tmp_path), tmp_path / "logs"))
        jobs.append(
            start_job(
                "search",
                job_args(f"gs://{broken_bucket}", tmp_path),
                tmp_path / "logs",
                env={clients.STORAGE_EMULATOR_HOST: outage.url},
            )
        )
        broken_job = jobs[1]
        for job in jobs:
            job.wait_ready()
        flood = threading.Thread(target=_flood_with_malformed_messages, args=(broken,))
        flood.start()
        ledger = publish_traffic(
            EventPublisher(PROJECT, healthy),
            traffic(healthy, 200, TrafficMix(duplicates=0.1, malformed=0.05, late=0), random.Random(2)),
            rate=10,
        )
        published_by = time.time()
        flood.join()
        audit = _wait_until_accounted(healthy_root, ledger, deadline=published_by + CLOSE_BOUND_SECONDS)
        # Taken now, not after stopping: the broken job must have been alive and failing all along.
        broken_alive, failed_uploads = broken_job.process.poll() is None, outage.failed_uploads
    finally:
        stop_jobs(jobs)
        outage.shutdown()
        outage.server_close()

    assert not audit.problems, audit.problems
    assert_every_id_in_one_place(healthy_root, "play", *ledger_ids(ledger))  # not only in total
    assert broken_alive, f"the broken job died:\n{broken_job.log_tail()}"
    assert failed_uploads > 0, f"the broken job never tried to upload:\n{broken_job.log_tail()}"
    assert not list(clients.storage_client(PROJECT).list_blobs(broken_bucket)), "an upload got through the outage"
    for partition in (p for p, hour in audit.hours.items() if hour.closed):
        manifest = files.read_json(partitions.join(healthy_root, "delivered", "play", partition, "_SUCCESS"))
        hour_end = _utc(manifest["hour_end"])
        expected = hour_end + datetime.timedelta(seconds=LATENESS)
        assert _utc(manifest["closed_at_watermark"]) == expected, f"{partition} closed at the wrong event time"


def _flood_with_malformed_messages(event_type) -> None:
    messages = traffic(event_type, 3000, TrafficMix(duplicates=0, malformed=1.0, late=0), random.Random(1))
    publish_traffic(EventPublisher(PROJECT, event_type), messages, rate=300)


def _accounted(audit: TypeAudit) -> int:
    return sum(audit.total(outcome) for outcome in ("delivered", "duplicates", "late", "dead_lettered"))


def _wait_until_accounted(root: str, ledger: Ledger, deadline: float) -> TypeAudit:
    """Audits until every published message is accounted for and every hour has closed; fails,
    saying which did not happen, at ``deadline``.

    Waiting on the outcome, not on the first marker, leaves no message in flight when it returns.
    """
    while True:
        audit = audit_type(Layout.under(root, "play", WINDOW))
        if _accounted(audit) == ledger.published and audit.settled:
            return audit
        if time.time() >= deadline:
            raise AssertionError(
                f"{CLOSE_BOUND_SECONDS} s after publishing ended, the healthy type had accounted for "
                f"{_accounted(audit)} of {ledger.published} messages, and "
                + ("closed every hour" if audit.settled else f"{audit.total('staged')} records waited in staging")
            )
        time.sleep(1)


def _utc(iso: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))


class UploadOutageProxy(http.server.ThreadingHTTPServer):
    """Cloud Storage with its uploads down: forwards every request to the emulator, except object
    uploads, which get 503 (and are counted). Clients retry a 503 with backoff, so a job behind
    this keeps running and keeps failing to write, as in a real outage."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _OutageHandler)
        self.upstream = urllib.parse.urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        self.failed_uploads = 0
        self._count_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def count_failed_upload(self) -> None:
        with self._count_lock:
            self.failed_uploads += 1


class _OutageHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/upload/"):
            self.server.count_failed_upload()
            self.reply(503, [("Content-Type", "application/json")], b'{"error": {"code": 503}}')
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        try:
            headers = {name: value for name, value in self.headers.items() if name.lower() != "host"}
            upstream.request(self.command, self.path, body, headers)
            response = upstream.getresponse()
            self.reply(response.status, response.getheaders(), response.read())
        finally:
            upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def reply(self, status: int, headers, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        pass  # the jobs retry many times a second; their logs say enough
