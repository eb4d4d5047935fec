"""What every process of a job sets up: its log, and SIGTERM (pod deletion, `ray job stop`, `kill`) as a clean
exit that never cuts a checkpoint write in half."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """Every job's log: INFO and up on stderr, with time, level and module (a no-op once configured)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


_pending: list[int] = []  # signals that arrived inside a deferred block
_deferring = 0  # nesting depth of sigterm_deferred blocks in the main thread
_received: list[int] = []  # every SIGTERM the handler saw, so a masked exit still exits as killed


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) in the main thread, so the entry points' `except BaseException`
    closes the MLflow run as FAILED instead of leaving it RUNNING forever. Inside `sigterm_deferred` the exit
    waits for the block's end: an exception raised inside a serialiser's zip writer would replace the
    SystemExit with the writer's own error (and exit status 1)."""
    if not _in_main_thread():
        return

    def handler(signum, _frame):
        _received.append(signum)
        if _deferring:
            _pending.append(signum)
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def killed_exit_code() -> int | None:
    """128 + the signal if the handler saw one, else None. A library whose `finally` fails while the
    SystemExit passes through it (OmegaConf did: UnboundLocalError) replaces the exit with its own error;
    the entry point asks this to exit as killed all the same."""
    return 128 + _received[0] if _received else None


@contextmanager
def sigterm_deferred() -> Iterator[None]:
    """A SIGTERM arriving inside the block exits when the block ends (main thread; elsewhere a no-op)."""
    global _deferring
    if not _in_main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            raise SystemExit(128 + _pending.pop())
