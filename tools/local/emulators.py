"""Start and stop the local emulators: Pub/Sub and Bigtable (gcloud SDK), GCS (PyPI).

Tests use ``running_emulators()``; ``make emulators`` runs this module::

    python -m tools.local.emulators up --state_dir .emulators
    source .emulators/env.sh
    python -m tools.local.emulators down --state_dir .emulators
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

from event_delivery.cloud.clients import BIGTABLE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST

HOST = "127.0.0.1"
READY_TIMEOUT_SECONDS = 60


class EmulatorError(RuntimeError):
    """An emulator could not be found or did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _sdk_root() -> pathlib.Path | None:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    return pathlib.Path(os.path.realpath(gcloud)).parent.parent


def pubsub_command(port: int) -> list[str]:
    """The SDK's emulator binary if installed, else ``gcloud beta emulators pubsub start``."""
    root = _sdk_root()
    if root is None:
        raise EmulatorError("gcloud is not on PATH; install the Google Cloud SDK with its Pub/Sub emulator")
    binary = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    if binary.exists():
        return [str(binary), f"--host={HOST}", f"--port={port}"]
    return ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port={HOST}:{port}", "--quiet"]


def bigtable_command(port: int) -> list[str]:
    root = _sdk_root()
    if root is None:
        raise EmulatorError("gcloud is not on PATH; install the Google Cloud SDK with its Bigtable emulator")
    binary = root / "platform" / "bigtable-emulator" / "cbtemulator"
    if binary.exists():
        return [str(binary), "-host", HOST, "-port", str(port)]
    return ["gcloud", "beta", "emulators", "bigtable", "start", f"--host-port={HOST}:{port}", "--quiet"]


def storage_command(port: int, data_dir: pathlib.Path) -> list[str]:
    script = pathlib.Path(sys.executable).parent / "gcp-storage-emulator"
    if not script.exists():
        raise EmulatorError("gcp-storage-emulator is not installed in this virtualenv; run `make install`")
    return [str(script), "-d", str(data_dir), "start", "--host", HOST, "--port", str(port), "--quiet"]


@dataclasses.dataclass
class Emulator:
    name: str
    env_var: str
    port: int
    process: subprocess.Popen
    log_path: pathlib.Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def _wait_until_listening(emulator: Emulator, log_path: pathlib.Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if emulator.process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise EmulatorError(f"the {emulator.name} emulator exited at start; its log ends:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, emulator.port), timeout=1):
            return
        time.sleep(0.2)
    raise EmulatorError(f"the {emulator.name} emulator did not listen on {emulator.address} in time")


def start(name: str, command: list[str], env_var: str, port: int, log_path: pathlib.Path) -> Emulator:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    emulator = Emulator(name, env_var, port, process, log_path)
    try:
        _wait_until_listening(emulator, log_path)
    except EmulatorError:
        stop_process_group(process.pid)
        raise
    return emulator


def stop_process_group(pid: int, grace_seconds: float = 5) -> None:
    """Stops an emulator and its children (the Pub/Sub script runs a JVM)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            os.killpg(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


def environment(emulators: list[Emulator]) -> dict[str, str]:
    """The variables the Google client libraries and Beam read to find the emulators."""
    env = {"NO_GCE_CHECK": "true"}
    for emulator in emulators:
        prefix = "http://" if emulator.env_var == STORAGE_EMULATOR_HOST else ""
        env[emulator.env_var] = prefix + emulator.address
    return env


def start_all(
    state_dir: pathlib.Path, pubsub_port: int | None = None, storage_port: int | None = None, bigtable: bool = False
):
    """Starts Pub/Sub and GCS (and Bigtable if asked); returns the emulators and their environment."""
    pubsub_port = pubsub_port or free_port()
    storage_port = storage_port or free_port()
    data_dir = (state_dir / "gcs-data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        started.append(
            start("Pub/Sub", pubsub_command(pubsub_port), PUBSUB_EMULATOR_HOST, pubsub_port, state_dir / "pubsub.log")
        )
        started.append(
            start(
                "GCS",
                storage_command(storage_port, data_dir),
                STORAGE_EMULATOR_HOST,
                storage_port,
                state_dir / "gcs.log",
            )
        )
        if bigtable:
            port = free_port()
            started.append(
                start("Bigtable", bigtable_command(port), BIGTABLE_EMULATOR_HOST, port, state_dir / "bigtable.log")
            )
    except BaseException:
        for emulator in started:
            stop_process_group(emulator.process.pid)
        raise
    return started, environment(started)


@contextlib.contextmanager
def running_emulators(state_dir: pathlib.Path, bigtable: bool = False):
    """Emulators for the duration of a block, with ``os.environ`` pointing at them."""
    emulators, env = start_all(state_dir, bigtable=bigtable)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for emulator in emulators:
            stop_process_group(emulator.process.pid)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _up(state_dir: pathlib.Path, pubsub_port, storage_port) -> None:
    if (state_dir / "pids").exists():
        _down(state_dir)
    emulators, env = start_all(state_dir, pubsub_port, storage_port, bigtable=True)
    (state_dir / "pids").write_text("\n".join(str(e.process.pid) for e in emulators) + "\n")
    exports = "".join(f"export {key}={value}\n" for key, value in env.items())
    (state_dir / "env.sh").write_text(exports)
    for emulator in emulators:
        print(f"{emulator.name} emulator on {emulator.address} (log: {emulator.log_path})")
    print(f"GCS objects are stored under {state_dir / 'gcs-data' / '.cloudstorage'}")
    print(f"To use them from a shell:  source {state_dir / 'env.sh'}\n" + exports, end="")


def _down(state_dir: pathlib.Path) -> None:
    pids = state_dir / "pids"
    if not pids.exists():
        print(f"no emulators recorded in {state_dir}")
        return
    for line in pids.read_text().split():
        stop_process_group(int(line))
    pids.unlink()
    (state_dir / "env.sh").unlink(missing_ok=True)
    print("emulators stopped")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local.emulators", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--state_dir",
        type=pathlib.Path,
        default=pathlib.Path(".emulators"),
        help="Where logs, GCS data, pids and env.sh go. Default: .emulators",
    )
    parser.add_argument("--pubsub_port", type=int, help="Default: a free port.")
    parser.add_argument("--storage_port", type=int, help="Default: a free port.")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            _up(args.state_dir, args.pubsub_port, args.storage_port)
        else:
            _down(args.state_dir)
    except EmulatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
