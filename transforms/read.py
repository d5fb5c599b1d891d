"""Read a type's raw messages."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics import Metrics

from event_delivery.contract import slo


class StampArrivalFn(beam.DoFn):
    """Gives every message a ``publish_time``: its element timestamp where the reader left it unset.

    Dataflow's own Pub/Sub reader may leave ``publish_time`` unset; a Pub/Sub read
    stamps each element with the publish time, so that stands in, and such messages
    are counted. A separate step, so that parsing keeps Beam's fast path (no
    per-element parameters) and a backfill, whose messages carry their arrival, skips it.
    """

    def setup(self):
        self.missing = Metrics.counter(slo.NAMESPACE, "missing_publish_time")

    def process(self, message, timestamp=beam.DoFn.TimestampParam):
        if message.publish_time is None:
            self.missing.inc()
            arrival = timestamp.to_utc_datetime(has_tz=True)
            message = PubsubMessage(message.data, message.attributes, message.message_id, arrival, message.ordering_key)
        yield message


class ReadMessages(beam.PTransform):
    """``PubsubMessage``s, with attributes, from the type's delivery subscription.

    Each message carries its Pub/Sub ``publish_time``, its arrival; bucketing uses the
    ``received_at`` that parsing finds in its attributes.
    """

    def __init__(self, subscription: str):
        super().__init__()
        self.subscription = subscription

    def expand(self, pipeline):
        return (
            pipeline
            | "ReadFromPubSub" >> beam.io.ReadFromPubSub(subscription=self.subscription, with_attributes=True)
            | "StampArrival" >> beam.ParDo(StampArrivalFn())
        )
