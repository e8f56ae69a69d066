"""Per-source-address limit on enrolment attempts: a token bucket per client address.

``--rate-limit N/PERIOD`` lets each source address make N attempts at once and N more per
PERIOD after that (bucket of N, refilled at N/PERIOD). Over the limit the hub answers 429
with ``Retry-After``; bootstrap.py waits at least that long and retries. ``0`` or ``off``
disables the limit. The table of addresses is bounded (least recently used dropped first).
"""

import math
import re
import time
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Tuple

DEFAULT_RATE_LIMIT = "600/min"
MAX_SOURCES = 65536

_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}
_LIMIT_RE = re.compile(r"(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]*)")


class RateLimit(NamedTuple):
    attempts: int  # bucket size: attempts allowed at once
    period: float  # seconds to refill the whole bucket

    @property
    def per_second(self) -> float:
        return self.attempts / self.period

    def __str__(self) -> str:
        return f"{self.attempts}/{self.period:g}s"


def parse_rate_limit(text: str) -> Optional[RateLimit]:
    """``N/PERIOD`` (PERIOD: 30s, 10, 1m, min, h) as a RateLimit; ``0``/``off`` as None."""
    value = text.strip().lower()
    if value in ("0", "off", "none"):
        return None
    match = _LIMIT_RE.fullmatch(value)
    if not match or match.group(3) not in _UNITS:
        raise ValueError(f"invalid rate limit {text!r}: use N/PERIOD such as 600/min or 20/10s, or off")
    attempts = int(match.group(1))
    period = float(match.group(2) or 1) * _UNITS[match.group(3)]
    if attempts < 1 or period <= 0:
        raise ValueError(f"invalid rate limit {text!r}: N and PERIOD must be positive (or use off)")
    return RateLimit(attempts, period)


class RateLimiter:
    """Token buckets keyed by source address. Not thread-safe: used from the event loop."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = MAX_SOURCES) -> None:
        self.limit = limit
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, source: str) -> float:
        """Spend one attempt of ``source``: 0.0 when allowed, else the seconds until the
        next attempt will be (nothing is spent then)."""
        now = self.clock()
        tokens, at = self._buckets.pop(source, (float(self.limit.attempts), now))
        tokens = min(float(self.limit.attempts), tokens + (now - at) * self.limit.per_second)
        if tokens >= 1.0:
            self._store(source, tokens - 1.0, now)
            return 0.0
        self._store(source, tokens, now)
        return (1.0 - tokens) / self.limit.per_second

    def _store(self, source: str, tokens: float, now: float) -> None:
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)  # least recently seen: at worst it gets a full bucket


def retry_after_header(wait: float) -> str:
    """Whole seconds for ``Retry-After`` (at least 1)."""
    return str(max(1, math.ceil(wait)))
