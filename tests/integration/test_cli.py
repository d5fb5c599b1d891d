"""The job's command line: --help documents it, and a bad flag is one line and exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from event_delivery.contract.registry import load_registry
from event_delivery.keys.config import open_keystore
from event_delivery.keys.kek import LocalKeyFile
from tools.ops import provision


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_help_documents_every_option():
    result = run("pipelines.delivery", "--help")
    assert result.returncode == 0
    for option in (
        "--event_type",
        "--storage_root",
        "--window_seconds",
        "--allowed_lateness_seconds",
        "--trigger_seconds",
        "--late_horizon_seconds",
        "--num_shards",
        "--max_event_bytes",
        "--codec",
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--event_type", "nope", "--storage_root", "/tmp/x", "--project", "p"], "invalid choice: 'nope'"),
        (["--event_type", "play", "--project", "p"], "--storage_root"),
        (["--event_type", "play", "--storage_root", "/tmp/x"], "--project"),
        (
            ["--event_type", "play", "--storage_root", "/tmp/x", "--project", "p", "--window_seconds", "7"],
            "must divide 3600",
        ),
        (
            ["--event_type", "play", "--storage_root", "/tmp/x", "--project", "p", "--num_shards", "0"],
            "num_shards must be positive",
        ),
        (
            ["--event_type", "play", "--storage_root", "/tmp/x", "--project", "p", "--codec", "lz4"],
            "codec 'lz4' is not one of deflate, snappy, zstandard",
        ),
        (
            ["--event_type", "play", "--storage_root", "/tmp/x", "--project", "p", "--trigger_seconds", "soon"],
            "invalid int value",
        ),
    ],
)
def test_bad_flags_explain_themselves_in_one_line(args, complaint):
    result = run("pipelines.delivery", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert complaint in error


@pytest.mark.parametrize(
    "module, args, complaint",
    [
        (
            "tools.local.loadgen",
            ["--project", "p", "--event_type", "play", "--duplicates", "1.5"],
            "--duplicates must be a fraction between 0 and 1",
        ),
        ("tools.ops.provision", ["--event_type", "play"], "the following arguments are required: --project"),
        (
            "tools.ops.deploy",
            ["--project", "p", "--region", "r", "--bucket", "b"],
            "one of the arguments --event_type --tier is required",
        ),
        ("tools.ops.audit", [], "the following arguments are required: --storage_root"),
        (
            "pipelines.backfill",
            ["--event_type", "play", "--start", "2026-11-29T00", "--end", "2026-11-29T01"],
            "--raw_archive_root is required: the archive to replay",
        ),
        (
            "pipelines.backfill",
            ["--event_type", "play", "--raw_archive_root", "/tmp/r", "--storage_root", "/tmp/b"]
            + ["--start", "yesterday", "--end", "2026-11-29T01"],
            "'yesterday' is not an hour: use YYYY-MM-DDTHH (UTC)",
        ),
        ("pipelines.forget", ["--subject", "u", "--key_cache_ttl_seconds", "-1"], "must be between 0 and 3600"),
        (
            "pipelines.decrypt",
            ["--event_type", "search", "--input_root", "/tmp/d", "--output_root", "/tmp/d/clear"]
            + ["--start", "2026-11-29T00", "--end", "2026-11-29T01"],
            "--output_root must not be --input_root or inside it",
        ),
        (
            "pipelines.decrypt",
            ["--event_type", "search", "--input_root", "gs://b/delivered/", "--output_root", "gs://b/delivered"]
            + ["--start", "2026-11-29T00", "--end", "2026-11-29T01"],
            "--output_root must not be --input_root or inside it",
        ),
        ("pipelines.forget", ["--subject", "u", "--key_cache_ttl_seconds", "inf"], "must be between 0 and 3600"),
        ("pipelines.forget", ["--subject", "u", "--decrypted_copies", "delete"], "invalid choice: 'delete'"),
    ],
)
def test_tools_reject_bad_flags_with_exit_code_2(module, args, complaint):
    result = run(module, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith(f"python -m {module}: error: ") and complaint in error


def test_drain_names_the_jobs_of_a_tier():
    result = run(
        "tools.ops.deploy",
        "--project",
        "p",
        "--region",
        "r",
        "--bucket",
        "b",
        "--tier",
        "high",
        "--drain",
        "--dry_run",
    )
    assert result.returncode == 0, result.stderr
    high = sorted(name for name, t in load_registry().items() if t.tier.name == "high")
    for name in high:
        assert f"--filter=name=events-{name.replace('_', '-')}" in result.stdout
    assert result.stdout.count("gcloud dataflow jobs drain") == len(high)


def _job(*extra, env=None):
    args = ["pipelines.delivery", "--event_type", "play", "--project", "local-project", *extra]
    result = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_an_unreachable_emulator_is_named(tmp_path):
    line = _job("--storage_root", str(tmp_path), env={"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"})
    assert "cannot reach the Pub/Sub emulator at 127.0.0.1:1" in line


@pytest.mark.emulators
def test_a_missing_subscription_or_bucket_says_how_to_create_it(emulators, bucket):
    assert "make provision" in _job("--storage_root", f"gs://{bucket}")
    provision.provision("local-project", [load_registry()["play"]], None)
    line = _job("--storage_root", "gs://no-such-bucket-here")
    assert "bucket gs://no-such-bucket-here does not exist" in line


def _without_cloud(tmp_path) -> dict:
    """The environment of a fresh machine: no emulator configured and no Google credentials."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return {**env, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "HOME": str(tmp_path)}


GIVES_UP_AFTER_SECONDS = 120  # google-api-core's default retry deadline, which Cloud Storage and Pub/Sub calls use
NO_CLOUD = "no {} emulator ({}_EMULATOR_HOST is not set) and no Google credentials: run `make emulators`"


