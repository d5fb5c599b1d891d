"""A gateway process against a Pub/Sub emulator of its own, for the gateway's tests and bench.

The emulator is the caller's own, not shared, because an outage is made by stopping it with
SIGSTOP. The gateway runs as ``python -m gateway``, so callers see it only through its
command line and its HTTP routes, and can SIGKILL it. Every type's topic gets a read-back
subscription, which ``pull_all`` drains.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from google.api_core import exceptions

from event_delivery.cloud import clients
from event_delivery.contract import counts
from event_delivery.contract.registry import load_registry
from tools.local import emulators

PROJECT = "local-project"
READY_SECONDS = 60


def readback_subscription(event_type) -> str:
    return f"{event_type.topic}-gateway-readback"


@contextlib.contextmanager
def pubsub_emulator(state_dir: pathlib.Path):
    """A Pub/Sub emulator with every type's topic and a read-back subscription to each; ``os.environ`` points at it."""
    port = emulators.free_port()
    log = state_dir / "pubsub.log"
    emulator = emulators.start("Pub/Sub", emulators.pubsub_command(port), clients.PUBSUB_EMULATOR_HOST, port, log)
    saved = os.environ.get(clients.PUBSUB_EMULATOR_HOST)
    os.environ[clients.PUBSUB_EMULATOR_HOST] = emulator.address
    try:
        publisher, subscriber = clients.publisher_client(), clients.subscriber_client()
        counts_topic = publisher.create_topic(name=publisher.topic_path(PROJECT, counts.COUNTS_TOPIC)).name
        subscriber.create_subscription(name=_counts_readback(subscriber), topic=counts_topic)
        for event_type in load_registry().values():
            topic = publisher.topic_path(PROJECT, event_type.topic)
            publisher.create_topic(name=topic)
            subscription = subscriber.subscription_path(PROJECT, readback_subscription(event_type))
            subscriber.create_subscription(name=subscription, topic=topic)
        yield emulator
    finally:
        emulators.stop_process_group(emulator.process.pid)
        if saved is None:
            os.environ.pop(clients.PUBSUB_EMULATOR_HOST, None)
        else:
            os.environ[clients.PUBSUB_EMULATOR_HOST] = saved


def _counts_readback(subscriber) -> str:
    return subscriber.subscription_path(PROJECT, f"{counts.COUNTS_TOPIC}-gateway-readback")


def pull_count_reports() -> list[counts.CountReport]:
    """The audit's count reports sent since the last call (an emulator answers at once)."""
    subscriber, reports = clients.subscriber_client(), []
    request = {"subscription": _counts_readback(subscriber), "max_messages": 1000, "return_immediately": True}
    while messages := subscriber.pull(request=request, timeout=10).received_messages:
        subscriber.acknowledge(subscription=request["subscription"], ack_ids=[m.ack_id for m in messages])
        reports += [counts.CountReport.decode(m.message.data) for m in messages]
    return reports


@contextlib.contextmanager
def paused(emulator):
    """The emulator stopped (SIGSTOP) for the block: Pub/Sub hangs, as in an outage."""
    os.killpg(emulator.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(emulator.process.pid, signal.SIGCONT)


class Gateway:
    """``python -m gateway`` on a free port of 127.0.0.1; ``stop`` with SIGTERM, or ``kill`` with SIGKILL."""

    def __init__(self, spill_dir: pathlib.Path, *flags: str):
        self.port = emulators.free_port()
        self.log_path = spill_dir.parent / f"gateway-{self.port}.log"
        command = [sys.executable, "-m", "gateway", "--project", PROJECT, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--spill_dir", str(spill_dir), *flags]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_SECONDS
        while "gateway ready" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the gateway did not start; its log:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        """``(status, headers, body)`` of one request."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def post(self, event_type: str, events: list[dict], content_type: str | None = None):
        """Posts one event as JSON, or several as NDJSON; ``(status, headers, body)``."""
        if len(events) == 1 and content_type is None:
            body, content_type = json.dumps(events[0]).encode(), "application/json"
        else:
            body = b"".join(json.dumps(event).encode() + b"\n" for event in events)
            content_type = content_type or "application/x-ndjson"
        return self.request("POST", f"/v1/events/{event_type}", body, {"Content-Type": content_type})

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[2].decode()

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def pull_all(wanted_ids: set[str], seconds: float = 30) -> dict[str, list]:
    """Pulls and acknowledges every type's read-back subscription until all of ``wanted_ids`` came
    (or ``seconds`` passed) and a round brings nothing more; ``{type: [(data, attributes)]}``.
    Messages published before come too: compare by id."""
    subscriber = clients.subscriber_client()
    received = {name: [] for name in load_registry()}
    seen, deadline = set(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = 0
        for event_type in load_registry().values():
            subscription = subscriber.subscription_path(PROJECT, readback_subscription(event_type))
            with contextlib.suppress(exceptions.DeadlineExceeded, exceptions.ServiceUnavailable):
                request = {"subscription": subscription, "max_messages": 1000, "return_immediately": True}
                messages = subscriber.pull(request=request, timeout=5).received_messages
                if messages:
                    subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in messages])
                received[event_type.name] += [(m.message.data, dict(m.message.attributes)) for m in messages]
                seen.update(m.message.attributes.get("event_id") for m in messages)
                got += len(messages)
        if not got and wanted_ids <= seen:
            break
        if not got:
            time.sleep(0.5)
    return received
