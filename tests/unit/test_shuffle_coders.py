"""The delivery job's shuffles and stateful steps keep the coders the running jobs know.

Dataflow's in-place ``--update`` keeps a stateful step's state (the ids of open hours,
their timers, the panes a shuffle holds) only if the step's key coder is unchanged: the
state is stored under each key's encoding, so a key encoded anew finds nothing, and the
hours it held are delivered twice or never closed. The same holds for the window coder
and for the coders the state itself is stored with. A key coder must also be
deterministic: one that pickles (``FastPrimitivesCoder``'s fallback) can encode one key
in two ways and split its state in two. Beam picks coders from type hints, so dropping or
changing a hint (``BucketByHour``'s ``tuple[tuple[int, str], ...]``) changes them
silently; a change must therefore be deliberate: it bumps ``transforms.settings.STATE_LAYOUT``
(which ``make update`` checks) and rewrites ``tests/fixtures/shuffle_coders.json`` in the
same commit (``python -m tests.unit.test_shuffle_coders``). The fixture records the layout
its coders belong to, and the rewrite refuses other coders under the same layout: a change
of coders cannot pass without a new layout, which ``make update`` then refuses to mix
with the old. (Changes within one layout that no job runs yet, all bound for one release,
are recorded by deleting the fixture before rewriting it.) A Beam upgrade may change them
too: it is then one to read before an ``--update``.

The coders are read from the pipeline proto the job submits, as the runner sees them:
standard coders by their URN (``kv`` for ``beam:coder:kv:v1``), the coders it cannot read
(pickled Python) by class (``FastPrimitivesCoder``).
"""

from __future__ import annotations

import json
import pathlib
import sys

import apache_beam as beam
import pytest
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.pipeline_context import PipelineContext

from event_delivery.contract.registry import load_registry
from pipelines.delivery import deliver
from tests.streams import local_keys, local_settings
from transforms.read import ReadMessages
from transforms.settings import STATE_LAYOUT

RECORDED = pathlib.Path(__file__).parents[1] / "fixtures" / "shuffle_coders.json"


def delivery_proto(tmp_path) -> beam_runner_api_pb2.Pipeline:
    """The pipeline proto of the delivery job for ``play``, with the raw archive, as submitted."""
    settings = local_settings(tmp_path, load_registry()["play"], local_keys(tmp_path), raw_archive=True)
    pipeline = beam.Pipeline()
    deliver(pipeline | "ReadMessages" >> ReadMessages("projects/my-project/subscriptions/play"), settings)
    return pipeline.to_runner_api()


def keyed_steps(proto) -> dict:
    """For every shuffle and every stateful step: its input's key, value and window coders,
    and the coders of its state and timers."""
    components = proto.components
    context = PipelineContext(components)

    def described(coder_id: str) -> str:
        coder = components.coders[coder_id]
        urn = coder.spec.urn
        if urn == python_urns.PICKLED_CODER:
            name = type(context.coders.get_by_id(coder_id)).__name__
        else:
            name = urn.removeprefix("beam:coder:").removesuffix(":v1")
        parts = [described(part) for part in coder.component_coder_ids]
        return f"{name}({', '.join(parts)})" if parts else name

    steps = {}
    for step in components.transforms.values():
        if step.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn:
            side_inputs, state = (), {}
        elif step.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(step.spec.payload)
            state = {name: ", ".join(map(described, _stored_with(spec))) for name, spec in payload.state_specs.items()}
            state |= {name: described(spec.timer_family_coder_id) for name, spec in payload.timer_family_specs.items()}
            if not state:
                continue
            side_inputs = payload.side_inputs
        else:
            continue
        [main_input] = [pcoll for tag, pcoll in step.inputs.items() if tag not in side_inputs]
        pcollection = components.pcollections[main_input]
        kv = components.coders[pcollection.coder_id]
        assert kv.spec.urn == common_urns.coders.KV.urn, f"{step.unique_name} is keyed by a KV"
        window = components.windowing_strategies[pcollection.windowing_strategy_id].window_coder_id
        key, value = kv.component_coder_ids
        steps[step.unique_name] = {
            "key": described(key),
            "value": described(value),
            "window": described(window),
            "state": dict(sorted(state.items())),
        }
    return dict(sorted(steps.items()))


def _stored_with(spec: beam_runner_api_pb2.StateSpec) -> list[str]:
    """The coders a state cell stores its values (and a map's keys) with."""
    held = getattr(spec, spec.WhichOneof("spec"))
    return [coder_id for field, coder_id in held.ListFields() if field.name.endswith("coder_id")]


def recorded(steps: dict, layout: int, before: dict) -> dict:
    """The fixture for ``steps`` under state ``layout``, given the fixture ``before``; raises
    ``ValueError`` for other coders under the layout ``before`` recorded them for."""
    if before.get("state_layout") == layout and before.get("steps") != steps:
        raise ValueError(f"the coders changed under state layout {layout}: bump transforms.settings.STATE_LAYOUT")
    return {"state_layout": layout, "steps": steps}


def test_the_shuffles_and_stateful_steps_keep_their_coders(tmp_path):
    fixture = json.loads(RECORDED.read_text())
    assert fixture == recorded(keyed_steps(delivery_proto(tmp_path)), STATE_LAYOUT, fixture)


def test_coders_recorded_anew_need_a_new_state_layout():
    steps = {"GatherPanes": {"key": "string_utf8", "state": {}}}
    before = recorded(steps, 3, {})
    other = {"GatherPanes": {"key": "FastPrimitivesCoder", "state": {}}}
    with pytest.raises(ValueError, match="bump"):
        recorded(other, 3, before)
    assert recorded(other, 4, before) == {"state_layout": 4, "steps": other}
    assert recorded(steps, 3, before) == before, "the same coders rewrite the same fixture"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        fresh = recorded(
            keyed_steps(delivery_proto(pathlib.Path(where))), STATE_LAYOUT, json.loads(RECORDED.read_text())
        )
    RECORDED.write_text(json.dumps(fresh, indent=1) + "\n")
    print(f"{RECORDED}: state layout {STATE_LAYOUT}, {len(fresh['steps'])} keyed steps", file=sys.stderr)
