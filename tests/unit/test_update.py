"""``make update`` replaces a running job in place only if the new job keeps its hours whole.

The running job comes from ``tests/fixtures/running_job_play.json``: a Dataflow ``Job``
resource (full view) whose ``environment`` was built by Beam's own
``apiclient.Environment`` from ``deploy.dataflow_args`` for ``play`` (tier high: window
3600, lateness 600, 16 shards) with ``--run_id=20270115t080000``, so its options sit
where and as the DataflowRunner puts them (snake_case, numbers as floats). It was
deployed before the late horizon and the trigger were passed explicitly: it records
them only as the SDK records every option's default (604800 and 60).
"""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from event_delivery.contract.registry import load_registry
from pipelines import delivery
from pipelines.options import DeliveryOptions, delivery_settings
from tools.ops import deploy
from transforms.records import schema_fingerprint
from transforms.settings import STATE_LAYOUT

RECORDED = json.loads((pathlib.Path(__file__).parents[1] / "fixtures" / "running_job_play.json").read_text())
RUN_ID = "20270115t080000"
PLAY_SCHEMA = schema_fingerprint(load_registry()["play"])
WHERE = ["--project", "my-project", "--region", "europe-west1", "--bucket", "my-bucket"]


@pytest.fixture
def cloud(monkeypatch):
    """The recorded job stands in for gcloud; submitted jobs are collected, not started."""
    running = copy.deepcopy(RECORDED)
    # Recorded as the SDK records every option it knows, by a job deployed since panes fire on
    # the bytes waiting too (the fixture's job predates the option: it is refused, as tested below).
    running["environment"]["sdkPipelineOptions"]["options"]["max_pane_bytes"] = 16777216.0
    running["environment"]["sdkPipelineOptions"]["options"]["state_layout"] = float(STATE_LAYOUT)
    running["environment"]["sdkPipelineOptions"]["options"]["schema_fingerprint"] = float(PLAY_SCHEMA)
    submitted = []
    monkeypatch.setattr(deploy, "running_job", lambda event_type, project, region: running)
    monkeypatch.setattr(delivery, "start", submitted.append)
    return running, submitted


def test_an_update_with_the_same_layout_keeps_the_run_id(cloud):
    _, submitted = cloud
    assert deploy.main([*WHERE, "--event_type", "play", "--update"]) == 0
    [args] = submitted
    assert "--update" in args and f"--run_id={RUN_ID}" in args
    settings = delivery_settings(PipelineOptions(args).view_as(DeliveryOptions))
    assert settings.run_id == RUN_ID, "the new job names its files as the running one did"


@pytest.mark.parametrize(
    "recorded, flag, codec",
    [(None, [], "deflate"), ("zstandard", [], "zstandard"), ("zstandard", ["--codec", "snappy"], "snappy")],
    ids=["a job from before the codec writes deflate", "kept", "changed by the flag"],
)
def test_an_update_keeps_the_running_jobs_codec_unless_told_otherwise(cloud, recorded, flag, codec):
    """Files are self-describing and an hour's parts keep one codec, so the codec may change by
    update; what must not happen is an update quietly switching a job back to the default."""
    running, submitted = cloud
    if recorded:
        running["environment"]["sdkPipelineOptions"]["options"]["codec"] = recorded
    assert deploy.main([*WHERE, "--event_type", "play", "--update", *flag]) == 0
    [args] = submitted
    assert delivery_settings(PipelineOptions(args).view_as(DeliveryOptions)).codec == codec


def test_a_job_deployed_before_the_late_horizon_and_trigger_were_passed_keeps_them_by_update(cloud):
    running, submitted = cloud
    assert "late_horizon_seconds" not in {
        d["key"] for d in running["environment"]["sdkPipelineOptions"]["display_data"]
    }
    assert deploy.main([*WHERE, "--event_type", "play", "--update"]) == 0
    [args] = submitted
    assert {"--late_horizon_seconds=604800", "--trigger_seconds=60"} <= set(args), "recorded explicitly from now on"


@pytest.mark.parametrize(
    "option, recorded, new",
    [
        ("num_shards", 8.0, 16),
        ("window_seconds", 1800.0, 3600),
        ("allowed_lateness_seconds", 1800.0, 600),
        ("late_horizon_seconds", 172800.0, 604800),
        ("trigger_seconds", 30.0, 60),
        ("max_pane_bytes", 1048576.0, 16777216),
        ("state_layout", 1.0, STATE_LAYOUT),
        ("schema_fingerprint", 12345.0, PLAY_SCHEMA),
    ],
)
def test_an_update_that_changes_the_layout_is_refused(cloud, capsys, option, recorded, new):
    running, submitted = cloud
    running["environment"]["sdkPipelineOptions"]["options"][option] = recorded
    with pytest.raises(SystemExit) as exit_:
        deploy.main([*WHERE, "--event_type", "play", "--update"])
    assert exit_.value.code == 2 and submitted == []
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m tools.ops.deploy: error: events-play: ")
    assert f"--{option} would change from {int(recorded)} to {new}, {deploy.KEPT_BECAUSE[option]}" in line


