"""Checks a job makes before it starts, so a misconfiguration is one clear line, not a hang.

Each check raises ``PreflightError`` saying what to fix.
"""

from __future__ import annotations

import os

from google.api_core import exceptions, retry
from google.cloud.storage.retry import DEFAULT_RETRY

from event_delivery import cloud

TIMEOUT_SECONDS = 10
UNREACHABLE = (exceptions.ServiceUnavailable, exceptions.DeadlineExceeded, exceptions.RetryError)


class PreflightError(RuntimeError):
    """The job cannot run as configured; the message says what to fix."""


def _where(env_var: str, service: str) -> str:
    host = os.environ.get(env_var)
    return f"the {service} emulator at {host} (is it running? `make emulators`)" if host else service


def check_subscription(subscription: str) -> None:
    try:
        cloud.subscriber_client().get_subscription(
            subscription=subscription, timeout=TIMEOUT_SECONDS, retry=retry.Retry(timeout=TIMEOUT_SECONDS)
        )
    except exceptions.NotFound:
        raise PreflightError(f"subscription {subscription} does not exist; create it with `make provision`") from None
    except UNREACHABLE:
        raise PreflightError(f"cannot reach {_where(cloud.PUBSUB_EMULATOR_HOST, 'Pub/Sub')}") from None
    except exceptions.GoogleAPICallError as error:
        raise PreflightError(f"cannot read subscription {subscription}: {error.message}") from None


def check_root(root: str, project: str | None) -> None:
    """A gs:// root's bucket must exist; a local root's folder must be creatable."""
    if not root.startswith("gs://"):
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as error:
            raise PreflightError(f"cannot create output folder {root}: {error.strerror}") from None
        return
    bucket = root[len("gs://") :].split("/", 1)[0]
    try:
        client = cloud.storage_client(project or "local-project")
        found = client.lookup_bucket(bucket, timeout=TIMEOUT_SECONDS, retry=DEFAULT_RETRY.with_timeout(TIMEOUT_SECONDS))
    except (exceptions.GoogleAPICallError, OSError, *UNREACHABLE):
        raise PreflightError(f"cannot reach {_where(cloud.STORAGE_EMULATOR_HOST, 'Cloud Storage')}") from None
    if found is None:
        raise PreflightError(f"bucket gs://{bucket} does not exist; create it with `make provision`")
