"""Bounded retries with back-off (node/retry.py), the one way the project tries something again."""

import pytest

from node import retry


class Flaky:
    """Fails ``failures`` times with ``error``, then returns "done"."""

    def __init__(self, failures, error=None):
        self.failures, self.error, self.calls = failures, error or ConnectionError("down"), 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


@pytest.fixture
def sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    return slept


def test_retries_with_doubling_back_off_up_to_the_cap(sleeps):
    flaky = Flaky(4)
    assert retry.retrying(flaky, attempts=5, backoff=1.0, max_delay=3.0, retry_on=lambda e: True, what="x") == "done"
    assert flaky.calls == 5 and sleeps == [1.0, 2.0, 3.0, 3.0]


def test_the_last_error_is_raised_after_the_last_attempt(sleeps):
    flaky = Flaky(10)
    with pytest.raises(ConnectionError, match="down"):
        retry.retrying(flaky, attempts=3, backoff=0.5, retry_on=lambda e: True, what="x")
    assert flaky.calls == 3 and sleeps == [0.5, 1.0]


def test_an_error_not_worth_retrying_is_raised_at_once(sleeps):
    flaky = Flaky(10, PermissionError("refused"))
    with pytest.raises(PermissionError):
        retry.retrying(flaky, attempts=3, backoff=0.5, retry_on=lambda e: isinstance(e, ConnectionError), what="x")
    assert flaky.calls == 1 and sleeps == []
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        retry.retrying(flaky, attempts=0, backoff=0.5, retry_on=lambda e: True, what="x")
