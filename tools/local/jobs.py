"""Run jobs as local processes on the DirectRunner: delivery, one process per type, and the
auditor, one process for every type (see ``start_auditor``)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

from pipelines.auditor import READY_LINE as AUDITOR_READY_LINE
from pipelines.delivery import READY_LINE

AUDITOR = "auditor"


class JobError(RuntimeError):
    """A local job exited early or never became ready."""


@dataclasses.dataclass
class LocalJob:
    event_type: str  # the type it delivers, or "auditor"
    process: subprocess.Popen
    log_path: pathlib.Path
    ready_line: str = READY_LINE

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_ready(self, timeout_seconds: float = 120) -> None:
        """Waits until the job has started reading its subscription."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise JobError(f"the {self.event_type} job exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ready_line in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise JobError(f"the {self.event_type} job did not start within {timeout_seconds}s:\n{self.log_tail()}")

    def request_stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_seconds: float = 15) -> int:
        """Waits for the job to cancel; a Pub/Sub pull in flight can block it, so it is killed then."""
        try:
            self.process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode


def stop_jobs(jobs: list[LocalJob]) -> None:
    for job in jobs:
        job.request_stop()
    for job in jobs:
        job.wait_stopped()


def start_job(event_type: str, args: list[str], log_dir: pathlib.Path, env: dict | None = None) -> LocalJob:
    """Starts ``python -m pipelines.delivery --event_type <type> <args>`` in the background."""
    command = ["-m", "pipelines.delivery", "--event_type", event_type, *args]
    return LocalJob(event_type, *_start(command, log_dir / f"{event_type}.log", env))


def start_auditor(event_types: list[str], args: list[str], log_dir: pathlib.Path, env: dict | None = None) -> LocalJob:
    """Starts ``python -m pipelines.auditor --event_types <types> <args>`` in the background.

    One process audits every type, with a pipeline per type in it: locally each delivery
    job already takes a process (an interpreter and its memory) on a machine of a few
    cores, and counting is so little work that one process has room for every type. A
    pipeline per type keeps one type's idle Pub/Sub read from stalling another's. On
    Dataflow each type's auditor is a job of its own, so that types stay isolated there.
    Its log is ``<log_dir>/auditor.log``; the job's flags are those of ``pipelines.auditor``
    (``--project``, ``--storage_root``, ``--window_seconds``, ``--allowed_lateness_seconds``, ...).
    """
    command = ["-m", "pipelines.auditor", "--event_types", ",".join(event_types), *args]
    return LocalJob(AUDITOR, *_start(command, log_dir / f"{AUDITOR}.log", env), ready_line=AUDITOR_READY_LINE)


def _start(command: list[str], log_path: pathlib.Path, env: dict | None) -> tuple[subprocess.Popen, pathlib.Path]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    return process, log_path
