"""The one retry loop (compute/base/retry.py) that the storage steps (tests/{unit,integration}/test_basebackup.py) and
the spec pull (tests/unit/test_control_plane.py) both run on: pure, no sleeping."""

from __future__ import annotations

import pytest

from compute.base.retry import RetryFailed, RetryPolicy, retry


class Passing(Exception):
    pass


class Permanent(Exception):
    pass


def failing(errors):
    """An attempt raising each of `errors` in turn, then returning how many it was called."""
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return len(calls)
    return attempt


def test_retries_a_passing_fault_with_the_policys_delays():
    slept, seen = [], []
    got = retry(RetryPolicy(5, 0.5, 2), failing([Passing("a"), Passing("b")]), catch=(Passing,),
                on_retry=lambda n, e, d: seen.append((n, str(e), d)), sleep=slept.append)
    assert got == 3 and slept == [0.5, 1.0] and seen == [(1, "a", 0.5), (2, "b", 1.0)]


def test_gives_up_when_the_policy_says_so():
    with pytest.raises(RetryFailed) as ei:
        retry(RetryPolicy(3, 0), failing([Passing("x")] * 5), catch=(Passing,), sleep=lambda d: None)
    assert ei.value.attempts == 3 and ei.value.gave_up and str(ei.value.error) == "x"


def test_a_permanent_failure_ends_the_loop_at_once():
    with pytest.raises(RetryFailed) as ei:
        retry(RetryPolicy(5, 0), failing([Passing("p"), Permanent("no")]), catch=(Passing, Permanent),
              retryable=lambda e: isinstance(e, Passing), sleep=lambda d: None)
    assert ei.value.attempts == 2 and not ei.value.gave_up and isinstance(ei.value.error, Permanent)


def test_other_exceptions_pass_through_untouched():
    with pytest.raises(Permanent, match="^as is$"):
        retry(RetryPolicy(5, 0), failing([Permanent("as is")]), catch=(Passing,), sleep=lambda d: None)


def test_the_storage_steps_and_the_spec_pull_share_the_policy():
    from compute.storage import control_plane, attempts
    assert attempts.RetryPolicy is RetryPolicy and control_plane.RetryPolicy is RetryPolicy
    assert attempts.SYNC_SAFEKEEPERS_RETRY == RetryPolicy(5, 0.5, 1.5)
