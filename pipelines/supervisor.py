"""Several local pipelines in one process, run until one of them ends or the process is stopped.

The local runner works a pipeline on its own thread; a thread per pipeline waits for it,
and the main thread waits for the first to end (or for SIGTERM or Ctrl-C), then cancels
them all.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _wait(result, ended: queue.Queue) -> None:
    try:
        result.wait_until_finish()
        ended.put(None)
    except Exception as error:  # the main thread logs it and stops the others
        ended.put(error)


def run_until_stopped(results, what: str) -> int:
    """Waits on the pipelines' ``results`` until one ends or the process is stopped, then
    cancels them all; returns 1 when one failed, else 0. ``what`` names them in the log."""
    signal.signal(signal.SIGTERM, _interrupt)
    ended = queue.Queue()
    for result in results:
        threading.Thread(target=_wait, args=(result, ended), daemon=True).start()
    failed = None
    try:
        while True:
            with contextlib.suppress(queue.Empty):
                failed = ended.get(timeout=1)
                break
    except KeyboardInterrupt:
        logging.info("stopping the %s", what)
    for result in results:
        result.cancel()
    if failed is not None:
        logging.error("a pipeline of the %s failed: %s", what, failed)
        return 1
    return 0
