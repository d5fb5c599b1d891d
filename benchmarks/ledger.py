"""The cost ledger of a run: what each event costs the runner, counted as the runner sees it.

These figures do not depend on the machine: Dataflow bills and limits a streaming job by
them (Streaming Engine bills the bytes it shuffles; every state read and write and every
timer is a round trip to its backend; each key is a unit of work and of parallelism).

- **Keyed shuffles**: the steps whose input the runner groups by key (a ``GroupByKey``,
  or a ``ParDo`` with state or timers), with the elements and bytes that crossed each
  (bytes: the runner's own sampled element sizes, with the step's coder).
- **State and timers**: every read, write (a clear counts as one) and timer set by a
  stateful step, counted by wrapping the SDK harness's state and timer objects in this
  process, so the product's code is untouched. They are logical accesses: a runner's
  state cache may serve some reads without a round trip.
- **Keys**: how many distinct (step, key) pairs held state.

Only the in-process runner (``FnApiRunner`` in ``in_memory`` mode) runs its SDK harness
here, so :func:`counting` works there only.
"""

from __future__ import annotations

import collections
import contextlib

from apache_beam.metrics import monitoring_infos
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.worker import bundle_processor

GROUP_BY_KEY = common_urns.primitives.GROUP_BY_KEY.urn
PAR_DO = common_urns.primitives.PAR_DO.urn


class Tally:
    """State reads, writes and timers set per step (a transform id), and the keys that held state."""

    def __init__(self):
        self.reads = collections.Counter()
        self.writes = collections.Counter()
        self.timers = collections.Counter()
        self.keys = collections.defaultdict(set)


class _CountedState:
    def __init__(self, state, step: str, tally: Tally):
        self._state, self._step, self._tally = state, step, tally

    def read(self):
        self._tally.reads[self._step] += 1
        return self._state.read()

    def write(self, value):
        self._tally.writes[self._step] += 1
        self._state.write(value)

    def add(self, value):
        self._tally.writes[self._step] += 1
        self._state.add(value)

    def clear(self):
        self._tally.writes[self._step] += 1
        self._state.clear()

    def __getattr__(self, name):  # commit, finalize: what the harness calls, uncounted
        return getattr(self._state, name)


class _CountedTimer:
    def __init__(self, timer, step: str, tally: Tally):
        self._timer, self._step, self._tally = timer, step, tally

    def set(self, *args, **kwargs):
        self._tally.timers[self._step] += 1
        self._timer.set(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._timer, name)


@contextlib.contextmanager
def counting():
    """Counts every state access and timer set of the runs started inside; yields the ``Tally``."""
    tally = Tally()
    context = bundle_processor.FnApiUserStateContext
    create_state, get_timer = context._create_state, context.get_timer

    def counted_state(self, state_spec, key, window):
        tally.keys[self._transform_id].add(key)
        return _CountedState(create_state(self, state_spec, key, window), self._transform_id, tally)

    def counted_timer(self, *args):
        return _CountedTimer(get_timer(self, *args), self._transform_id, tally)

    context._create_state, context.get_timer = counted_state, counted_timer
    try:
        yield tally
    finally:
        context._create_state, context.get_timer = create_state, get_timer


class KeepingRunner(FnApiRunner):
    """The in-process runner, keeping the pipeline as it ran it (``proto``): the ids its
    monitoring infos name PCollections by."""

    def run_via_runner_api(self, pipeline_proto, options):
        self.proto = pipeline_proto
        return super().run_via_runner_api(pipeline_proto, options)


def _keyed_steps(proto: beam_runner_api_pb2.Pipeline) -> dict[str, tuple[str, str]]:
    """``{transform id: (its name, its input PCollection)}`` of every step the runner feeds by key."""
    steps = {}
    for transform_id, transform in proto.components.transforms.items():
        urn = transform.spec.urn
        if urn == PAR_DO:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if not (payload.state_specs or payload.timer_family_specs):
                continue
            main = next(tag for tag in transform.inputs if tag not in payload.side_inputs)
        elif urn == GROUP_BY_KEY:
            main = next(iter(transform.inputs))
        else:
            continue
        steps[transform_id] = (transform.unique_name, transform.inputs[main])
    return steps


