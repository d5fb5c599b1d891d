"""TestStream helpers: event time and processing time advance together, as on Pub/Sub.

On the Python DirectRunner the Pub/Sub watermark is the wall clock, so processing time
and event time move in step. A TestStream's processing-time clock starts at 0, so the
tests use event times near the epoch and advance both clocks together.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream

from event_delivery.contract.partitions import Layout
from event_delivery.keys.config import KeyConfig
from pipelines.runtime import LOCAL_RUNNER
from tests.messages import published_at
from transforms.settings import DeliverySettings

# Short "hours" for the tests, placed near the epoch because a TestStream's processing
# clock starts at 0: START is 1970-01-01T01:00:00Z.
WINDOW, LATENESS, TRIGGER = 60, 30, 5
START = 3600


class Clock:
    """Builds a TestStream whose watermark and processing time move together."""

    def __init__(self, start_seconds: int):
        self.now = start_seconds
        self.stream = TestStream().advance_processing_time(start_seconds).advance_watermark_to(start_seconds)

    def arrive(self, *elements):
        """Elements arriving now: their element timestamp, and a message's publish time, is now."""
        stamped = [published_at(e, self.now * 1000) if isinstance(e, PubsubMessage) else e for e in elements]
        self.stream = self.stream.add_elements([beam.window.TimestampedValue(e, self.now) for e in stamped])
        return self

    def advance(self, seconds: int):
        self.now += seconds
        self.stream = self.stream.advance_processing_time(seconds).advance_watermark_to(self.now)
        return self

    def finish(self):
        return self.stream.advance_watermark_to_infinity()


def streaming_pipeline():
    options = PipelineOptions(runner=LOCAL_RUNNER)
    options.view_as(StandardOptions).streaming = True
    return beam.Pipeline(options=options)


def local_keys(folder) -> KeyConfig:
    """A SQLite keystore and a local key file in ``folder``, provisioned as ``make provision`` does."""
    keys = KeyConfig(f"sqlite:///{folder}/keystore.db", f"{folder}/kek.key")
    keys.provision()
    return keys


def local_settings(
    root, event_type, keys: KeyConfig, run_id="run1", num_shards=2, raw_archive=False, window_seconds=WINDOW, **more
) -> DeliverySettings:
    """Delivery into ``root``'s delivered/, late/ and dead-letter/ folders (and raw/ with
    ``raw_archive``), with the short hours above unless told otherwise."""
    values = dict(allowed_lateness_seconds=LATENESS, trigger_seconds=TRIGGER, late_horizon_seconds=86400)
    return DeliverySettings(
        event_type,
        layout=Layout.under(str(root), event_type.name, window_seconds, raw_archive),
        keys=keys,
        num_shards=num_shards,
        run_id=run_id,
        **{**values, **more},
    )
