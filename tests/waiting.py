"""Waiting on real processes: poll a condition until it holds or a deadline passes."""

import time
from typing import Callable, Optional


def wait_for(condition: Callable, timeout: float, what: str, interval: float = 1.0,
             explain: Optional[Callable[[], str]] = None):
    """Poll ``condition`` every ``interval`` s; return its first truthy value, or fail after ``timeout`` s
    with "no {what}" and what ``explain`` says (the processes' state, so that a CI log shows why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"no {what} within {timeout:.0f}s" + (explain() if explain is not None else ""))
