"""Checks a job makes before it starts, so a misconfiguration is one clear line, not a hang.

Each check raises ``PreflightError`` saying what to fix.
"""

from __future__ import annotations

import contextlib
import os
import sys

from google.api_core import exceptions, retry
from google.cloud.storage.retry import DEFAULT_RETRY

from event_delivery.cloud import clients

TIMEOUT_SECONDS = 10
UNREACHABLE = (exceptions.ServiceUnavailable, exceptions.DeadlineExceeded, exceptions.RetryError)


class PreflightError(RuntimeError):
    """The job cannot run as configured; the message says what to fix."""


@contextlib.contextmanager
def exit_on_failure(prog: str):
    """A check that fails inside the block ends the command ``prog``: one line on stderr, exit code 2."""
    try:
        yield
    except PreflightError as error:
        fail(prog, str(error))


def fail(prog: str, reason: str):
    """Ends the command ``prog`` over a bad flag or a failed check: one line on stderr, exit code 2."""
    sys.stderr.write(f"{prog}: error: {reason}\n")
    sys.exit(2)


def _where(env_var: str, service: str) -> str:
    host = os.environ.get(env_var)
    return f"the {service} emulator at {host} (is it running? `make emulators`)" if host else service


def _has_google_credentials() -> bool:
    """Whether Application Default Credentials can be found, judged without any network call.

    ``google.auth.default()`` would ask the GCE metadata server, which off GCE costs
    seconds of retries; a VM's own residency is read from a local file instead.
    """
    from google.auth import _cloud_sdk, environment_vars
    from google.auth.compute_engine import _metadata

    return (
        bool(os.environ.get(environment_vars.CREDENTIALS))
        or os.path.exists(_cloud_sdk.get_application_default_credentials_path())
        or _metadata.detect_gce_residency_linux()
    )


def check_credentials(env_var: str | None, service: str) -> None:
    """A service is reachable only through its emulator (named by ``env_var``, if it has one) or with
    Google credentials."""
    if (env_var and os.environ.get(env_var)) or _has_google_credentials():
        return
    if env_var is None:
        raise PreflightError(
            f"{service} needs Google credentials and there are none: `gcloud auth application-default login`"
        )
    raise PreflightError(
        f"no {service} emulator ({env_var} is not set) and no Google credentials: run `make emulators` "
        "for local runs, or `gcloud auth application-default login` for the cloud"
    )


def check_subscription(subscription: str) -> None:
    _check_pubsub("subscription", subscription, lambda **call: clients.subscriber_client().get_subscription(**call))


def check_topic(topic: str) -> None:
    _check_pubsub("topic", topic, lambda **call: clients.publisher_client().get_topic(**call))


def _check_pubsub(what: str, path: str, get) -> None:
    check_credentials(clients.PUBSUB_EMULATOR_HOST, "Pub/Sub")
    try:
        get(**{what: path}, timeout=TIMEOUT_SECONDS, retry=retry.Retry(timeout=TIMEOUT_SECONDS))
    except exceptions.NotFound:
        raise PreflightError(f"{what} {path} does not exist; create it with `make provision`") from None
    except UNREACHABLE:
        raise PreflightError(f"cannot reach {_where(clients.PUBSUB_EMULATOR_HOST, 'Pub/Sub')}") from None
    except exceptions.GoogleAPICallError as error:
        raise PreflightError(f"cannot read {what} {path}: {error.message}") from None


def check_root(root: str, project: str | None = None, create: bool = True) -> None:
    """A gs:// root's bucket must exist; a local root's folder must exist, or with ``create`` be creatable."""
    if not root.startswith("gs://"):
        if not create:
            if not os.path.isdir(root):
                raise PreflightError(f"there is no folder {root}")
            return
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as error:
            raise PreflightError(f"cannot create output folder {root}: {error.strerror}") from None
        return
    check_credentials(clients.STORAGE_EMULATOR_HOST, "Cloud Storage")
    bucket = root[len("gs://") :].split("/", 1)[0]
    try:
        client = clients.storage_client(project or "local-project")
        found = client.lookup_bucket(bucket, timeout=TIMEOUT_SECONDS, retry=DEFAULT_RETRY.with_timeout(TIMEOUT_SECONDS))
    except (exceptions.GoogleAPICallError, OSError, *UNREACHABLE):
        raise PreflightError(f"cannot reach {_where(clients.STORAGE_EMULATOR_HOST, 'Cloud Storage')}") from None
    if found is None:
        raise PreflightError(f"bucket gs://{bucket} does not exist; create it with `make provision`")


def storage_to_read(prog: str, root: str) -> str:
    """``root`` without a trailing slash, once it exists, with the emulators' credentials set:
    where the tools that only read the storage (audit, report) start. Exits with code 2,
    saying what is missing, if it does not exist."""
    root = root.rstrip("/")
    with exit_on_failure(prog):
        check_root(root, create=False)
    clients.use_emulator_credentials()
    return root
