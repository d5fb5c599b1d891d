"""The steps that Beam names after a DoFn's class keep their names when the class is renamed.

A ParDo with tagged outputs is a composite: the step inside it, the one that runs the
DoFn and holds its state, is named ``ParDo(<the DoFn's default_label>)``, which is the
class's name unless the DoFn says otherwise. ``tests/test_step_names.py`` leaves such
names out (Beam's own transforms name their inner steps so too), so this pins the ones
the delivery path's DoFns give: a rename that changed them would start the stateful
steps empty after an ``--update`` (see that module).
"""

from __future__ import annotations

import apache_beam as beam

from event_delivery.contract.registry import load_registry
from pipelines.delivery import deliver
from tests.streams import local_keys, local_settings

STREAMING = [
    "ParseEvents/Parse/ParDo(ParseEventFn)",
    "EncryptPersonalFields/SealFields/ParDo(EncryptPersonalFieldsFn)",
    "MarkRepeats/MarkRepeatedIds/ParDo(MarkRepeatsFn)",
    "Deduplicate/DropRepeatedIds/ParDo(DeduplicateFn)",
    "StageDelivered/WriteFiles/ParDo(WriteNumberedPaneFn)",
    "WriteLate/WriteFiles/ParDo(WriteLatePaneFn)",
    "CloseHour/CloseWhenDue/ParDo(CloseHourFn)",
]
BOUNDED = [
    "ParseEvents/Parse/ParDo(ParseEventFn)",
    "EncryptPersonalFields/SealFields/ParDo(EncryptPersonalFieldsFn)",
    "Deduplicate/DropRepeatedIds/ParDo(DeduplicateWholeHourFn)",
    "StageDelivered/WriteFiles/ParDo(WritePaneFn)",
    "WriteLate/WriteFiles/ParDo(WriteLatePaneFn)",
    "CloseHour/CloseWhenDue/ParDo(CloseHourFn)",
]


def dofn_step_names(tmp_path, **more) -> list[str]:
    settings = local_settings(tmp_path, load_registry()["play"], local_keys(tmp_path), raw_archive=True, **more)
    pipeline = beam.Pipeline()
    deliver(pipeline | "Messages" >> beam.Create([]), settings)
    names = []

    def walk(node):
        for part in node.parts:
            if part.full_label.rsplit("/", 1)[-1].startswith("ParDo(") and not part.full_label.startswith("Messages"):
                names.append(part.full_label)
            walk(part)

    walk(pipeline.transforms_stack[0])
    return names


def test_the_steps_named_after_dofns_keep_their_names(tmp_path):
    assert dofn_step_names(tmp_path / "streaming") == STREAMING
    assert dofn_step_names(tmp_path / "bounded", trigger_seconds=None) == BOUNDED
