"""The Flex Template offline: its metadata holds every flag of the delivery job with its help text,
`make template` builds from ./Dockerfile, and `make deploy TEMPLATE=...` launches from it (dry runs:
nothing is built or submitted, no Docker)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest

from pipelines import delivery
from tools.ops import deploy, flex_template
from tools.ops.flex_launch import launch_command
from tools.ops.job_flags import dataflow_args, job_layout
from tools.ops.template_metadata import template_metadata

TEMPLATE = "gs://my-bucket/templates/delivery.json"
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _words(text: str) -> str:
    """Without whitespace: argparse wraps help text, at hyphens too."""
    return "".join(text.split())


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run runs nothing: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_every_flag_of_the_job_is_a_parameter_with_its_help_text(capsys):
    with pytest.raises(SystemExit):
        delivery.main(["--help"])
    job_help = _words(capsys.readouterr().out)
    flags = set(re.findall(r"\[--([a-z_]+)", job_help))
    parameters = {p["name"]: p for p in template_metadata()["parameters"]}
    assert flags <= set(parameters), f"missing from the template: {sorted(flags - set(parameters))}"
    for name, parameter in parameters.items():
        assert parameter["helpText"], name
        if name in flags:
            assert _words(parameter["helpText"]) in job_help, f"{name}: not the flag's own help text"
    assert {"start", "end", "fix"} <= set(parameters), "the family's other flags too (DeliveryOptions)"


def test_the_parameters_check_their_values(registry):
    parameters = {p["name"]: p for p in template_metadata()["parameters"]}
    [types] = parameters["event_type"]["regexes"]
    assert all(re.match(types, name) for name in registry)
    assert not re.match(types, "play_with_a_suffix") and not re.match(types, "")
    assert [name for name, p in parameters.items() if not p["isOptional"]] == ["event_type"]
    [shards] = parameters["num_shards"]["regexes"]
    assert re.match(shards, "16") and not re.match(shards, "sixteen")
    assert all(t in template_metadata()["description"] for t in registry), "the registry's types"


def test_make_template_writes_the_metadata_and_builds_from_the_dockerfile(tmp_path, capsys, no_subprocess):
    metadata = tmp_path / "metadata.json"
    argv = ["--project", "p", "--region", "europe-west1", "--bucket", "my-bucket", "--metadata_file", str(metadata)]
    assert flex_template.main([*argv, "--dry_run"]) == 0
    assert json.loads(metadata.read_text()) == template_metadata()
    build, spec = [line.removeprefix("would run: ") for line in capsys.readouterr().out.splitlines()[1:]]
    image = "europe-west1-docker.pkg.dev/p/event-delivery/delivery:latest"
    assert build == f"gcloud builds submit --project=p --region=europe-west1 --tag={image} ."
    assert spec.startswith(f"gcloud dataflow flex-template build {TEMPLATE} ")
    assert f"--image={image}" in spec and f"--metadata-file={metadata}" in spec
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'FLEX_TEMPLATE_PYTHON_PY_FILE="${WORKDIR}/pipelines/delivery.py"' in dockerfile
    assert "python_template_launcher" in dockerfile


def test_the_launch_carries_every_job_flag_but_the_checkouts(registry):
    job_args = dataflow_args(registry["play"], "p", "europe-west1", "my-bucket", update=False)
    command = launch_command(job_args, TEMPLATE, "img")
    assert command[:5] == ["gcloud", "dataflow", "flex-template", "run", "events-play"]
    [parameters] = [arg.removeprefix("--parameters=") for arg in command if arg.startswith("--parameters=")]
    passed = dict(parameter.split("=", 1) for parameter in parameters.split(","))
    assert passed["sdk_container_image"] == "img", "the workers run the template's image"
    assert passed["event_type"] == "play" and passed["run_id"]
    assert {name: int(passed[name]) for name in job_layout(registry["play"])} == job_layout(registry["play"])
    assert "setup_file" not in passed and not any("setup_file" in arg for arg in command), "the image holds it"
    assert "--additional-user-labels=event_type=play,tier=high" in command
    assert "--enable-streaming-engine" in command and "--update" not in command
    for flag in ("--temp-location=", "--dataflow-kms-key=", "--service-account-email=", "--max-workers=50"):
        assert any(arg.startswith(flag) for arg in command), flag


def test_make_deploy_from_the_template_prints_the_launch_in_a_dry_run(capsys, no_subprocess):
    argv = ["--project", "p", "--region", "europe-west1", "--bucket", "my-bucket", "--event_type", "play"]
    assert deploy.main([*argv, "--template", TEMPLATE, "--no_auditor", "--dry_run"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("play: would run: gcloud dataflow flex-template run events-play ")
    assert f"--template-file-gcs-location={TEMPLATE}" in line


def test_an_update_from_the_template_keeps_the_run(registry):
    job_args = dataflow_args(registry["play"], "p", "europe-west1", "b", update=True, run_id="20260101t000000")
    command = launch_command(job_args, TEMPLATE, "img")
    assert "--update" in command and "run_id=20260101t000000" in command[-1]
