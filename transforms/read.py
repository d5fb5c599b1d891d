"""Read a type's raw messages."""

from __future__ import annotations

import apache_beam as beam


class ReadMessages(beam.PTransform):
    """``PubsubMessage``s, with attributes, from the type's delivery subscription.

    Each message carries its Pub/Sub ``publish_time``, its arrival; bucketing uses the
    ``received_at`` that parsing finds in its attributes.
    """

    def __init__(self, subscription: str):
        super().__init__()
        self.subscription = subscription

    def expand(self, pipeline):
        return pipeline | "ReadFromPubSub" >> beam.io.ReadFromPubSub(
            subscription=self.subscription, with_attributes=True
        )
