"""Bounded retries, and the errors no retry mends: no step retries a call forever.

A step tries a call ``ATTEMPTS`` times in all, backing off, while its error may pass;
then it leaves the error to the runner, which retries the bundle. An error that no retry
mends is raised at once, for the step to give its elements up (to the dead letters) or
to try again later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from apache_beam.io.filesystem import BeamIOError
from google.api_core import exceptions as google_errors

ATTEMPTS = 3
BACKOFF_SECONDS = 1.0
sleep = time.sleep  # module-level, so that a test can skip the waits
# What the job may not do, or not where: a bucket, table or key denied or gone, a request refused.
DENIED = (google_errors.Forbidden, google_errors.NotFound, google_errors.BadRequest)


def with_retries(call: Callable, passing: Callable[[Exception], bool]):
    """``call()``, tried again after an error that ``passing`` says may pass, ``ATTEMPTS``
    times in all; any other error, and the last, is raised."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as error:
            if attempt == ATTEMPTS or not passing(error):
                raise
            sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))


def denied(error: Exception) -> bool:
    """Whether a call on files failed for good: denied (``DENIED``, or by the local file system), or a
    Beam file-system call (a listing, a batch) whose every failure was."""
    if isinstance(error, BeamIOError) and error.exception_details:
        return all(denied(cause) for cause in error.exception_details.values())
    return isinstance(error, (*DENIED, PermissionError))
