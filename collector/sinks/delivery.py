"""Sending one alert until the receiver takes it: backoff with jitter, Retry-After, rate limits.

The durable outbox worker owns the schedule across restarts; this is the loop inside one
attempt window, shared by the worker and the tests. Every wait is on a ``threading.Event``, so
a shutdown interrupts it at once (``DeliveryInterrupted``, which is retryable: the job stays in
the outbox).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from collector.sinks.alert import Alert, AlertSink
from collector.sinks.errors import DeliveryError, DeliveryInterrupted

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt n waits ``initial_s * multiplier**(n-1)``, at most
    ``max_s``, less a random part of up to ``jitter`` of it so that retries spread out."""

    initial_s: float = 1.0
    max_s: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s or self.multiplier < 1:
            raise ValueError(f"unusable backoff {self!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter = {self.jitter!r} is not between 0 and 1")

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt - 1))
        return base * (1.0 - self.jitter * rng.random())


class RateLimiter:
    """A token bucket: ``per_minute`` sends on average, ``burst`` at once. Thread-safe.

    It limits one collector process; with several replicas each has its own bucket.
    """

    def __init__(
        self, per_minute: float, *, burst: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("a rate limit needs per_minute > 0 and burst >= 1")
        self.per_minute = per_minute
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token and return 0, or return how many seconds until one is free."""
        with self._lock:
            now = self._clock()
            rate_per_s = self.per_minute / 60.0
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * rate_per_s)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / rate_per_s

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a token; False when ``stop`` was set first."""
        while (wait_s := self.reserve()) > 0:
            if stop.wait(wait_s):
                return False
        return not stop.is_set()


def deliver_with_retries(
    sink: AlertSink,
    alert: Alert,
    *,
    attempts: int,
    backoff: Backoff | None = None,
    stop: threading.Event | None = None,
    limiter: RateLimiter | None = None,
    rng: random.Random | None = None,
    max_delay_s: float | None = None,
) -> int:
    """Send ``alert`` through ``sink`` in up to ``attempts`` tries; return the tries used.

    Raises the last ``DeliveryError`` when it is final or the tries are used up, and
    ``DeliveryInterrupted`` when ``stop`` is set while waiting. A receiver's Retry-After is
    honoured: the wait is never shorter than it asked. A wait longer than ``max_delay_s`` is
    not waited here: the retryable error is raised at once (its ``retry_after_s`` says when),
    so the outbox can schedule the next attempt durably instead of holding a worker.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    backoff = backoff or Backoff()
    stop = stop or threading.Event()
    rng = rng or random.Random()
    bound = log.bind(sink=sink.name, dedup_key=alert.dedup_key, status=alert.status)
    for attempt in range(1, attempts + 1):
        if limiter is not None and not limiter.acquire(stop):
            raise DeliveryInterrupted()
        try:
            sink.send(alert)
        except DeliveryError as exc:
            if not exc.retryable or attempt == attempts:
                bound.warning(
                    "alert_delivery_failed",
                    attempt=attempt,
                    retryable=exc.retryable,
                    error=str(exc),
                )
                raise
            delay_s = max(backoff.delay_s(attempt, rng), exc.retry_after_s or 0.0)
            if max_delay_s is not None and delay_s > max_delay_s:
                bound.info("alert_delivery_deferred", attempt=attempt, delay_s=round(delay_s, 3))
                raise
            bound.info(
                "alert_delivery_retry",
                attempt=attempt,
                delay_s=round(delay_s, 3),
                retry_after_s=exc.retry_after_s,
                error=str(exc),
            )
            if stop.wait(delay_s):
                raise DeliveryInterrupted() from exc
        else:
            bound.info("alert_delivered", attempt=attempt)
            return attempt
    raise AssertionError("unreachable")  # pragma: no cover
