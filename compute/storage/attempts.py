"""A storage attempt's failure (StorageError: retryable or not) and the storage steps' retries
(with_retries: compute.storage.retry's loop with the storage's messages).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar


from compute.base.retry import RetryFailed, RetryPolicy, retry
from compute.model.launch import default

log = logging.getLogger("compute.storage")

T = TypeVar("T")
_TAIL = 2048  # bytes of child output kept for error messages
DEFAULT_TIMEOUT = default("storage_timeout")  # --storage-timeout
DEFAULT_DEADLINE = default("attempt_deadline")  # --attempt-deadline


class StorageError(Exception):
    """A storage step failed; the message is safe to show (no secrets). `retryable`: a transient
    cause (refused, reset, timed out, "try again later"), worth another attempt."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def _truncate(text: str, limit: int = _TAIL) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


# ---------------------------------------------------------------- retries

SYNC_SAFEKEEPERS_RETRY = RetryPolicy(attempts=5)
BASEBACKUP_RETRY = RetryPolicy(attempts=10)


def with_retries(what: str, policy: RetryPolicy, attempt: Callable[[], T], *,
                 before_retry: Callable[[], None] | None = None,
                 on_retry: Callable[[int], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `attempt` until it succeeds, fails for good, or the policy gives up (compute/base/retry.py).
    Every failure is logged with its cause; on_retry(n) gets the number of retries so far (for
    the metrics)."""
    def retrying(n: int, e: BaseException, delay: float) -> None:
        log.warning("%s attempt %d/%d failed: %s; retrying in %.2f s", what, n, policy.attempts, e, delay)
        if on_retry is not None:
            on_retry(n)
        if before_retry is not None:
            before_retry()
    try:
        return retry(policy, attempt, catch=(StorageError,), retryable=lambda e: e.retryable,
                     on_retry=retrying, sleep=sleep)
    except RetryFailed as failed:
        e, n = failed.error, failed.attempts
        if n == 1 and not failed.gave_up:
            raise e from None
        why = "gave up" if failed.gave_up else "not retryable"
        log.error("%s attempt %d/%d failed (%s): %s", what, n, policy.attempts, why, e)
        raise StorageError(f"{what} failed after {n} attempt(s): {e}") from None


def _one_line(text: str, limit: int = 500) -> str:
    """What a (possibly hostile) server said, as one bounded line for logs and /status."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