@pytest.mark.parametrize(
    "module, args, service",
    [
        (
            "pipelines.delivery",
            ["--event_type", "play", "--project", "local-project", "--storage_root", "gs://b"],
            "Pub/Sub",
        ),
        ("tools.local.loadgen", ["--project", "local-project", "--event_type", "play"], "Pub/Sub"),
        ("event_delivery.producer", ["--project", "local-project", "--event_type", "play"], "Pub/Sub"),
        ("tools.ops.audit", ["--storage_root", "gs://b"], "Cloud Storage"),
        (
            "pipelines.decrypt",
            ["--event_type", "search", "--input_root", "gs://b/delivered", "--output_root", "out"]
            + ["--start", "2026-11-29T00", "--end", "2026-11-29T06"],
            "Cloud Storage",
        ),
        (
            "pipelines.redrive",
            ["--event_type", "search", "--storage_root", "gs://b"]
            + ["--start", "2026-11-29T00", "--end", "2026-11-29T06"],
            "Cloud Storage",
        ),
    ],
)
def test_first_commands_without_emulators_or_credentials_say_what_is_missing(tmp_path, module, args, service):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=_without_cloud(tmp_path),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    env_prefix = "PUBSUB" if service == "Pub/Sub" else "STORAGE"
    assert NO_CLOUD.format(service, env_prefix) in line
    # Not a measure of speed (importing Beam alone can take 20 s on two busy cores) but of not
    # trying to connect: the client libraries retry a call for 120 s before they give up.
    took = time.monotonic() - started
    assert took < GIVES_UP_AFTER_SECONDS, f"it answered after {took:.0f} s: it tried to connect before saying so"
    assert list(tmp_path.iterdir()) == [], "it created nothing"


def _forget(tmp_path, *extra):
    keys = [f"--keystore=sqlite:///{tmp_path}/keys/keystore.db", f"--local_key_file={tmp_path}/keys/kek.key"]
    return run("pipelines.forget", "--subject", "user-1", *keys, *extra)


def test_forget_creates_no_key_encryption_key_and_no_keystore(tmp_path):
    result = _forget(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"there is no key-encryption key file at {tmp_path}/keys/kek.key" in result.stderr
    assert not (tmp_path / "keys").exists()

    LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)
    result = _forget(tmp_path)
    assert result.returncode == 2 and f"there is no keystore at {tmp_path}/keys/keystore.db" in result.stderr
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["kek.key"]


def test_forget_refuses_a_keystore_without_keys_unless_told(tmp_path):
    kek = LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)
    open_keystore(f"sqlite:///{tmp_path}/keys/keystore.db", kek, create=True)
    result = _forget(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no keys" in result.stderr and "--allow_empty_keystore" in result.stderr

    result = _forget(tmp_path, "--allow_empty_keystore")
    assert result.returncode == 0, result.stderr
    assert "0 subject(s) whose keys were deleted, 1 subject(s) had no key and are tombstoned" in result.stdout
    keystore = open_keystore(f"sqlite:///{tmp_path}/keys/keystore.db", kek)
    assert keystore.subject_key_ids(["user-1"]) == {"user-1": None}, "tombstoned: asking makes no key"


def test_forget_deletes_a_key_and_never_prints_the_subject(tmp_path):
    kek = LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)
    keystore = open_keystore(f"sqlite:///{tmp_path}/keys/keystore.db", kek, create=True)
    keystore.subject_keys(["user-1", "user-2"])
    result = _forget(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 subject(s) whose keys were deleted, 0 subject(s) had no key" in result.stdout
    assert "user-1" not in result.stdout + result.stderr
    key_ids = keystore.subject_key_ids(["user-1", "user-2"])
    assert key_ids["user-1"] is None and key_ids["user-2"] is not None


@pytest.mark.emulators
def test_make_emulators_starts_every_emulator_it_promises(tmp_path):
    up = run("tools.local.emulators", "up", "--state_dir", str(tmp_path))
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in (tmp_path / "env.sh").read_text().splitlines()
        )
        for variable in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "BIGTABLE_EMULATOR_HOST"):
            host, port = exports[variable].removeprefix("http://").split(":")
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        down = run("tools.local.emulators", "down", "--state_dir", str(tmp_path))
    assert down.returncode == 0 and not (tmp_path / "env.sh").exists()


def test_a_dry_run_update_prints_the_steps_for_each_job_of_a_tier():
    # No gcloud on the PATH: a dry run must not need it.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    args = ["tools.ops.deploy", "--project", "p", "--region", "r", "--bucket", "b"]
    args += ["--tier", "high", "--update", "--dry_run"]
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    high = sorted(name for name, t in load_registry().items() if t.tier.name == "high")
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == high
    assert result.stdout.count("gcloud dataflow jobs describe --project=p --region=r <job id> --full") == len(high)


def test_forget_reads_subjects_from_standard_input_and_prints_none(tmp_path):
    kek = LocalKeyFile(tmp_path / "keys" / "kek.key", create=True)
    keystore = open_keystore(f"sqlite:///{tmp_path}/keys/keystore.db", kek, create=True)
    keystore.subject_keys(["user-1", "user-2", "user-3"])
    keys = [f"--keystore=sqlite:///{tmp_path}/keys/keystore.db", f"--local_key_file={tmp_path}/keys/kek.key"]
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.forget", "--subjects_file", "-", *keys],
        input="user-1\n\nuser-3\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 subject(s) whose keys were deleted, 0 subject(s) had no key" in result.stdout
    assert "user-" not in result.stdout + result.stderr
    key_ids = keystore.subject_key_ids(["user-1", "user-2", "user-3"])
    assert [key_ids[s] is None for s in ("user-1", "user-2", "user-3")] == [True, False, True]
