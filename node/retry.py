"""Bounded retries with exponential back-off: the one way this project tries something again.

A volunteer's network fails in passing (a bootstrap peer restarting, a coordinator briefly down, a stream
cut off); a few spaced tries get past that, and a bound keeps a peer that is really gone from costing more
than a few seconds.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from node.errors import one_line

logger = logging.getLogger(__name__)
T = TypeVar("T")


def retrying(attempt: Callable[[], T], *, attempts: int, backoff: float, retry_on: Callable[[Exception], bool],
             what: str, max_delay: float = 30.0) -> T:
    """``attempt()``, tried up to ``attempts`` times while it raises an error ``retry_on`` accepts; sleeps
    ``backoff``, twice that, ... (at most ``max_delay``) in between and logs each failure naming ``what``.
    The last error (or the first one ``retry_on`` refuses) is raised as is."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    delay = backoff
    for number in range(1, attempts):
        try:
            return attempt()
        except Exception as e:
            if not retry_on(e):
                raise
            logger.warning(f"{what}: attempt {number}/{attempts} failed ({one_line(e)}); "
                           f"again in {delay:.1f}s")
        time.sleep(delay)
        delay = min(2 * delay, max_delay)
    return attempt()
