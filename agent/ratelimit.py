"""Rate-limited logging of a failure that repeats (a read-only offsets.json, a full disk).

A failure that happens on every tick would log every second and bury everything else.
`RepeatedFailure` logs the first failure in full, then at most one summary per `every`
seconds with how many failures there were since the last line, and one `*_recovered` event
when the operation works again. Pure bookkeeping around a structlog logger: the clock is
injected, so tests need no sleeps.

    save_failures = RepeatedFailure(log, "state_save_failed")
    try:
        save()
    except OSError as exc:
        save_failures.failed(path=..., error=str(exc), action="...")
    else:
        save_failures.succeeded(path=...)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

SUMMARY_EVERY = 60.0


class RepeatedFailure:
    """One operation's failures: first logged, then summarized, then its recovery logged."""

    def __init__(self, logger: Any, event: str, every: float = SUMMARY_EVERY,
                 clock: Callable[[], float] = time.monotonic,
                 recovered_event: str | None = None) -> None:
        self.log = logger
        self.event = event
        self.recovered_event = recovered_event or event.removesuffix("_failed") + "_recovered"
        self.every = every
        self.clock = clock
        self.failures = 0
        """Failures since the operation last worked (0: it works)."""
        self._unlogged = 0
        self._logged_at = 0.0
        self._first_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, **fields: Any) -> None:
        """The operation failed; log it if it is the first failure or a summary is due."""
        now = self.clock()
        self.failures += 1
        if self.failures == 1:
            self._first_at = self._logged_at = now
            self.log.error(self.event, **fields)
            return
        self._unlogged += 1
        if now - self._logged_at >= self.every:
            self.log.error(self.event, **fields, repeated=self._unlogged,
                           failures=self.failures, failing_for=round(now - self._first_at, 1))
            self._logged_at, self._unlogged = now, 0

    def succeeded(self, **fields: Any) -> None:
        """The operation worked; if it was failing, log that it recovered, and start over."""
        if not self.failures:
            return
        self.log.info(self.recovered_event, **fields, failures=self.failures,
                      failed_for=round(self.clock() - self._first_at, 1))
        self.failures = self._unlogged = 0
