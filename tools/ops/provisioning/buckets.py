"""Buckets and their lifecycle rules. The rules are set, not added to, and only when they differ
from the plan's: a second run finds them as planned and writes nothing."""

from __future__ import annotations

from google.api_core import exceptions

from tools.ops.provisioning.changes import CREATED, UNCHANGED, UPDATED, Change
from tools.ops.provisioning.plan import Bucket


def ensure_bucket(client, bucket: Bucket) -> Change:
    try:
        client.create_bucket(bucket.name)
        outcome = CREATED
    except exceptions.Conflict:
        outcome = UNCHANGED
    found = client.get_bucket(bucket.name)
    planned = [rule.as_lifecycle() for rule in bucket.rules]
    if [dict(rule) for rule in found.lifecycle_rules] != planned:
        found.lifecycle_rules = planned
        found.patch()
        outcome = UPDATED if outcome == UNCHANGED else outcome
    return Change(outcome, "bucket", f"gs://{bucket.name} ({len(planned)} lifecycle rules)")