def _on_the_path(proto: beam_runner_api_pb2.Pipeline, source: str, sink: str) -> set[str]:
    """The leaf transforms downstream of step ``source`` and upstream of step ``sink`` (full
    names of composite steps): those an event's body goes through from one to the other."""
    leaves = {i: t for i, t in proto.components.transforms.items() if not t.subtransforms}
    consumers, producers = collections.defaultdict(set), collections.defaultdict(set)
    for i, t in leaves.items():
        for pcollection in t.inputs.values():
            consumers[pcollection].add(i)
        for pcollection in t.outputs.values():
            producers[pcollection].add(i)

    def walk(name: str, edges, onward) -> set[str]:
        todo = [i for i, t in leaves.items() if t.unique_name.startswith(name + "/")]
        seen = set(todo)
        while todo:
            for pcollection in onward(leaves[todo.pop()]).values():
                for i in edges[pcollection] - seen:
                    seen.add(i)
                    todo.append(i)
        return seen

    return walk(source, consumers, lambda t: t.outputs) & walk(sink, producers, lambda t: t.inputs)


def sizes_by_pcollection(result) -> dict[str, tuple[int, float]]:
    """``{PCollection: (elements, mean encoded bytes)}`` from the runner's monitoring infos
    (which the in-process runner hands out once)."""
    counts, means = {}, {}
    for info in result.monitoring_infos():
        pcollection = info.labels.get("PCOLLECTION")
        if info.urn == monitoring_infos.ELEMENT_COUNT_URN:
            counts[pcollection] = counts.get(pcollection, 0) + monitoring_infos.extract_counter_value(info)
        elif info.urn == monitoring_infos.SAMPLED_BYTE_SIZE_URN:
            sampled, total, _, _ = monitoring_infos.extract_distribution(info)
            if sampled:
                means[pcollection] = total / sampled
    return {p: (n, means.get(p, 0.0)) for p, n in counts.items()}


def ledger(proto, sizes: dict, tally: Tally, events: int, prefix: str, source: str, sink: str) -> dict:
    """The ledger of one type's steps (names under ``prefix``) in a run over ``events`` events.

    ``sizes`` are the run's ``sizes_by_pcollection``. ``steps`` lists each keyed step:
    elements in, bytes in (elements x mean sampled size), state reads, writes and timers
    set, distinct keys, and whether an event's body goes through it on its way from step
    ``source`` to step ``sink`` (names under ``prefix``). The ``per_event`` figures divide
    the totals by ``events``; ``shuffles`` counts the keyed steps on that way.
    """
    path = _on_the_path(proto, prefix + source, prefix + sink)
    steps = []
    for transform_id, (name, pcollection) in sorted(_keyed_steps(proto).items(), key=lambda kv: kv[1][0]):
        if not name.startswith(prefix):
            continue
        elements, mean = sizes.get(pcollection, (0, 0.0))
        counted = name if name in tally.keys else transform_id  # the runner names steps by either
        steps.append(
            {
                "step": name[len(prefix) :],
                "elements": elements,
                "bytes": round(elements * mean),
                "state_reads": tally.reads[counted],
                "state_writes": tally.writes[counted],
                "timers_set": tally.timers[counted],
                "keys": len(tally.keys[counted]),
                "carries_events": transform_id in path,
            }
        )
    total = lambda field: sum(step[field] for step in steps)  # noqa: E731
    return {
        "events": events,
        "steps": steps,
        "per_event": {
            "shuffles": sum(step["carries_events"] for step in steps),
            "bytes_shuffled": total("bytes") / events,
            "state_reads": total("state_reads") / events,
            "state_writes": total("state_writes") / events,
            "timers_set": total("timers_set") / events,
            "keys": total("keys") / events,
        },
    }
