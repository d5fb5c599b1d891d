"""The delivery job's step names stay as the running jobs know them.

Dataflow's in-place ``--update`` hands each step's state (the ids of open hours, their
closing timers, the staged panes) to the step of the same name in the new job; a renamed
step starts empty, and the hours it held are delivered twice or never closed. A rename
must therefore be deliberate: it changes ``tests/fixtures/step_names.json`` in the same
commit.
"""

from __future__ import annotations

import json
import pathlib

import apache_beam as beam

from event_delivery.contract.registry import load_registry
from pipelines.delivery import deliver
from tests.streams import local_keys, local_settings

RECORDED = pathlib.Path(__file__).parents[1] / "fixtures" / "step_names.json"


def built_path(tmp_path, **more):
    """The top node of a pipeline that ``deliver`` builds (for ``play``, with the raw archive) on an
    empty input named ``Messages``."""
    settings = local_settings(tmp_path, load_registry()["play"], local_keys(tmp_path), raw_archive=True, **more)
    pipeline = beam.Pipeline()
    deliver(pipeline | "Messages" >> beam.Create([]), settings)
    return pipeline.transforms_stack[0]


def step_names(tmp_path, **more) -> list[str]:
    """The full names of the steps ``deliver`` builds, down to the steps Beam's own transforms
    name inside themselves, which follow Beam's version and not this code."""
    names = []

    def walk(node):
        for part in node.parts:
            if part.full_label == "Messages" or "(" in part.full_label.rsplit("/", 1)[-1]:
                continue
            names.append(part.full_label)
            if not type(part.transform).__module__.startswith("apache_beam"):
                walk(part)

    walk(built_path(tmp_path, **more))
    return names


def test_the_streaming_and_the_bounded_path_keep_their_step_names(tmp_path):
    recorded = json.loads(RECORDED.read_text())
    assert step_names(tmp_path / "streaming") == recorded["streaming"]
    assert step_names(tmp_path / "bounded", trigger_seconds=None) == recorded["bounded"]
