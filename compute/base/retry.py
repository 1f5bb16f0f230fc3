"""One retry policy and one retry loop, for every step that retries a passing fault (the
storage steps of the start-up, compute/storage.py; the spec pull, compute/storage/control_plane.py).

The policy is pure (attempt -> delay or give up); the loop is its thin executor. What counts as
a passing fault, what is logged and what the final error says stay the caller's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """attempt -> delay or give up (pure): `first_delay` after the first failure, times `factor`
    after each next one, `attempts` in all. Neon's compute_ctl: 0.5 s, x1.5."""
    attempts: int
    first_delay: float = 0.5
    factor: float = 1.5

    def delay_after(self, attempt: int) -> float | None:
        """Seconds to wait after failed attempt `attempt` (1-based); None: give up."""
        if attempt >= self.attempts:
            return None
        return self.first_delay * self.factor ** (attempt - 1)


class RetryFailed(Exception):
    """The attempt that ended the loop failed: `error` (one of the caught types), after
    `attempts` attempts; `gave_up`: it was retryable, the policy said no more."""

    def __init__(self, error: BaseException, attempts: int, gave_up: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.gave_up = gave_up


def retry(policy: RetryPolicy, attempt: Callable[[], T], *, catch: tuple[type[BaseException], ...],
          retryable: Callable[[BaseException], bool] = lambda e: True,
          on_retry: Callable[[int, BaseException, float], None] | None = None,
          sleep: Callable[[float], None] | None = None) -> T:
    """Run `attempt` until it returns. An exception of a `catch` type that is retryable, while
    the policy allows, is followed by on_retry(failed attempts so far, error, delay) and a sleep;
    otherwise the loop ends with RetryFailed. Exceptions of other types pass through as they are."""
    n = 0
    while True:
        n += 1
        try:
            return attempt()
        except catch as e:
            again = retryable(e)
            delay = policy.delay_after(n) if again else None
            if delay is None:
                raise RetryFailed(e, n, gave_up=again) from e
            if on_retry is not None:
                on_retry(n, e, delay)
            (sleep or time.sleep)(delay)