@pytest.mark.parametrize(
    "option", ["late_horizon_seconds", "trigger_seconds", "max_pane_bytes", "state_layout", "schema_fingerprint"]
)
def test_a_running_job_that_records_no_late_horizon_or_trigger_is_not_updated(cloud, capsys, option):
    running, submitted = cloud
    del running["environment"]["sdkPipelineOptions"]["options"][option]
    with pytest.raises(SystemExit) as exit_:
        deploy.main([*WHERE, "--event_type", "play", "--update"])
    assert exit_.value.code == 2 and submitted == []
    assert f"records no --{option}; drain it and deploy instead" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, recorded",
    [("target_file_mb", 512.0), ("max_event_bytes", 1024.0), ("max_future_seconds", 60.0), ("raw_archive_root", None)],
)
def test_an_update_may_change_what_shapes_neither_the_graph_nor_its_state(cloud, option, recorded):
    running, submitted = cloud
    options = running["environment"]["sdkPipelineOptions"]["options"]
    if recorded is None:
        del options[option]  # a job without a raw archive: the update adds its steps
    else:
        options[option] = recorded
    assert deploy.main([*WHERE, "--event_type", "play", "--update"]) == 0
    assert len(submitted) == 1


def test_a_refused_type_stops_the_whole_tier(cloud, monkeypatch):
    running, submitted = cloud
    last = deploy.selected_types(None, "high")[-1]
    changed = copy.deepcopy(running)
    changed["environment"]["sdkPipelineOptions"]["options"]["num_shards"] = 1.0
    monkeypatch.setattr(deploy, "running_job", lambda event_type, *where: changed if event_type == last else running)
    with pytest.raises(SystemExit):
        deploy.main([*WHERE, "--tier", "high", "--update"])
    assert submitted == [], "every type is checked before any job of the tier is updated"


def test_a_running_job_without_a_run_id_is_not_updated(cloud, capsys):
    running, submitted = cloud
    del running["environment"]["sdkPipelineOptions"]["options"]["run_id"]
    with pytest.raises(SystemExit) as exit_:
        deploy.main([*WHERE, "--event_type", "play", "--update"])
    assert exit_.value.code == 2 and submitted == []
    assert "records no --run_id" in capsys.readouterr().err


def test_options_recorded_under_camel_case_names_are_read_too(registry):
    camel = {"windowSeconds": 3600, "allowedLatenessSeconds": 600, "numShards": 16, "runId": RUN_ID}
    camel |= {"lateHorizonSeconds": 604800, "triggerSeconds": 60, "maxPaneBytes": 16777216, "stateLayout": STATE_LAYOUT}
    camel |= {"schemaFingerprint": PLAY_SCHEMA}
    job = {"environment": {"sdkPipelineOptions": {"options": camel}}}
    assert deploy.kept_run_id(registry["play"], job) == RUN_ID


def test_a_dry_run_update_prints_its_steps_without_calling_gcloud(monkeypatch, capsys):
    def no_cloud(*args, **kwargs):
        raise AssertionError("a dry run calls nothing")

    monkeypatch.setattr(deploy.subprocess, "run", no_cloud)
    monkeypatch.setattr(delivery, "start", no_cloud)
    assert deploy.main([*WHERE, "--event_type", "play", "--update", "--dry_run"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("play: would run: gcloud dataflow jobs list")
    assert "gcloud dataflow jobs describe --project=my-project --region=europe-west1 <job id> --full" in line
    assert "--window_seconds=3600 --allowed_lateness_seconds=600 --num_shards=16" in line


def test_a_new_deploy_records_its_layout_and_a_new_run_id(registry):
    args = deploy.dataflow_args(registry["play"], "p", "europe-west1", "b", update=False)
    settings = delivery_settings(PipelineOptions(args).view_as(DeliveryOptions))
    assert {"--window_seconds=3600", "--allowed_lateness_seconds=600", "--num_shards=16"} <= set(args)
    assert {"--late_horizon_seconds=604800", "--trigger_seconds=60"} <= set(args)
    assert (settings.late_horizon_seconds, settings.trigger_seconds) == (604800, 60)
    assert f"--run_id={settings.run_id}" in args


def test_run_id_is_a_new_one_at_launch_unless_given(registry):
    given = PipelineOptions(["--event_type=play", "--storage_root=/tmp/x", "--run_id=r1"]).view_as(DeliveryOptions)
    assert delivery_settings(given).run_id == "r1"
    default = PipelineOptions(["--event_type=play", "--storage_root=/tmp/x"]).view_as(DeliveryOptions)
    assert delivery_settings(default).run_id not in ("r1", None)


def test_a_job_given_another_schemas_fingerprint_refuses_to_start():
    """Code whose schema differs from the one a deploy recorded would write records encoded under the
    other: the job stops at its flags, with one line, before a file is written."""
    flags = ["--event_type=play", "--storage_root=/tmp/x", f"--schema_fingerprint={PLAY_SCHEMA + 1}"]
    with pytest.raises(ValueError, match=f"--schema_fingerprint {PLAY_SCHEMA + 1}: this code delivers play"):
        delivery_settings(PipelineOptions(flags).view_as(DeliveryOptions))
    same = ["--event_type=play", "--storage_root=/tmp/x", f"--schema_fingerprint={PLAY_SCHEMA}"]
    assert delivery_settings(PipelineOptions(same).view_as(DeliveryOptions)).event_type.name == "play"
