"""The job's command line: --help documents it, and a bad flag is one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from event_delivery import provision
from event_delivery.registry import load_registry


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
    "module, args",
    [
        ("event_delivery.loadgen", ["--project", "p", "--event_type", "play", "--duplicates", "1.5"]),
        ("event_delivery.provision", ["--event_type", "play"]),
        ("event_delivery.deploy", ["--project", "p", "--region", "r", "--bucket", "b"]),
        ("event_delivery.audit", []),
        ("pipelines.backfill", ["--event_type", "play", "--start", "2026-11-29T00", "--end", "2026-11-29T01"]),
        (
            "pipelines.backfill",
            ["--event_type", "play", "--raw_archive_root", "/tmp/r", "--storage_root", "/tmp/b"]
            + ["--start", "yesterday", "--end", "2026-11-29T01"],
        ),
    ],
)
def test_tools_reject_bad_flags_with_exit_code_2(module, args):
    result = run(module, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_drain_names_the_jobs_of_a_tier():
    result = run(
        "event_delivery.deploy",
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
