"""TestStream helpers: event time and processing time advance together, as on Pub/Sub.

On the Python DirectRunner the Pub/Sub watermark is the wall clock, so processing time
and event time move in step. A TestStream's processing-time clock starts at 0, so the
tests use event times near the epoch and advance both clocks together.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream

from pipelines.runtime import LOCAL_RUNNER


class Clock:
    """Builds a TestStream whose watermark and processing time move together."""

    def __init__(self, start_seconds: int):
        self.now = start_seconds
        self.stream = TestStream().advance_processing_time(start_seconds).advance_watermark_to(start_seconds)

    def arrive(self, *elements):
        """Elements arriving now; their element timestamp (the publish time) is now."""
        self.stream = self.stream.add_elements([beam.window.TimestampedValue(e, self.now) for e in elements])
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
