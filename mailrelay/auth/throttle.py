"""
Failed-login throttling per client address, shared by SMTP AUTH and HTTP Basic auth.

After ``maxFailures`` failures from one address within ``window`` seconds, that address is
refused without checking credentials until the window has passed. A successful login does not
clear the count: a client with an account of its own could otherwise guess at another's
password without end, logging in as itself after every few guesses. Entries are forgotten
lazily, and the table is bounded so that a flood of addresses cannot grow it without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

FAILED_LOGINS_PER_CLIENT = 10
"""Failed logins from one address (within the window) before its logins are refused."""


class LoginThrottle:
    def __init__(
        self,
        seconds: Callable[[], float],
        maxFailures: int = FAILED_LOGINS_PER_CLIENT,
        window: float = 300.0,
        maxAddresses: int = 100_000,
    ) -> None:
        self._seconds = seconds
        self._maxFailures = maxFailures
        self._window = window
        self._maxAddresses = maxAddresses
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def blocked(self, address: str) -> bool:
        """Whether logins from ``address`` are refused right now."""
        entry = self._failures.get(address)
        if entry is None:
            return False
        first, count = entry
        if self._seconds() - first > self._window:
            del self._failures[address]
            return False
        return count >= self._maxFailures

    def failed(self, address: str) -> None:
        """Record a failed login from ``address``."""
        now = self._seconds()
        first, count = self._failures.pop(address, (now, 0))
        if now - first > self._window:
            first, count = now, 0
        self._failures[address] = (first, count + 1)
        while len(self._failures) > self._maxAddresses:
            self._failures.popitem(last=False)
