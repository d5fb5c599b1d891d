"""The steps that Beam names after a DoFn's class keep their names when the class is renamed.

A ParDo with tagged outputs is a composite: the step inside it, the one that runs the
DoFn and holds its state, is named ``ParDo(<the DoFn's default_label>)``, which is the
class's name unless the DoFn says otherwise. ``tests/unit/test_step_names.py`` leaves such
names out (Beam's own transforms name their inner steps so too), so this pins the ones
the delivery path's DoFns give: a rename that changed them would start the stateful
steps empty after an ``--update`` (see that module).
"""

from __future__ import annotations

from tests.unit.test_step_names import built_path

STREAMING = [
    "ParseEvents/Parse/ParDo(ParseEventFn)",
    "EncryptPersonalFields/SealFields/ParDo(EncryptPersonalFieldsFn)",
    "GatherPanes/GatherAndNumber/ParDo(GatherPanesFn)",
    "StageDelivered/WriteFiles/ParDo(WritePaneOfItsNumberFn)",
    "WriteLate/WriteFiles/ParDo(WriteLatePaneFn)",
    "CloseHour/CloseWhenDue/ParDo(CloseHourFn)",
    "CloseHour/PublishHours/PartsWhenIndexed/ParDo(WritePartsWhenIndexedFn)",
]
BOUNDED = [
    "ParseEvents/Parse/ParDo(ParseEventFn)",
    "EncryptPersonalFields/SealFields/ParDo(EncryptPersonalFieldsFn)",
    "Deduplicate/DropRepeatedIds/ParDo(DeduplicateWholeHourFn)",
    "StageDelivered/WriteFiles/ParDo(WritePaneOfItsNumberFn)",
    "WriteLate/WriteFiles/ParDo(WriteLatePaneFn)",
    "CloseHour/CloseWhenDue/ParDo(CloseHourFn)",
    "CloseHour/PublishHours/PartsWhenIndexed/ParDo(WritePartsWhenIndexedFn)",
]


def dofn_step_names(tmp_path, **more) -> list[str]:
    names = []

    def walk(node):
        for part in node.parts:
            if part.full_label.rsplit("/", 1)[-1].startswith("ParDo(") and not part.full_label.startswith("Messages"):
                names.append(part.full_label)
            walk(part)

    walk(built_path(tmp_path, **more))
    return names


def test_the_steps_named_after_dofns_keep_their_names(tmp_path):
    assert dofn_step_names(tmp_path / "streaming") == STREAMING
    assert dofn_step_names(tmp_path / "bounded", trigger_seconds=None) == BOUNDED
