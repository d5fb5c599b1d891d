"""Shared fixtures: the real emulators for I/O tests, and small builders for messages."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings

from event_delivery.cloud import clients
from event_delivery.contract.registry import load_registry
from tests.emulated import PROJECT
from tools.local.emulators import bigtable_command, free_port, running_emulators, start, stop_process_group
from transforms import stream_panes

# Hypothesis fails any example slower than 200 ms by default. On a loaded 2-core CI runner a
# slow example is no bug, so no generated test has a deadline (set before any test module
# builds its own settings, which inherit this profile).
settings.register_profile("no_deadline", deadline=None)
settings.load_profile("no_deadline")


@pytest.fixture(scope="session")
def emulators(tmp_path_factory):
    """Pub/Sub and GCS emulators for the whole session; ``os.environ`` points at them."""
    with running_emulators(tmp_path_factory.mktemp("emulators")) as env:
        clients.use_emulator_credentials()
        yield env


@pytest.fixture(scope="module")
def bigtable_emulator(tmp_path_factory):
    """A Bigtable emulator for one test module; ``BIGTABLE_EMULATOR_HOST`` points at it meanwhile."""
    port = free_port()
    emulator = start(
        "Bigtable",
        bigtable_command(port),
        clients.BIGTABLE_EMULATOR_HOST,
        port,
        tmp_path_factory.mktemp("bigtable") / "bigtable.log",
    )
    previous = os.environ.get(clients.BIGTABLE_EMULATOR_HOST)
    os.environ[clients.BIGTABLE_EMULATOR_HOST] = emulator.address
    yield emulator.address
    stop_process_group(emulator.process.pid)
    if previous is None:
        del os.environ[clients.BIGTABLE_EMULATOR_HOST]
    else:
        os.environ[clients.BIGTABLE_EMULATOR_HOST] = previous


@pytest.fixture
def bucket(emulators):
    """A fresh bucket on the GCS emulator."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    clients.storage_client(PROJECT).create_bucket(name)
    return name


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(autouse=True)
def panes_on_the_test_clock(monkeypatch):
    """A stream's pane waits ``trigger_seconds`` from its first event by the wall clock
    (``transforms.stream_panes.wall_clock``); a TestStream's processing time starts near zero,
    not today. Set to zero, the wait ends at the test clock's next tick, as a test expects
    when it advances the clock past the trigger."""
    monkeypatch.setattr(stream_panes, "wall_clock", lambda: 0)
