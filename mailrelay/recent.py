"""
A query's result shared for a while, for answers that may be a little old but are costly to
ask for every time: the accounts' client networks (relay by IP), the queue counts of
``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


class RecentResult(Generic[T]):
    """
    :meth:`get` runs ``query`` only if its last result is ``maxAge`` seconds old or older
    (counted from when that run started; ``clock`` tells the time), and callers that come
    while it runs wait for that run. A failure is passed to the callers that waited for it and
    not kept: the next caller asks again.
    """

    def __init__(
        self, query: Callable[[], Deferred[T]], clock: IReactorTime, maxAge: float
    ) -> None:
        self._query = query
        self._clock = clock
        self._maxAge = maxAge
        self._result: T | None = None
        self._takenAt: float | None = None
        self._waiting: list[Deferred[T]] = []

    def get(self) -> Deferred[T]:
        if self._takenAt is not None and self._clock.seconds() - self._takenAt < self._maxAge:
            return succeed(self._result)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            started = self._clock.seconds()
            maybeDeferred(self._query).addBoth(self._answer, started)
        return waiter

    def _answer(self, result: T | Failure, started: float) -> None:
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            for waiter in waiting:
                waiter.errback(result)
            return
        self._result, self._takenAt = result, started
        for waiter in waiting:
            waiter.callback(result)
