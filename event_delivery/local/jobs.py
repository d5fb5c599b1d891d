"""Run delivery jobs as local processes on the DirectRunner, one process per type."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

READY_LINE = "delivering "


class JobError(RuntimeError):
    """A local job exited early or never became ready."""


@dataclasses.dataclass
class LocalJob:
    event_type: str
    process: subprocess.Popen
    log_path: pathlib.Path

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_ready(self, timeout_seconds: float = 120) -> None:
        """Waits until the job has started reading its subscription."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise JobError(f"the {self.event_type} job exited with {self.process.returncode}:\n{self.log_tail()}")
            if READY_LINE in self.log_path.read_text(errors="replace"):
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
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{event_type}.log"
    command = [sys.executable, "-m", "pipelines.delivery", "--event_type", event_type, *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
    return LocalJob(event_type, process, log_path)
