"""
The account-data cache both store backends keep: lookups of accounts, API keys, senders, DKIM
keys and webhook secrets, which every login and every new session reads and which change
rarely, remembered for ``ACCOUNT_CACHE_SECONDS``.

A store's own writes of such data forget everything remembered, at once and again when the
write ends; another process's (the admin command line's, another relay's) are seen within
that time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from mailrelay.store.common import ACCOUNT_CACHE_ENTRIES, ACCOUNT_CACHE_SECONDS

T = TypeVar("T")


class AccountCache:
    """
    Lookups remembered for ``seconds`` by the clock ``clock``, at most ``entries`` of them
    (past that, all are forgotten).
    """

    def __init__(
        self,
        clock: IReactorTime,
        seconds: float = ACCOUNT_CACHE_SECONDS,
        entries: int = ACCOUNT_CACHE_ENTRIES,
    ) -> None:
        self._clock = clock
        self._seconds = seconds
        self._entries = entries
        self._remembered: dict[Hashable, tuple[float, Any]] = {}

    def __len__(self) -> int:
        return len(self._remembered)

    def lookup(self, key: Hashable, read: Callable[[], Deferred[T]]) -> Deferred[T]:
        """What ``read()`` gives, or what it gave for ``key`` less than a moment ago (counted
        from when that lookup was asked for). A failed read is not remembered."""
        now = self._clock.seconds()
        hit = self._remembered.get(key)
        if hit is not None and hit[0] > now:
            return succeed(hit[1])

        def remember(value: T) -> T:
            if len(self._remembered) >= self._entries:
                self._remembered.clear()
            self._remembered[key] = (now + self._seconds, value)
            return value

        return read().addCallback(remember)

    def change(self, write: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run ``write()``, which changes account data: what was remembered is forgotten
        before it starts and again when it ends (succeeded or not). Returns its Deferred."""
        self._remembered.clear()

        def forget(result: Any) -> Any:
            self._remembered.clear()
            return result

        return write().addBoth(forget)
